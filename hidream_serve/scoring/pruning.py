"""Early pruning on free previews: at chosen steps, score every active candidate's clean-image prediction
and let only the best continue. Pure functions here; the generator (services/generator.py) wires them to
the engine's step hook and the scorer deployment, and `calibrate-pruning` replays them offline.

Pruning is per seed group (one replica's batch): `keep` is applied to each group's active candidates,
so with equal groups the request keeps the same fraction overall.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PrunePlan:
    """A request's pruning: stages of (at: fraction of the steps, keep: fraction of the active candidates), in
    step order. Built from the request (`GenerateRequest.prune_plan`), carried to the generator in its
    `GroupJob`, turned into the engine's step hook there (services/pruning.py)."""

    stages: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, stages: Sequence[tuple[float, float]]) -> PrunePlan | None:
        """The plan of these (at, keep) stages, or None when there are none (no pruning)."""
        return cls(tuple(sorted((float(at), float(keep)) for at, keep in stages))) if stages else None

    def schedule(self, num_steps: int) -> dict[int, float]:
        """{0-based step index after which to prune: keep fraction}. A stage at fraction f fires after step
        round(f * num_steps) (at least the first, never the last); stages landing on one step keep the
        smallest fraction."""
        out: dict[int, float] = {}
        for at, keep in self.stages:
            idx = min(max(1, round(at * num_steps)), num_steps - 1) - 1
            if idx < 0:
                continue
            out[idx] = min(out.get(idx, 1.0), keep)
        return out


def keep_count(keep: float, n: int) -> int:
    """How many of `n` candidates a `keep` fraction keeps: ceil(keep * n) (float noise aside), at least one."""
    return max(1, math.ceil(keep * n - 1e-9))


def rank_key(score: float | None, seed: int) -> tuple[float, int]:
    """The service's ranking as a sort key, best first: the higher score, ties to the lower seed; no score
    ranks last. Pruning survivors, the request's winner (services/fanout.py) and calibration all use it."""
    return (-(score if score is not None else -math.inf), seed)


def survivors(scores: Sequence[float | None], seeds: Sequence[int], keep: float) -> list[int] | None:
    """Batch positions to keep: the best ceil(keep * n) by score (ties: lowest seed); None keeps all."""
    n = len(scores)
    k = keep_count(keep, n)
    if k >= n:
        return None
    ranked = sorted(range(n), key=lambda i: rank_key(scores[i], seeds[i]))
    return sorted(ranked[:k])
