"""The typed messages between the deployments (plain dataclasses: they pickle through Ray as they are).

Router or Jobs -> Generator: `GroupJob` (one seed group, one batch on one replica) -> `GroupResult`; the
streaming call (`generate_stream`) yields `StepProgress` and `PreviewImage` before the `GroupResult`.
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
class ProgressPlan:
    """What a streaming generator call reports: progress every step, and x0 previews at these fractions of
    the steps, as small JPEG or WebP images (longest side `preview_size`)."""

    preview_at: tuple[float, ...] = (0.25, 0.5, 0.75)
    preview_size: int = 384
    preview_format: str = "jpeg"  # or "webp"


@dataclass(frozen=True)
class GroupJob:
    """One group of seeds to denoise as a batch, and how to prune it (None: run every step)."""

    params: GenerationParams
    seeds: list[int]
    prune: PrunePlan | None = None
    score_timeout_s: float = 120.0  # deadline of each preview scoring call when pruning
    progress: ProgressPlan | None = None  # streaming calls only
    compute_timeout_s: float | None = None  # from when the replica starts the group; None: no deadline


@dataclass(frozen=True)
class StepProgress:
    """A step finished for these (still active) seeds."""

    seeds: list[int]
    step: int  # 1-based: steps done
    steps: int


@dataclass(frozen=True)
class PreviewImage:
    """The x0 prediction of one candidate after `step` steps, encoded small."""

    seed: int
    step: int
    image: bytes
    media_type: str  # image/jpeg or image/webp


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
    preview_score_s: float = 0.0  # within engine_s: encoding the previews and waiting for their scores (pruning)
    # time.time() on the replica when the call started and returned; the router compares them with its own clock
    # (one host, or hosts with synchronised clocks) to tell the job's trip from the result's
    started_at: float = 0.0
    finished_at: float = 0.0


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
