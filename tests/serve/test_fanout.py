"""Best-of-N orchestration with fake generator/scorer coroutines (no Ray): grouping, winner, failures."""

from __future__ import annotations

import asyncio

import pytest

from hidream_serve.api.errors import BadRequest, DeadlineExceeded, Unavailable
from hidream_serve.engine.params import GenerationParams
from services.config import RouterConfig
from services.fanout import Scored, best_of_n, pick_winner, split_seeds
from services.messages import CandidateResult, GroupResult, PreviewScore, ScoreResult
from tests.conftest import FakeResponse

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from importing ray.serve

PARAMS = GenerationParams(mode="t2i", prompt="a fox", width=128, height=128, exact_size=True, steps=2)


def fake_generate(calls: list, fail_groups=(), error=None, delay=0.0):
    async def generate(params, seeds):
        calls.append(list(seeds))
        await asyncio.sleep(delay)
        if error is not None and (not fail_groups or seeds[0] in fail_groups):
            raise error
        return GroupResult(replica=f"Generator#{len(calls) % 2}", settings={"steps": 2, "width": 128}, warnings=["w"],
                           candidates=[CandidateResult(s, f"png{s}".encode(), 2) for s in seeds])  # fmt: skip

    return generate


def scores_by_seed(table: dict[int, float]):
    async def score(prompt, pngs):
        vals = [table[int(p.decode()[3:])] for p in pngs]
        return ScoreResult(composite=vals, scores=[{"clip": v} for v in vals], replica="Scorer#0")

    return score


def run(coro):
    return asyncio.run(coro)


def test_split_seeds_even_groups():
    assert split_seeds([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]
    assert split_seeds([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert split_seeds([1, 2, 3, 4, 5], 4) == [[1, 2, 3], [4, 5]]
    assert split_seeds([7], 3) == [[7]]


def test_groups_run_concurrently_and_winner_is_best_score():
    calls = []
    cfg = RouterConfig(seeds_per_call=2)
    out = run(best_of_n(PARAMS, [10, 11, 12, 13], fake_generate(calls, delay=0.2),
                        scores_by_seed({10: 1.0, 11: 5.0, 12: 3.0, 13: 4.0}), cfg))  # fmt: skip
    assert sorted(calls) == [[10, 11], [12, 13]]
    assert [c.seed for c in out.candidates] == [10, 11, 12, 13]
    assert out.winner.seed == 11 and out.winner.score == 5.0 and out.scored
    assert out.timings["generate"] < 0.35  # the two groups overlapped
    assert out.warnings == ["w"] and out.candidates[0].scores == {"clip": {"raw": 1.0, "z": None, "weight": None}}


def test_ties_go_to_the_lowest_seed():
    out = run(best_of_n(PARAMS, [5, 3, 9], fake_generate([]), scores_by_seed({5: 2.0, 3: 2.0, 9: 1.0}),
                        RouterConfig(seeds_per_call=1)))  # fmt: skip
    assert out.winner.seed == 3
    assert pick_winner([Scored(8, b"x", "r", score=1.0), Scored(2, b"x", "r", score=1.0)]).seed == 2


def test_scorer_failure_returns_candidates_unscored_with_a_warning():
    async def broken(prompt, pngs):
        raise RuntimeError("CLIP exploded")

    out = run(best_of_n(PARAMS, [4, 2, 3], fake_generate([]), broken, RouterConfig()))
    assert [c.seed for c in out.candidates] == [4, 2, 3] and all(c.png for c in out.candidates)
    assert all(c.score is None for c in out.candidates) and not out.scored
    assert out.winner.seed == 2
    assert any("scoring failed" in w for w in out.warnings)


def test_scorer_timeout_returns_candidates_unscored():
    async def slow(prompt, pngs):
        await asyncio.sleep(5)

    out = run(best_of_n(PARAMS, [1, 2], fake_generate([]), slow, RouterConfig(score_timeout_s=0.1)))
    assert len(out.candidates) == 2 and not out.scored and any("timed out" in w for w in out.warnings)


def test_no_scorer_configured():
    out = run(best_of_n(PARAMS, [1, 2], fake_generate([]), None, RouterConfig()))
    assert not out.scored and out.winner.seed == 1 and any("no scorer" in w for w in out.warnings)


def test_non_finite_scores_count_as_unscored():
    out = run(best_of_n(PARAMS, [1, 2], fake_generate([]), scores_by_seed({1: float("nan"), 2: -3.0}),
                        RouterConfig()))  # fmt: skip
    assert out.winner.seed == 2 and out.candidates[0].score is None and out.scored


def test_bad_input_from_a_replica_fails_the_request():
    with pytest.raises(BadRequest) as e:
        run(best_of_n(PARAMS, [1, 2, 3, 4], fake_generate([], error=BadRequest("too long", field="prompt")), None,
                      RouterConfig(seeds_per_call=2)))  # fmt: skip
    assert e.value.field == "prompt"


def test_one_failed_group_drops_its_seeds_with_a_warning():
    gen = fake_generate([], fail_groups=(3,), error=RuntimeError("CUDA went away"))
    out = run(best_of_n(PARAMS, [1, 2, 3, 4], gen, scores_by_seed({1: 0.0, 2: 1.0}), RouterConfig(seeds_per_call=2)))
    assert [c.seed for c in out.candidates] == [1, 2] and out.winner.seed == 2
    assert any("[3, 4]" in w for w in out.warnings)


def test_back_pressure_on_one_group_fails_the_request_and_cancels_the_rest():
    cancelled = []

    async def generate(params, seeds):
        if seeds[0] == 3:
            raise Unavailable("queue full", retry_after_s=4)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(seeds)
            raise

    async def main():
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable) as e:
            await best_of_n(PARAMS, [1, 2, 3, 4], generate, None, RouterConfig(seeds_per_call=2))
        await asyncio.sleep(0)
        return e.value, asyncio.get_running_loop().time() - t0

    err, took = run(main())
    assert err.retry_after_s == 4 and took < 1 and cancelled == [[1, 2]]


def test_all_groups_failing_raises_the_service_error():
    with pytest.raises(Unavailable):
        run(best_of_n(PARAMS, [1, 2], fake_generate([], error=Unavailable("busy")), None, RouterConfig()))


def test_generation_deadline():
    async def hang(params, seeds):
        await asyncio.sleep(10)

    with pytest.raises(DeadlineExceeded):  # -> 504
        run(best_of_n(PARAMS, [1], hang, None, RouterConfig(generate_timeout_s=0.05, queue_timeout_s=0.05)))


# -- early pruning (issue 4) -----------------------------------------------------------------------------


def test_stage_steps():
    from hidream_serve.scoring.pruning import PrunePlan

    def stage_steps(stages, steps):
        return PrunePlan.of([(s["at"], s["keep"]) for s in stages]).schedule(steps)

    assert stage_steps([{"at": 0.5, "keep": 0.5}], 4) == {1: 0.5}
    assert stage_steps([{"at": 0.5, "keep": 0.5}], 50) == {24: 0.5}
    assert stage_steps([{"at": 0.01, "keep": 0.5}, {"at": 0.99, "keep": 0.3}], 10) == {0: 0.5, 8: 0.3}
    assert stage_steps([{"at": 0.5, "keep": 0.5}], 1) == {}  # nothing to save on a one-step run


def test_survivors_keep_the_best_fraction():
    from hidream_serve.scoring.pruning import survivors

    assert survivors([1.0, 5.0, 3.0, 4.0], [10, 11, 12, 13], 0.5) == [1, 3]
    assert survivors([2.0, 2.0, 1.0], [9, 4, 1], 0.3) == [1]  # tie -> lower seed
    assert survivors([1.0, 2.0], [1, 2], 1.0) is None and survivors([1.0], [1], 0.1) is None
    assert survivors([1.0, 2.0, 3.0], [1, 2, 3], 0.5) == [1, 2]  # ceil: keep at least the fraction


def test_pruned_candidates_keep_preview_scores_and_never_win():
    async def generate(params, seeds):
        return GroupResult(replica="G#0", settings={"steps": 4}, warnings=[], candidates=[
            CandidateResult(s, f"png{s}".encode(), 4 if s % 2 else 2, pruned_at_step=None if s % 2 else 1,
                            preview=None if s % 2 else PreviewScore(99.0, None))
            for s in seeds])  # fmt: skip

    scored_sets = []

    async def score(prompt, pngs):
        scored_sets.append(len(pngs))
        return ScoreResult(composite=[float(len(p)) for p in pngs], scores=None, replica="S#0")

    out = run(best_of_n(PARAMS, [1, 2, 3, 4], generate, score, RouterConfig(seeds_per_call=2)))
    assert scored_sets == [2]  # only the survivors are scored at the end
    pruned = [c for c in out.candidates if c.pruned_at_step is not None]
    assert [c.seed for c in pruned] == [2, 4] and all(c.score == 99.0 and c.scores is None for c in pruned)
    assert out.winner.seed in (1, 3) and out.winner.pruned_at_step is None


# -- cancellation reaches the replica (review item 3) --------------------------------------------------------


def test_a_generator_call_past_its_deadline_is_cancelled_on_the_replica():
    from services.fanout import cancel_with_caller

    responses = []

    async def generate(params, seeds):
        responses.append(FakeResponse(seconds=10))
        return await cancel_with_caller(responses[-1])

    with pytest.raises(DeadlineExceeded):
        run(best_of_n(PARAMS, [1, 2], generate, None, RouterConfig(generate_timeout_s=0.05, queue_timeout_s=0.05)))
    assert len(responses) == 1 and responses[0].cancelled


def test_a_sibling_failure_cancels_the_other_calls_on_their_replicas():
    from services.fanout import cancel_with_caller

    responses = {}

    async def generate(params, seeds):
        if seeds[0] == 3:
            raise Unavailable("queue full")
        responses[seeds[0]] = FakeResponse(seconds=10)
        return await cancel_with_caller(responses[seeds[0]])

    with pytest.raises(Unavailable):
        run(best_of_n(PARAMS, [1, 2, 3, 4], generate, None, RouterConfig(seeds_per_call=2)))
    assert responses[1].cancelled


def test_a_finished_call_is_not_cancelled():
    from services.fanout import cancel_with_caller

    r = FakeResponse({"ok": 1})
    assert run(cancel_with_caller(r)) == {"ok": 1} and not r.cancelled
