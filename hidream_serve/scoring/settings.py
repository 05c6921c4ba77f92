"""Scoring configuration: composite weights per mode and reference weights per role (pydantic, unknown
keys rejected). The Scorer deployment receives them as `user_config` (services/config.py `ScorerConfig`),
so `serve deploy` with new weights retunes a running service; `calibrate-pruning` reads the same keys.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..vocabulary import MODES, ROLES

SCORER_NAMES = ("pickscore", "clip", "fidelity", "sharpness", "exposure")

# Built-in weights of the composite (weights of z-scores, so unit-free). PickScore leads; CLIP adds
# alignment; fidelity leads where references define the result; the quality guard only breaks ties.
# Instructions ("make it night") are poor captions, so edit leans least on the text scorers.
DEFAULT_MODE_WEIGHTS: dict[str, dict[str, float]] = {
    "t2i": {"pickscore": 1.0, "clip": 0.5, "fidelity": 0.0, "sharpness": 0.1, "exposure": 0.1},
    "edit": {"pickscore": 0.5, "clip": 0.25, "fidelity": 1.0, "sharpness": 0.1, "exposure": 0.1},
    "ip": {"pickscore": 0.75, "clip": 0.5, "fidelity": 1.0, "sharpness": 0.1, "exposure": 0.1},
    "skeleton": {"pickscore": 0.75, "clip": 0.5, "fidelity": 1.0, "sharpness": 0.1, "exposure": 0.1},
    "layout": {"pickscore": 1.0, "clip": 0.5, "fidelity": 0.75, "sharpness": 0.1, "exposure": 0.1},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _w(desc: str):
    return Field(None, ge=0.0, le=100.0, description=desc)


class ScoreWeights(_Strict):
    """Weights of one mode; a field left unset keeps the built-in weight of that mode (0 disables)."""

    pickscore: float | None = _w("human preference (PickScore)")
    clip: float | None = _w("prompt alignment (CLIP score)")
    fidelity: float | None = _w("reference fidelity (DINOv2, else CLIP image embeddings)")
    sharpness: float | None = _w("quality guard: variance of the Laplacian")
    exposure: float | None = _w("quality guard: clipped pixels and mean brightness")


class _ModeWeights(_Strict):
    """Weights per mode (one field per mode of the vocabulary)."""

    def for_mode(self, mode: str) -> dict[str, float]:
        base = dict(DEFAULT_MODE_WEIGHTS.get(mode, DEFAULT_MODE_WEIGHTS["t2i"]))
        override = getattr(self, mode, None) if mode in DEFAULT_MODE_WEIGHTS else None
        if override is not None:
            base.update({k: float(v) for k, v in override.model_dump(exclude_none=True).items()})
        return base


ModeWeights = create_model(
    "ModeWeights", __base__=_ModeWeights,
    **{mode: (ScoreWeights, Field(default_factory=ScoreWeights)) for mode in MODES},
)  # fmt: skip

# How much a reference of each role counts in reference fidelity (0: not at all), and why.
DEFAULT_ROLE_WEIGHTS: dict[str, float] = {
    "face": 1.0, "subject": 1.0, "garment": 1.0, "style": 0.5, "background": 0.0, "pose": 0.0,
}  # fmt: skip
ROLE_RATIONALE = {
    "face": "identity",
    "subject": "an object or person to keep",
    "garment": "clothing to wear",
    "background": "a backdrop to place things in, not a look to copy",
    "pose": "a pose skeleton: a condition, not something to resemble",
    "style": "the look carries over, not the content",
}


class _RoleWeights(_Strict):
    """How much a reference of each role counts in reference fidelity (0: not at all)."""


RoleWeights = create_model(
    "RoleWeights", __base__=_RoleWeights,
    **{role: (float, Field(DEFAULT_ROLE_WEIGHTS[role], ge=0.0, le=10.0, description=ROLE_RATIONALE[role]))
       for role in ROLES},
)  # fmt: skip
