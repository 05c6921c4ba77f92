"""Best-of-N: split the seeds into groups, generate the groups concurrently, score the set, pick the winner.

Plain asyncio over two injected coroutines, `generate(params, seeds)` and `score(prompt, pngs)`; the
router passes Ray Serve handle calls (wrapped in `cancel_with_caller`, so that cancelling the coroutine
cancels the work on the replica), tests pass fakes. Rules:

- a group failing on bad input fails the request (every group has the same input), and so does
  back-pressure or a lost replica (503: retry later; the other groups are cancelled); any other group
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
from typing import Any

from hidream_serve.api.errors import BadRequest, ServiceError, Unavailable, classify
from hidream_serve.scoring.pruning import rank_key

from .config import RouterConfig

log = logging.getLogger("ray.serve.hidream.router")  # under Serve's logger: replica logs

GenerateFn = Callable[[Any, list[int]], Awaitable[dict]]
ScoreFn = Callable[[str, list[bytes]], Awaitable[dict]]


@dataclass
class Scored:
    seed: int
    png: bytes | None
    replica: str
    steps_computed: int = 0
    pruned_at_step: int | None = None
    score: float | None = None
    scores: dict[str, float] | None = None


@dataclass
class Outcome:
    candidates: list[Scored]
    winner: Scored
    scored: bool
    settings: dict
    warnings: list[str]
    groups: list[dict]
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


def score_context(params) -> dict:
    """What the scorer judges candidates against besides the prompt: the mode, the user's refs (never the
    layout picture the engine draws) and their roles."""
    return {"mode": params.mode, "refs": list(params.refs), "roles": list(params.ref_roles)}


def normalize_breakdown(b: dict | None) -> dict[str, dict] | None:
    """A scorer's per-candidate breakdown as {scorer: {raw, z, weight}}; a bare number is a raw score."""
    if not b:
        return None

    def num(v):
        return float(v) if v is not None and math.isfinite(float(v)) else None

    out = {}
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = {"raw": num(v.get("raw")), "z": num(v.get("z")), "weight": num(v.get("weight"))}
        else:
            out[k] = {"raw": num(v), "z": None, "weight": None}
    return out


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


def pick_winner(cands: list[Scored]) -> Scored:
    finished = [c for c in cands if c.png is not None and c.pruned_at_step is None] or cands
    scored = [c for c in finished if c.score is not None]
    if not scored:
        return min(finished, key=lambda c: c.seed)
    return min(scored, key=lambda c: rank_key(c.score, c.seed))


async def best_of_n(params, seeds: list[int], generate: GenerateFn, score: ScoreFn | None,
                    config: RouterConfig, pruning: bool = False) -> Outcome:  # fmt: skip
    warnings: list[str] = []
    per_call = max(config.seeds_per_call, config.prune_group_size) if pruning else config.seeds_per_call
    groups = split_seeds(seeds, per_call)

    # -- generate: all groups at once; each group is one batch on one replica -----------------------
    t0 = time.perf_counter()

    async def one(group: list[int]) -> tuple[dict, float]:
        start = time.perf_counter()
        out = await asyncio.wait_for(generate(params, group), config.generate_timeout_s)
        return out, time.perf_counter() - start

    tasks = [asyncio.ensure_future(one(g)) for g in groups]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    err = classify(t.exception(), config.retry_after_s)
                    # bad input fails every group alike; back-pressure means retry the whole request later
                    if isinstance(err, (BadRequest, Unavailable)):
                        raise err from None
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()  # with `cancel_with_caller`: cancels the queued or running work on the replica
    t_gen = time.perf_counter() - t0
    results = [t.exception() or t.result() for t in tasks]
    errors = [(g, r) for g, r in zip(groups, results) if isinstance(r, BaseException)]
    if len(errors) == len(groups):
        raise classify(errors[0][1], config.retry_after_s)
    for g, r in errors:
        err = classify(r)
        log.warning("seeds %s failed: %s", g, err.message)
        warnings.append(f"seeds {g} were not generated: {err.message}")

    candidates: list[Scored] = []
    group_info: list[dict] = []
    settings: dict = {}
    for g, r in zip(groups, results):
        if isinstance(r, BaseException):
            continue
        out, wall = r
        settings = settings or out["settings"]
        for w in out.get("warnings", []):
            if w not in warnings:
                warnings.append(w)
        busy = float(out.get("busy_s", wall))
        group_info.append({"replica": out["replica"], "seeds": g, "queued": max(0.0, wall - busy), "seconds": wall})
        for c in out["candidates"]:
            pruned = c.get("pruned_at_step") is not None
            preview = normalize_breakdown(c.get("preview_scores")) if pruned else None
            candidates.append(Scored(seed=c["seed"], png=c["png"], replica=out["replica"],
                                     steps_computed=c.get("steps_computed", 0), pruned_at_step=c.get("pruned_at_step"),
                                     score=c.get("preview_score") if pruned else None, scores=preview))  # fmt: skip
    order = {s: i for i, s in enumerate(seeds)}
    candidates.sort(key=lambda c: order[c.seed])

    # -- score: the whole set in one call; failure -> unscored, never lost -------------------------------
    t1 = time.perf_counter()
    scorer_name = None
    to_score = [c for c in candidates if c.png is not None and c.pruned_at_step is None]  # pruned: preview score
    scored = False
    if score is None:
        warnings.append("no scorer is configured: candidates are unscored and the winner is the lowest seed")
    elif to_score:
        try:
            res = await asyncio.wait_for(score(params.prompt, [c.png for c in to_score]), config.score_timeout_s)
            composite, breakdown = res["composite"], res.get("scores") or [None] * len(to_score)
            if len(composite) != len(to_score):
                raise ValueError(f"scorer returned {len(composite)} scores for {len(to_score)} images")
            bad = 0
            for c, s, b in zip(to_score, composite, breakdown):
                if s is None or not math.isfinite(float(s)):
                    bad += 1
                    continue
                c.score = float(s)
                c.scores = normalize_breakdown(b)
            for w in res.get("warnings") or []:
                if w not in warnings:
                    warnings.append(w)
            if bad:
                warnings.append(f"{bad} candidate(s) got no finite score and count as unscored")
            scored = bad < len(to_score)
            scorer_name = res.get("replica")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - scoring must never lose the candidates
            err = classify(e)
            reason = err.message if isinstance(err, ServiceError) and err.status < 500 else type(e).__name__
            if isinstance(e, asyncio.TimeoutError):
                reason = f"timed out after {config.score_timeout_s:g}s"
            log.warning("scoring failed: %r", e)
            warnings.append(f"scoring failed ({reason}): candidates are unscored and the winner is the lowest seed")
            for c in to_score:
                c.score = c.scores = None
    t_score = time.perf_counter() - t1

    return Outcome(
        candidates=candidates, winner=pick_winner(candidates), scored=scored, settings=settings, warnings=warnings,
        groups=group_info, scorer=scorer_name,
        timings={"queued": max((g["queued"] for g in group_info), default=0.0), "generate": t_gen, "score": t_score},
    )  # fmt: skip
