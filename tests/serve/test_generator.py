"""The Generator deployment's class without Ray: the tiny model on CPU, cancellation and pruning batches."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from hidream_serve.engine.params import GenerationParams
from hidream_serve.scoring.pruning import PrunePlan
from tests.conftest import FakeResponse

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from importing ray.serve

generator_mod = pytest.importorskip("services.generator")
from services.messages import GroupJob, GroupResult, ScoreResult  # noqa: E402

SMALL = dict(mode="t2i", prompt="a fox", width=128, height=128, exact_size=True)
PRUNE = PrunePlan.of([(0.5, 0.5)])


def job(params, seeds, prune=None):
    return GroupJob(params, seeds, prune, score_timeout_s=30)


class StepCounter:
    """Wraps the pipeline to count the denoising steps it takes."""

    def __init__(self, pipe):
        self.pipe, self.steps = pipe, 0

    @property
    def max_batch(self):
        return self.pipe.max_batch

    @max_batch.setter
    def max_batch(self, n):
        self.pipe.max_batch = n

    def __call__(self, params, seeds, on_step=None):
        def hook(state):
            self.steps += 1
            return on_step(state) if on_step is not None else None

        return self.pipe(params, seeds, on_step=hook)


class FakeScorer:
    """Preview scores: higher for lower seeds' positions (the first previews win)."""

    def __init__(self, seconds=0.0):
        self.seconds, self.calls = seconds, []
        self.score = self  # handle.score.remote(...)

    def remote(self, job):
        scores = [float(-i) for i in range(len(job.images))]
        self.calls.append(FakeResponse(ScoreResult(composite=scores, scores=None), self.seconds))
        return self.calls[-1]


@pytest.fixture(scope="module")
def generator(tiny_dir):
    gen = generator_mod.Generator.func_or_class(str(tiny_dir), device="cpu", dtype="float32")
    gen.reconfigure({"max_batch": 4})
    return gen


@pytest.fixture
def counted(generator, monkeypatch):
    counter = StepCounter(generator.pipe)
    monkeypatch.setattr(generator, "pipe", counter)
    monkeypatch.setattr(generator, "scorer", None)
    yield generator, counter
    generator.reconfigure({"max_batch": 4})


def _engine_is_free(gen) -> bool:
    if gen._lock.acquire(blocking=False):
        gen._lock.release()
        return True
    return False


def test_cancelling_a_call_frees_the_engine_within_a_step(counted):
    """A cancelled call (deadline, client gone, failed sibling) must not leave the engine busy: Serve would
    send the next group to this replica while the old one still computes."""
    gen, counter = counted
    params = GenerationParams(**SMALL, steps=200)

    async def main():
        task = asyncio.ensure_future(gen.generate(job(params, [1, 2])))
        while counter.steps < 2:
            await asyncio.sleep(0.002)
        at_cancel = counter.steps
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return at_cancel, _engine_is_free(gen), counter.steps

    at_cancel, free, steps_when_done = asyncio.run(main())
    assert free, "the call ended while the engine still ran it"
    assert steps_when_done <= at_cancel + 2 and counter.steps == steps_when_done
    out = asyncio.run(gen.generate(job(GenerationParams(**SMALL, steps=2), [3])))  # and the engine still works
    assert [c.seed for c in out.candidates] == [3] and out.candidates[0].png


def test_cancelling_while_previews_are_scored_stops_promptly(counted, monkeypatch):
    gen, counter = counted
    scorer = FakeScorer(seconds=30)
    monkeypatch.setattr(gen, "scorer", scorer)
    params = GenerationParams(**SMALL, steps=4)

    async def main():
        task = asyncio.ensure_future(gen.generate(job(params, [1, 2], PRUNE)))
        while not scorer.calls:
            await asyncio.sleep(0.002)
        t0 = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)  # let the scorer call's cancellation run
        return time.perf_counter() - t0, _engine_is_free(gen)

    took, free = asyncio.run(main())
    assert free and took < 5 and counter.steps == 2
    assert scorer.calls[0].cancelled  # the preview scoring itself is cancelled on the scorer


def test_pruning_ranks_the_candidates_of_one_batch(counted, monkeypatch):
    gen, _ = counted
    monkeypatch.setattr(gen, "scorer", FakeScorer())
    out = asyncio.run(gen.generate(job(GenerationParams(**SMALL, steps=4), [1, 2, 3, 4], PRUNE)))
    assert [c.pruned_at_step for c in out.candidates] == [None, None, 1, 1]
    assert not any("pruning skipped" in w for w in out.warnings), out.warnings


@pytest.mark.parametrize("max_batch, alone", [(1, [1, 2, 3, 4]), (3, [4])])
def test_pruning_says_so_when_candidates_denoise_alone(counted, monkeypatch, max_batch, alone):
    """The engine prunes within batches of max_batch: a candidate alone in its batch is never pruned."""
    gen, _ = counted
    monkeypatch.setattr(gen, "scorer", FakeScorer())
    gen.reconfigure({"max_batch": max_batch})
    out = asyncio.run(gen.generate(job(GenerationParams(**SMALL, steps=4), [1, 2, 3, 4], PRUNE)))
    assert any(f"pruning skipped for seeds {alone}" in w for w in out.warnings), out.warnings
    pruned = [c.seed for c in out.candidates if c.pruned_at_step is not None]
    assert not set(pruned) & set(alone)


def test_one_candidate_with_pruning_needs_no_warning(counted, monkeypatch):
    gen, _ = counted
    gen.reconfigure({"max_batch": 1})
    out = asyncio.run(gen.generate(job(GenerationParams(**SMALL, steps=2), [7], PRUNE)))
    assert not any("pruning skipped" in w for w in out.warnings)


def test_generator_output_is_what_the_router_reads(counted):
    gen, _ = counted
    out = asyncio.run(gen.generate(job(GenerationParams(**SMALL, steps=2), [5])))
    assert isinstance(out, GroupResult) and out.replica and out.settings and out.timings.busy_s > 0
    assert 0 < out.timings.engine_s <= out.timings.busy_s and out.timings.png_s >= 0


def test_layout_pngs_carry_their_boxes(counted):
    import json

    from hidream_serve.api.images import png_text
    from tests.conftest import make_image

    gen, _ = counted
    boxes = [[0.1, 0.5, 0.1, 0.9], {"bbox": [0.5, 0.9, 0.2, 0.8], "text": "right"}]
    params = GenerationParams(mode="layout", prompt="two friends", refs=[make_image(64, 64), make_image(64, 64, 1)],
                              layout_boxes=boxes, width=128, height=128, exact_size=True, steps=1)  # fmt: skip
    out = asyncio.run(gen.generate(job(params, [2])))
    assert json.loads(png_text(out.candidates[0].png)["layout_boxes"]) == boxes


def test_replica_start_is_logged_under_serves_logger_with_its_attention_kernel(tiny_dir, caplog):
    """Serve writes the replica logs from its own logger; ours must sit under it or its info lines are lost."""
    from ray.serve._private.constants import SERVE_LOGGER_NAME

    with caplog.at_level("INFO", logger=SERVE_LOGGER_NAME):
        generator_mod.Generator.func_or_class(str(tiny_dir), device="cpu", dtype="float32")
    started = [r for r in caplog.records if "loaded" in r.getMessage()]
    assert started and started[0].name.startswith(SERVE_LOGGER_NAME + ".")
    assert "(attention cudnn)" in started[0].getMessage()


def test_compute_deadline_counts_from_the_engine_start_not_the_queue(counted):
    """Waiting for the engine (another group running) does not count against the compute deadline; running
    past it stops the group at its next step with a 504."""
    from hidream_serve.api.errors import DeadlineExceeded

    gen, counter = counted
    long = GroupJob(GenerationParams(**SMALL, steps=200), [1], None, 30, compute_timeout_s=0.3)
    start = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match="generate_timeout_s"):
        asyncio.run(gen.generate(long))
    assert time.perf_counter() - start < 5 and counter.steps < 200

    async def queued_behind():
        first = asyncio.ensure_future(gen.generate(GroupJob(GenerationParams(**SMALL, steps=12), [2], None, 30)))
        await asyncio.sleep(0.05)
        second = GroupJob(GenerationParams(**SMALL, steps=2), [3], None, 30, compute_timeout_s=1.5)
        t0 = time.perf_counter()
        out = await gen.generate(second)  # waits for `first` (longer than 1.5 s on some machines), then runs
        await first
        return out, time.perf_counter() - t0

    out, _ = asyncio.run(queued_behind())
    assert [c.seed for c in out.candidates] == [3]


class FakeCuda:
    """torch.cuda's memory calls, for engine.gpu_memory_gib on a machine without a GPU."""

    def __init__(self, total_gib: float):
        self.total, self.fractions = int(total_gib * 2**30), []

    def current_device(self):
        return 0

    def get_device_properties(self, index):
        return type("Props", (), {"total_memory": self.total})()

    def set_per_process_memory_fraction(self, fraction, index):
        self.fractions.append((fraction, index))


def test_gpu_memory_gib_caps_the_allocator_at_that_share_of_the_card():
    import torch

    fake = type("Torch", (), {"cuda": FakeCuda(80), "device": torch.device})()
    generator_mod.cap_gpu_memory(fake, "cuda", 20)
    generator_mod.cap_gpu_memory(fake, "cuda:1", 60)
    assert fake.cuda.fractions == [(0.25, 0), (0.75, 1)]
    with pytest.raises(ValueError, match="gpu_memory_gib 100 is more than the GPU has"):
        generator_mod.cap_gpu_memory(fake, "cuda", 100)



def test_a_cancel_before_the_preview_score_is_pending_still_wakes_the_engine(monkeypatch):
    """`abort` may run while the engine thread is between scheduling the preview score and recording it as
    pending: the thread must see the cancel itself rather than wait out the score timeout."""
    from types import SimpleNamespace

    from PIL import Image

    from services import pruning

    started, cancel = threading.Event(), threading.Event()
    submit = asyncio.run_coroutine_threadsafe

    def submit_then_wait(coro, loop):  # the loop runs the score call, and the cancel, before `pending` is set
        future = submit(coro, loop)
        started.wait(5)
        return future

    monkeypatch.setattr(pruning.asyncio, "run_coroutine_threadsafe", submit_then_wait)

    async def main():
        async def slow_score(pngs):
            cancel.set()
            hook.abort()  # finds nothing pending yet
            await asyncio.sleep(30)

        hook = pruning.PruningHook(PRUNE, slow_score, asyncio.get_running_loop(), 30, cancel)
        state = SimpleNamespace(num_steps=4, step=1, seeds=[1, 2], preview=lambda i: Image.new("RGB", (64, 64)))
        t0 = time.perf_counter()
        engine_thread = asyncio.ensure_future(asyncio.to_thread(hook, state))
        while not cancel.is_set():
            await asyncio.sleep(0.001)
        started.set()
        with pytest.raises(pruning.GenerationCancelled):
            await engine_thread
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 5
