"""Request and response models of `POST /v1/generate/{mode}` and their conversion to the engine's params.

The pydantic models hold the protocol's fixed bounds (types, ranges the engine accepts, unknown fields
rejected); `Limits` holds what the operator configures (max N, steps, pixels, refs, image bytes) and is
checked in `to_engine`, which raises `InvalidInput` naming the field. Fields left unset take the
deployment's `Defaults`, then the recipe's values.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
import secrets
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from hidream_serve.engine.errors import InvalidInput
from hidream_serve.engine.params import GenerationParams
from hidream_serve.presets import PresetName, annotation, apply_preset
from hidream_serve.scoring.pruning import PrunePlan
from hidream_serve.vocabulary import (
    HARD_MAX_EDGE,
    HARD_MAX_N,
    HARD_MAX_PROMPT,
    HARD_MAX_REFS,
    MAX_SEED,
    MAX_STEPS,
    MODES,
    Mode,
    RecipeName,
    Role,
    SchedulerName,
)  # fmt: skip

from .images import RefBudget, decode_image
from .ref_edges import engine_ref_edge

RANDOM_SEED_BOUND = 2**31  # a server-chosen first seed is below this, so seed + n stays readable
ReturnWhat = Literal["winner", "all"]


_CONTROL_CHAR = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls but tab, LF, CR


def _printable(v: str) -> str:
    """Text that reaches the model and the PNG's text chunks: no NUL or other control characters."""
    m = _CONTROL_CHAR.search(v)
    if m:
        raise PydanticCustomError("control_character", "contains the control character {char} at position {pos}",
                                  {"char": f"U+{ord(m.group()):04X}", "pos": m.start()})  # fmt: skip
    return v


Text = Annotated[str, AfterValidator(_printable)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


# -- operator configuration --------------------------------------------------------------------------


class Limits(_Strict):
    """Per-request bounds set by the operator (AppArgs.limits)."""

    max_n: int = Field(16, ge=1, le=HARD_MAX_N, description="largest best-of-N")
    max_steps: int = Field(100, ge=1, le=MAX_STEPS)
    max_pixels: int = Field(3104 * 3104, ge=64 * 64, description="output width*height")
    max_refs: int = Field(10, ge=0, le=HARD_MAX_REFS)
    max_image_bytes: int = Field(20 * 2**20, ge=1024, description="encoded size of one reference image")
    max_image_pixels: int = Field(50_000_000, ge=64 * 64, description="decoded size of one reference image")
    max_prompt_chars: int = Field(4000, ge=1, le=HARD_MAX_PROMPT)


# Request fields whose bound the operator sets: field -> (Limits attribute, JSON-schema keyword of the bound).
LIMITED_FIELDS = {
    "prompt": ("max_prompt_chars", "maxLength"),
    "n": ("max_n", "maximum"),
    "seeds": ("max_n", "maxItems"),
    "steps": ("max_steps", "maximum"),
    "refs": ("max_refs", "maxItems"),
}


def schema_with_limits(openapi: dict, limits: Limits) -> dict:
    """A copy of the OpenAPI schema whose GenerateRequest bounds are this server's `limits` (the models carry the
    protocol's hard bounds), so that clients and fuzzers see what the server accepts."""
    out = copy.deepcopy(openapi)
    props = out.get("components", {}).get("schemas", {}).get("GenerateRequest", {}).get("properties", {})
    for name, (attr, keyword) in LIMITED_FIELDS.items():
        for variant in props.get(name, {}).get("anyOf", [props.get(name, {})]):  # `X | None`: the X variant
            if keyword in variant:
                variant[keyword] = getattr(limits, attr)
    return out


class Defaults(_Strict):
    """Values of fields a request leaves out (AppArgs.defaults); `steps` etc. unset -> the recipe's."""

    recipe: RecipeName = "full"
    width: int = Field(2048, ge=64, le=HARD_MAX_EDGE)
    height: int = Field(2048, ge=64, le=HARD_MAX_EDGE)
    exact_size: bool = False
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    n: int = Field(1, ge=1, le=HARD_MAX_N)


# -- request ------------------------------------------------------------------------------------------


class RefImage(_Strict):
    image: str = Field(..., min_length=1, description="base64 or data URL (data:image/png;base64,...)")
    role: Role | None = None


class LayoutBoxIn(_Strict):
    bbox: Annotated[list[float], Field(min_length=4, max_length=4)] = Field(
        ..., description="[x1, x2, y1, y2] as fractions of the output size (note the x-x-y-y order)"
    )
    text: Text = Field("", max_length=1000)


def _box_item(v: Any) -> Any:
    """A bare [x1, x2, y1, y2] is shorthand for {"bbox": [...]}; one model keeps error paths plain."""
    return {"bbox": v} if isinstance(v, (list, tuple)) else v


def _stage_list(v: Any) -> Any:
    return [v] if isinstance(v, dict) else v


BoxItem = Annotated[LayoutBoxIn, BeforeValidator(_box_item)]


class PruneStage(_Strict):
    at: float = Field(..., gt=0.0, lt=1.0, description="fraction of the steps after which to prune")
    keep: float = Field(..., gt=0.0, le=1.0, description="fraction of the remaining candidates to keep")


@dataclass(frozen=True)
class Effective:
    request: "GenerateRequest"
    kept: list[int]  # the original index of each ref the request keeps
    warnings: list[str]


class GenerateRequest(_Strict):
    prompt: Text = Field("", max_length=HARD_MAX_PROMPT)
    refs: list[RefImage] = Field(default_factory=list, max_length=HARD_MAX_REFS)
    layout_boxes: list[BoxItem] | None = Field(
        None, max_length=64, description="boxes [x1, x2, y1, y2] (fractions) or {bbox, text}; layout mode only"
    )
    width: int | None = Field(None, ge=64, le=HARD_MAX_EDGE)
    height: int | None = Field(None, ge=64, le=HARD_MAX_EDGE)
    exact_size: bool | None = None
    keep_original_aspect: bool = False
    recipe: RecipeName | None = None
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance: float | None = Field(None, ge=0.0, le=30.0, allow_inf_nan=False)
    shift: float | None = Field(None, ge=0.01, le=100.0, allow_inf_nan=False)
    scheduler: SchedulerName | None = None
    noise_scale_start: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)
    noise_scale_end: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)
    noise_clip_std: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="first seed; candidates use seed, seed+1, ...")
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(None, min_length=1, max_length=HARD_MAX_N)
    n: int | None = Field(None, ge=1, le=HARD_MAX_N, description="best-of-N; equals len(seeds) when both are given")
    return_: ReturnWhat = Field("winner", alias="return")
    prune: Annotated[list[PruneStage], BeforeValidator(_stage_list)] | None = Field(
        None, max_length=8, description="early pruning on previews: a stage {at, keep} or a list of stages"
    )
    preset: PresetName | None = Field(None, description="named settings for a goal (GET /v1/presets): shift, "
                                      "guidance and which ref roles to keep; fields given explicitly win")  # fmt: skip
    annotate_refs: bool = Field(False, description="put a sentence naming each ref by number and role in front "
                                "of the prompt (the effective prompt is in `settings.prompt`)")  # fmt: skip

    @field_validator("prune")
    @classmethod
    def _stages_in_step_order(cls, stages: list[PruneStage] | None) -> list[PruneStage] | None:
        if not stages:
            return stages
        stages = sorted(stages, key=lambda s: s.at)
        if len({s.at for s in stages}) != len(stages):
            raise PydanticCustomError("prune_stages", "two stages at the same step fraction")
        return stages

    def effective(self, mode: str) -> Effective:
        """The request as it runs: the preset applied (its refs dropped, its values where the client set none)
        and the prompt annotated; the original index of each kept ref; the preset's warnings."""
        roles = [r.role for r in self.refs]
        keep, values, warnings = list(range(len(self.refs))), {}, []
        if self.preset is not None:
            outcome = apply_preset(self.preset, mode, roles, self.model_fields_set, self.recipe)
            keep, values, warnings = outcome.keep, outcome.values, outcome.warnings
        refs = [self.refs[i] for i in keep]
        if self.annotate_refs and refs:
            values["prompt"] = " ".join(t for t in (annotation([r.role for r in refs]), self.prompt) if t)
        if not values and len(refs) == len(self.refs):
            return Effective(self, keep, warnings)
        return Effective(self.model_copy(update={**values, "refs": refs, "preset": None, "annotate_refs": False}),
                         keep, warnings)  # fmt: skip

    def settings_notes(self, mode: str) -> dict:
        """What `settings` reports beyond the engine's: the preset and the effective prompt, when they apply."""
        notes: dict = {}
        if self.preset is not None:
            notes["preset"] = self.preset
        prompt = self.effective(mode).request.prompt
        if prompt != self.prompt:
            notes["prompt"] = prompt
        return notes

    def prune_plan(self) -> PrunePlan | None:
        """The request's pruning (stages sorted and checked when it was parsed); None: no pruning."""
        return PrunePlan.of([(s.at, s.keep) for s in self.prune or ()])

    def seed_list(self, limits: Limits, defaults: Defaults) -> list[int]:
        if self.seeds is not None:
            if self.seed is not None:
                raise InvalidInput("seeds", "give either `seed` (first of a run) or `seeds` (explicit list), not both")
            if self.n is not None and self.n != len(self.seeds):
                raise InvalidInput("n", f"n={self.n} but {len(self.seeds)} seeds were given")
            if len(self.seeds) > limits.max_n:
                raise InvalidInput("seeds", f"at most {limits.max_n} seeds per request, got {len(self.seeds)}")
            if len(set(self.seeds)) != len(self.seeds):
                raise InvalidInput("seeds", "seeds must be distinct")
            return list(self.seeds)
        n = defaults.n if self.n is None else self.n
        if n > limits.max_n:
            raise InvalidInput("n", f"must be at most {limits.max_n}, got {n}")
        first = secrets.randbelow(RANDOM_SEED_BOUND) if self.seed is None else self.seed
        if first + n - 1 > MAX_SEED:
            raise InvalidInput("seed", f"seed + n - 1 must be at most {MAX_SEED}")
        return [first + i for i in range(n)]

    def to_engine(self, mode: str, limits: Limits, defaults: Defaults | None = None,
                  ref_budget: RefBudget | None = None) -> tuple[GenerationParams, list[int]]:  # fmt: skip
        """Engine params and the candidate seeds. Decodes the images (errors name `refs[i].image`), each reduced to
        what the engine will use, within `ref_budget` when given (api/images.py)."""
        defaults = defaults or Defaults()
        if mode not in MODES:
            raise InvalidInput("mode", f"must be one of {list(MODES)}, got {mode!r}")
        if len(self.prompt) > limits.max_prompt_chars:
            raise InvalidInput("prompt", f"at most {limits.max_prompt_chars} characters, got {len(self.prompt)}")
        if mode == "t2i" and not self.prompt.strip():
            raise InvalidInput("prompt", "t2i needs a non-empty prompt")
        if len(self.refs) > limits.max_refs:
            raise InvalidInput("refs", f"at most {limits.max_refs} reference images, got {len(self.refs)}")
        seeds = self.seed_list(limits, defaults)
        eff = self.effective(mode)
        req = eff.request
        edge = engine_ref_edge(mode, len(req.refs), defaults.width if self.width is None else self.width,
                               defaults.height if self.height is None else self.height,
                               defaults.exact_size if self.exact_size is None else self.exact_size,
                               self.keep_original_aspect, bool(self.layout_boxes))  # fmt: skip
        images = [
            decode_image(r.image, f"refs[{i}].image", limits.max_image_bytes, limits.max_image_pixels, edge=edge,
                         budget=ref_budget)  # fmt: skip
            for i, r in zip(eff.kept, req.refs)
        ]
        params = GenerationParams(
            mode=mode,
            prompt=req.prompt,
            refs=images,
            ref_roles=[r.role for r in req.refs],
            layout_boxes=self._engine_boxes(),
            width=defaults.width if self.width is None else self.width,
            height=defaults.height if self.height is None else self.height,
            exact_size=defaults.exact_size if self.exact_size is None else self.exact_size,
            keep_original_aspect=self.keep_original_aspect,
            recipe=defaults.recipe if req.recipe is None else req.recipe,
            steps=defaults.steps if self.steps is None else self.steps,
            guidance=req.guidance,
            shift=req.shift,
            scheduler=self.scheduler,
            noise_scale_start=self.noise_scale_start,
            noise_scale_end=self.noise_scale_end,
            noise_clip_std=self.noise_clip_std,
        )
        return params, seeds

    def _engine_boxes(self) -> list | None:
        if self.layout_boxes is None:
            return None
        return [{"bbox": list(b.bbox), "text": b.text} if b.text else list(b.bbox) for b in self.layout_boxes]


# -- response -----------------------------------------------------------------------------------------


class ScoreDetail(BaseModel):
    raw: float | None = Field(None, description="the scorer's own score (null: non-finite)")
    z: float | None = Field(None, description="z-score within the scored set (0 if n=1 or all equal)")
    weight: float | None = Field(None, description="its weight in the composite for this mode")


class CandidateOut(BaseModel):
    seed: int
    score: float | None = Field(None, description="composite score, sum of weight * z over the scorers; null when "
                                "unscored; for a pruned candidate, its preview's score among the previews")
    scores: dict[str, ScoreDetail] | None = Field(None, description="breakdown per scorer (pickscore, clip, "
                                                  "fidelity, sharpness, exposure)")
    image: str | None = Field(None, description="base64 PNG (with return=all)")
    pruned: bool = Field(False, description="stopped early by `prune`; `image` is then its last preview")
    pruned_at_step: int | None = None
    steps_computed: int = 0
    replica: str | None = None


class Winner(BaseModel):
    seed: int
    score: float | None
    image: str = Field(..., description="base64 PNG; its text chunks carry prompt, seed, mode and settings")


class Timings(BaseModel):
    validate_: float = Field(0.0, alias="validate", serialization_alias="validate")
    queued: float = Field(0.0, description="longest wait of a seed group before a replica started it")
    generate: float = Field(0.0, description="wall time of the fan-out, queueing included")
    score: float = 0.0
    score_compute: float = Field(0.0, description="the scorer's own time (PNG decoding, forwards); the rest of "
                                 "`score` is the trip of the PNGs and scores")  # fmt: skip
    total: float = 0.0

    model_config = ConfigDict(populate_by_name=True)


class GroupInfo(BaseModel):
    replica: str
    seeds: list[int]
    queued: float = Field(..., description="seconds before the replica started the group")
    seconds: float = Field(..., description="wall time of the call, as the router saw it")
    engine: float = Field(0.0, description="seconds in the denoising call")
    png: float = Field(0.0, description="seconds encoding the group's PNGs")
    preview_score: float = Field(0.0, description="within `engine`: seconds encoding previews and waiting for "
                                 "their scores (pruning)")  # fmt: skip
    dispatch: float | None = Field(None, description="seconds from the router's call to the replica starting "
                                   "it: waiting for a free replica and the job's transfer")  # fmt: skip
    returned: float | None = Field(None, description="seconds from the replica returning to the router "
                                   "holding the result: the transfer of its PNGs")  # fmt: skip


class Debug(BaseModel):
    replicas: dict[str, list[int]] = Field(default_factory=dict, description="generator replica -> seeds it made")
    groups: list[GroupInfo] = Field(default_factory=list)
    scorer: str | None = None


class GenerateResponse(BaseModel):
    id: str
    job_id: str | None = Field(None, description="the job this call ran as: GET /v1/jobs/{job_id} (its events, "
                               "images by URL) and POST /v1/jobs/{job_id}/cancel")  # fmt: skip
    mode: Mode
    scored: bool
    winner: Winner
    candidates: list[CandidateOut]
    settings: dict[str, Any]
    warnings: list[str]
    steps_computed: int
    steps_full: int
    timings: Timings
    debug: Debug


# -- errors -------------------------------------------------------------------------------------------


class FieldError(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    type: str = Field(..., description="invalid_input, payload_too_large, unavailable, timeout, not_found, ...")
    message: str
    field: str | None = Field(None, description="the request field at fault, as a path such as refs[0].image")
    request_id: str | None = None
    errors: list[FieldError] | None = Field(None, description="every field error, when there are several")


class ErrorResponse(BaseModel):
    """The body of every error answer (hidream_serve.api.errors builds it)."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "the body or a reference image is too large"},
    422: {"model": ErrorResponse, "description": "invalid input (the body, a field or the x-request-id header); "
          "`error.field` names it"},
    503: {"model": ErrorResponse, "description": "at capacity or not ready; retry after `Retry-After` seconds"},
    504: {"model": ErrorResponse, "description": "the request took too long"},
    500: {"model": ErrorResponse, "description": "an internal error; `error.request_id` finds it in the logs"},
}

