"""Best-of-N: split the seeds into groups, generate the groups concurrently, score the set, pick the winner.

Plain asyncio over two injected coroutines, `generate(params, seeds)` and `score(prompt, pngs)`; the
router passes Ray Serve handle calls (wrapped in `cancel_with_caller`, so that cancelling the coroutine
cancels the work on the replica), tests pass fakes. Rules:

- a group whose replica is lost is rerun on another replica (same seeds, same images), within
  `replica_retries` per request, keeping the groups that finished;
- a group failing on bad input fails the request (every group has the same input), and so does
  back-pressure or a lost replica past the retries (503: retry later; the other groups are cancelled); any other group
  failure drops those seeds with a warning, unless every group failed;
- a scoring failure (error, timeout, no scorer) never loses candidates: they come back unscored
  with a warning, and the winner is the lowest seed;
- the winner is the highest score, ties broken by the lowest seed, among candidates that ran every
  step (a candidate stopped by `prune` keeps its preview score and breakdown and never wins);
- the scorer's composite is relative to the set it is given (z-scores within the request), so a
  candidate's score means "how much better than its siblings", and the breakdown says why;
  the scorer's warnings (a scorer not configured or failing) join the response's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hidream_serve.api.errors import BadRequest, ServiceError, Unavailable, classify, replica_lost
from hidream_serve.api.protocol import Debug, GroupInfo
from hidream_serve.engine.params import GenerationParams
from hidream_serve.scoring.pruning import rank_key

from .config import RouterConfig
from .messages import GroupResult, ScoreResult

log = logging.getLogger("ray.serve.hidream.router")  # under Serve's logger: replica logs

GenerateFn = Callable[[GenerationParams, list[int]], Awaitable[GroupResult]]
ScoreFn = Callable[[str, list[bytes]], Awaitable[ScoreResult]]


@dataclass
class Scored:
    seed: int
    png: bytes | None
    replica: str
    steps_computed: int = 0
    pruned_at_step: int | None = None
    score: float | None = None
    scores: dict[str, dict] | None = None


@dataclass
class GroupRun:
    """One group's call as the router saw it: its result and wall time (queueing and transfers included)."""

    seeds: list[int]
    result: GroupResult
    wall_s: float
    sent_at: float = 0.0  # time.time() when the router made the call
    received_at: float = 0.0  # time.time() when it held the result

    @property
    def queued_s(self) -> float:
        return max(0.0, self.wall_s - self.result.timings.busy_s)

    @property
    def dispatch_s(self) -> float | None:
        """Call to replica start: waiting for a free replica plus the job's trip (None: no replica clock)."""
        started = self.result.timings.started_at
        return max(0.0, started - self.sent_at) if started and self.sent_at else None

    @property
    def return_s(self) -> float | None:
        """Replica return to the router holding the result: Ray moving the GroupResult (its PNGs)."""
        finished = self.result.timings.finished_at
        return max(0.0, self.received_at - finished) if finished and self.received_at else None


@dataclass
class Outcome:
    candidates: list[Scored]
    winner: Scored
    scored: bool
    settings: dict
    warnings: list[str]
    groups: list[GroupRun]
    scorer: str | None
    timings: dict[str, float] = field(default_factory=dict)


async def cancel_with_caller(response):
    """Await a Ray Serve `DeploymentResponse`, cancelling the call itself (queued or running on a replica)
    if this await is cancelled: a deadline, a failed sibling group, a client that went away. Serve does not
    do that for a plain asyncio cancellation of the awaiting task; `response.cancel()` does."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


def split_seeds(seeds: list[int], per_call: int) -> list[list[int]]:
    """Groups of at most `per_call` seeds, sizes as even as possible (5 by 2 -> 2, 2, 1)."""
    n_groups = math.ceil(len(seeds) / per_call)
    base, extra = divmod(len(seeds), n_groups)
    groups, start = [], 0
    for g in range(n_groups):
        size = base + (1 if g < extra else 0)
        groups.append(seeds[start : start + size])
        start += size
    return groups


def group_size(config: RouterConfig, pruning: bool) -> int:
    """Seeds per generator call: pruning ranks the candidates of one call, so it needs larger groups."""
    return max(config.seeds_per_call, config.prune_group_size) if pruning else config.seeds_per_call


def pick_winner(cands: list[Scored]) -> Scored:
    finished = [c for c in cands if c.png is not None and c.pruned_at_step is None] or cands
    scored = [c for c in finished if c.score is not None]
    if not scored:
        return min(finished, key=lambda c: c.seed)
    return min(scored, key=lambda c: rank_key(c.score, c.seed))


def _add(warnings: list[str], new) -> None:
    warnings.extend(w for w in new if w not in warnings)


async def generate_groups(params: GenerationParams, groups: list[list[int]], generate: GenerateFn,
                          config: RouterConfig, warnings: list[str], bounded: bool = True) -> list[GroupRun]:  # fmt: skip
    """Every group at once, one call each. Bad input or back-pressure on any group fails the request (and
    cancels the rest); any other failure drops that group's seeds with a warning, unless all failed.
    `bounded`: a call past the longest queue wait plus the compute deadline fails (a job that retries
    back-pressure on its own passes False)."""

    retries = [config.replica_retries]  # shared by the request's groups
    bound = config.queue_timeout_s + config.generate_timeout_s if bounded else None

    async def one(group: list[int]) -> GroupRun:
        while True:
            sent_at, start = time.time(), time.perf_counter()
            try:
                # the replica enforces the compute deadline; this bound adds the longest queue wait
                result = await asyncio.wait_for(generate(params, group), bound)
            except Exception as e:  # noqa: BLE001 - rerun on a lost replica, else the rules below
                if not replica_lost(e) or retries[0] <= 0:
                    raise
                retries[0] -= 1
                log.warning("seeds %s: replica lost (%s); rerunning on another replica", group, type(e).__name__)
                warnings.append(f"seeds {group} were rerun: the generator replica running them was lost")
                continue
            return GroupRun(group, result, time.perf_counter() - start, sent_at, time.time())

    tasks = [asyncio.ensure_future(one(g)) for g in groups]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    err = classify(t.exception(), config.retry_after_s)
                    if isinstance(err, (BadRequest, Unavailable)):  # the same for every group / retry later
                        raise err from None
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()  # with `cancel_with_caller`: cancels the queued or running work on the replica
    failed = [(g, t.exception()) for g, t in zip(groups, tasks) if t.exception() is not None]
    if len(failed) == len(groups):
        raise classify(failed[0][1], config.retry_after_s)
    for g, e in failed:
        err = classify(e)
        log.warning("seeds %s failed: %s", g, err.message)
        warnings.append(f"seeds {g} were not generated: {err.message}")
    return [t.result() for t in tasks if t.exception() is None]


def collect_candidates(runs: list[GroupRun], seeds: list[int], warnings: list[str]) -> list[Scored]:
    """The groups' candidates in request seed order; a pruned one keeps its preview's score."""
    out = []
    for run in runs:
        _add(warnings, run.result.warnings)
        for c in run.result.candidates:
            preview = c.preview if c.pruned_at_step is not None else None
            out.append(Scored(seed=c.seed, png=c.png, replica=run.result.replica, steps_computed=c.steps_computed,
                              pruned_at_step=c.pruned_at_step, score=preview.score if preview else None,
                              scores=preview.breakdown if preview else None))  # fmt: skip
    order = {s: i for i, s in enumerate(seeds)}
    return sorted(out, key=lambda c: order[c.seed])


async def score_candidates(prompt: str, candidates: list[Scored], score: ScoreFn | None, config: RouterConfig,
                           warnings: list[str]) -> tuple[bool, str | None, float]:  # fmt: skip
    """Score the finished candidates in one call, in place; (any scored, scorer replica, the scorer's own
    seconds). A failure never loses candidates: they stay unscored, with a warning."""
    to_score = [c for c in candidates if c.png is not None and c.pruned_at_step is None]
    if score is None:
        warnings.append("no scorer is configured: candidates are unscored and the winner is the lowest seed")
        return False, None, 0.0
    if not to_score:
        return False, None, 0.0
    try:
        res = await asyncio.wait_for(score(prompt, [c.png for c in to_score]), config.score_timeout_s)
        if len(res.composite) != len(to_score):
            raise ValueError(f"scorer returned {len(res.composite)} scores for {len(to_score)} images")
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - scoring must never lose the candidates
        err = classify(e)
        reason = err.message if isinstance(err, ServiceError) and err.status < 500 else type(e).__name__
        if isinstance(e, asyncio.TimeoutError):
            reason = f"timed out after {config.score_timeout_s:g}s"
        log.warning("scoring failed: %r", e)
        warnings.append(f"scoring failed ({reason}): candidates are unscored and the winner is the lowest seed")
        return False, None, 0.0
    bad = 0
    for c, s, b in zip(to_score, res.composite, res.scores):
        if s is None or not math.isfinite(float(s)):
            bad += 1
            continue
        c.score, c.scores = float(s), b
    _add(warnings, res.warnings)
    if bad:
        warnings.append(f"{bad} candidate(s) got no finite score and count as unscored")
    return bad < len(to_score), res.replica, res.seconds


async def best_of_n(params: GenerationParams, seeds: list[int], generate: GenerateFn, score: ScoreFn | None,
                    config: RouterConfig, pruning: bool = False, bounded: bool = True) -> Outcome:  # fmt: skip
    warnings: list[str] = []
    t0 = time.perf_counter()
    groups = split_seeds(seeds, group_size(config, pruning))
    runs = await generate_groups(params, groups, generate, config, warnings, bounded)
    t_gen = time.perf_counter() - t0
    candidates = collect_candidates(runs, seeds, warnings)
    t1 = time.perf_counter()
    scored, scorer, score_compute = await score_candidates(params.prompt, candidates, score, config, warnings)
    timings = {"queued": max((r.queued_s for r in runs), default=0.0), "generate": t_gen,
               "score": time.perf_counter() - t1, "score_compute": score_compute}  # fmt: skip
    return Outcome(candidates=candidates, winner=pick_winner(candidates), scored=scored,
                   settings=runs[0].result.settings, warnings=warnings, groups=runs, scorer=scorer,
                   timings=timings)  # fmt: skip


def debug_of(out: Outcome) -> Debug:
    """Which replica made which seeds, each group's timings, the scorer replica: a response's `debug`."""
    replicas: dict[str, list[int]] = {}
    for g in out.groups:
        replicas.setdefault(g.result.replica, []).extend(g.seeds)
    groups = [GroupInfo(replica=g.result.replica, seeds=g.seeds, queued=g.queued_s, seconds=g.wall_s,
                        engine=g.result.timings.engine_s, png=g.result.timings.png_s,
                        preview_score=g.result.timings.preview_score_s, dispatch=g.dispatch_s,
                        returned=g.return_s) for g in out.groups]  # fmt: skip
    return Debug(replicas=replicas, groups=groups, scorer=out.scorer)
