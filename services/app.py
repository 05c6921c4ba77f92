"""The application builder that `import_path: services.app:build_app` points at.

`AppArgs` (pydantic, unknown keys rejected) is the whole configuration: which checkpoint and scorer,
dtype/device, limits, request defaults, and the initial runtime tunables of each deployment (they
travel as Ray Serve `user_config`, so a later `serve deploy` can change them without a restart).
Replica counts, CPUs/GPUs, autoscaling and queue limits are Ray's own deployment options and live in
the YAML `deployments:` section (deploy/serve_config.yaml, deploy/local.yaml).
"""

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from hidream_serve.api.protocol import Defaults, Limits
from hidream_serve.embedded import (
    DEFAULT_DINO,
    DEFAULT_PICKSCORE,
    DEFAULT_SCORER,
    ENV_DINO,
    ENV_MODEL,
    ENV_PICKSCORE,
    ENV_PICKSCORE_PROCESSOR,
    ENV_SCORER,
    is_disabled,
    is_embedded,
    resolve_model,
)  # fmt: skip
from hidream_serve.engine.errors import InvalidInput
from hidream_serve.engine.params import recipe_for
from hidream_serve.engine.resolution import resolve_size

from .config import EngineOptions, GeneratorConfig, JobsConfig, JobStoreOptions, RouterConfig, ScorerConfig
from .fanout import group_size
from .generator import Generator
from .jobs import Jobs
from .messages import AppInfo
from .router import Router
from .scorer import Scorer

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "bfloat16", "float16", "float32"]


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description=f"checkpoint directory or 'embedded:tiny'; unset: ${ENV_MODEL}, "
                                                "else embedded:tiny")  # fmt: skip
    device: Device = "auto"
    dtype: DType = "auto"
    engine: EngineOptions = Field(default_factory=EngineOptions, description="pipeline load options (compile...)")
    scorer_model: str | None = Field(None, description="CLIP directory (prompt alignment), 'embedded:tiny-clip' or "
                                                       f"'none'; unset: ${ENV_SCORER}, else {DEFAULT_SCORER}")  # fmt: skip
    pickscore_model: str | None = Field(None, description="PickScore_v1 directory (human preference), "
                                        f"'embedded:tiny-pickscore' or 'none'; unset: ${ENV_PICKSCORE}, else the tiny "
                                        "one when the generator model is embedded, else none")  # fmt: skip
    pickscore_processor: str | None = Field(None, description="directory with PickScore's tokenizer and "
                                            "preprocessor_config.json (CLIP-ViT-H-14's) when the PickScore directory "
                                            f"lacks them; unset: ${ENV_PICKSCORE_PROCESSOR}, else the PickScore "
                                            "directory")  # fmt: skip
    dino_model: str | None = Field(None, description=f"DINOv2 directory (reference fidelity), 'embedded:tiny-dino' "
                                   f"or 'none' (fidelity then uses CLIP image embeddings); unset: ${ENV_DINO}, else "
                                   "the tiny one when the generator model is embedded, else none")  # fmt: skip
    scorer_device: Device = "auto"
    scorer_dtype: DType = "auto"
    limits: Limits = Field(default_factory=Limits)
    defaults: Defaults = Field(default_factory=Defaults)
    router: RouterConfig = Field(default_factory=RouterConfig, description="Router user_config (seeds_per_call...)")
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig, description="Generator user_config")
    scorer: ScorerConfig = Field(default_factory=ScorerConfig, description="Scorer user_config")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Jobs user_config (previews, retention...)")
    job_store: JobStoreOptions = Field(default_factory=JobStoreOptions, description="where jobs and results live")

    @model_validator(mode="after")
    def _pruning_can_rank(self) -> "AppArgs":
        """Pruning ranks the candidates of one engine batch, and a pruning request's seeds go to the
        generators in groups of max(seeds_per_call, prune_group_size): a group must fit one batch and hold
        at least two candidates, else some candidates could never be compared."""
        r, g = self.router, self.generator
        size = group_size(r, pruning=True)
        if r.prune_group_size < 2:
            raise ValueError(f"router.prune_group_size = {r.prune_group_size}: pruning needs at least 2 candidates "
                             "per group to rank")  # fmt: skip
        if size > g.max_batch:
            raise ValueError(f"a pruning group of max(router.seeds_per_call, router.prune_group_size) = {size} seeds "
                             f"is more than generator.max_batch = {g.max_batch} (the candidates one batch ranks); "
                             "raise generator.max_batch or lower those")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "AppArgs":
        """A default the limits reject would fail every request that leaves the field out, blaming a field the
        client never sent: refuse such a configuration at build time, naming the key."""
        d, lim = self.defaults, self.limits
        if d.n > lim.max_n:
            raise ValueError(f"defaults.n = {d.n} is more than limits.max_n = {lim.max_n}")
        steps = d.steps if d.steps is not None else recipe_for(d.recipe, 0).steps
        if steps > lim.max_steps:
            key = f"defaults.steps = {steps}" if d.steps is not None else f"defaults.recipe {d.recipe} ({steps} steps)"
            raise ValueError(f"{key} is more than limits.max_steps = {lim.max_steps}")
        try:
            width, height, _ = resolve_size(d.width, d.height, d.exact_size)
        except InvalidInput as e:
            raise ValueError(f"defaults.{e.field}: {e.message}") from None
        if width * height > lim.max_pixels:
            size = f"{width}x{height}" + ("" if (width, height) == (d.width, d.height) else " (snapped)")
            raise ValueError(f"defaults.width x defaults.height = {size} = {width * height} pixels is more than "
                             f"limits.max_pixels = {lim.max_pixels}")  # fmt: skip
        return self


def _display_name(spec: str) -> str:
    return spec if is_embedded(spec) else Path(spec).name or spec


def scorer_specs(args: AppArgs, model: str) -> dict[str, str | None]:
    """Each scorer's model spec (None: not configured). Unset scorers follow the generator: the
    tiny embedded ones beside the embedded model, none beside real weights (never random judges of real
    images)."""
    embedded = is_embedded(model)
    clip = resolve_model(args.scorer_model, ENV_SCORER, DEFAULT_SCORER if embedded else "none")
    pick = resolve_model(args.pickscore_model, ENV_PICKSCORE, DEFAULT_PICKSCORE if embedded else "none")
    dino = resolve_model(args.dino_model, ENV_DINO, DEFAULT_DINO if embedded else "none")
    processor = resolve_model(args.pickscore_processor, ENV_PICKSCORE_PROCESSOR, "none")
    specs = {"clip": clip, "pickscore": pick, "dino": dino}
    out: dict[str, str | None] = {k: None if is_disabled(v) else v for k, v in specs.items()}
    out["pickscore_processor"] = None if is_disabled(processor) or out["pickscore"] is None else processor
    return out


def assemble(args: AppArgs, options: dict[str, dict[str, Any]] | None = None) -> Application:
    """The application graph; `options` overrides Ray deployment options by name (used by tests)."""
    options = options or {}
    model = resolve_model(args.model, ENV_MODEL)
    specs = scorer_specs(args, model)
    scorer_on = any(specs[k] for k in ("clip", "pickscore", "dino"))  # all 'none': no scorer, no pruning

    scorer = None
    if scorer_on:
        sc = Scorer.options(user_config=args.scorer.model_dump(), **options.get("Scorer", {}))
        scorer = sc.bind(specs, args.scorer_device, args.scorer_dtype)
    gen = Generator.options(user_config=args.generator.model_dump(), **options.get("Generator", {}))
    engine = args.engine.model_dump(exclude_none=True)
    generator = gen.bind(model, args.device, args.dtype, scorer, engine)  # scorer handle: preview pruning
    info = AppInfo(model=model, model_name=_display_name(model),
                   scorers={k: specs[k] for k in ("pickscore", "clip", "dino")} if scorer_on else None,
                   limits=args.limits, defaults=args.defaults)  # fmt: skip
    jobs = Jobs.options(user_config=args.jobs.model_dump(), **options.get("Jobs", {}))
    jobs = jobs.bind(generator, scorer, info, args.job_store, args.router)
    router = Router.options(user_config=args.router.model_dump(), **options.get("Router", {}))
    return router.bind(scorer, info, jobs)


def build_app(args: AppArgs) -> Application:
    """Ray Serve app builder. Serve validates the YAML `args:` against the annotation (AppArgs, unknown keys
    rejected) before calling; a plain dict (older callers) is validated here."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    return assemble(args)
