"""The typed messages between the deployments (plain dataclasses: they pickle through Ray as they are).

Router -> Generator: `GroupJob` (one seed group, one batch on one replica) -> `GroupResult`.
Router or Generator -> Scorer: `ScoreJob` -> `ScoreResult`.
build_app -> Router: `AppInfo`.
No torch here: the router (CPU-only ingress) builds and reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hidream_serve.api.protocol import Defaults, Limits
from hidream_serve.engine.params import GenerationParams
from hidream_serve.scoring.context import ScoreContext
from hidream_serve.scoring.pruning import PrunePlan


@dataclass(frozen=True)
class GroupJob:
    """One group of seeds to denoise as a batch, and how to prune it (None: run every step)."""

    params: GenerationParams
    seeds: list[int]
    prune: PrunePlan | None = None
    score_timeout_s: float = 120.0  # deadline of each preview scoring call when pruning


@dataclass
class PreviewScore:
    """The score of a candidate's preview at the stage that stopped it, among that stage's previews."""

    score: float | None
    breakdown: dict[str, dict] | None


@dataclass
class CandidateResult:
    seed: int
    png: bytes | None  # the final image, or for a pruned candidate its last preview
    steps_computed: int
    pruned_at_step: int | None = None
    preview: PreviewScore | None = None  # set when pruned


@dataclass
class GroupTimings:
    engine_s: float = 0.0  # the denoising call
    png_s: float = 0.0  # encoding the PNGs
    busy_s: float = 0.0  # the whole call on the replica, from its start (waiting for the engine included)


@dataclass
class GroupResult:
    replica: str
    candidates: list[CandidateResult]
    settings: dict[str, Any]
    warnings: list[str]
    timings: GroupTimings = field(default_factory=GroupTimings)


@dataclass(frozen=True)
class ScoreJob:
    prompt: str
    images: list[bytes]  # PNGs
    context: ScoreContext = field(default_factory=ScoreContext)


@dataclass
class ScoreResult:
    composite: list[float | None]  # one per image, z-scores combined within the set
    scores: list[dict[str, dict] | None]  # per image: {scorer: {raw, z, weight}}
    warnings: list[str] = field(default_factory=list)
    replica: str | None = None
    seconds: float = 0.0

    def __post_init__(self):
        self.scores = [normalize_breakdown(b) for b in (self.scores or [None] * len(self.composite))]


@dataclass(frozen=True)
class AppInfo:
    """What the router knows of the application it fronts (from `build_app`)."""

    model: str
    model_name: str
    scorers: dict[str, str | None] | None  # None: no scorer deployment
    limits: Limits
    defaults: Defaults


def normalize_breakdown(b: dict | None) -> dict[str, dict] | None:
    """A per-image breakdown as {scorer: {raw, z, weight}}, non-finite numbers as None; a bare number is a raw
    score."""
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
