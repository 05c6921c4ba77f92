"""The application builder that `import_path: services.app:build_app` points at.

`AppArgs` (pydantic, unknown keys rejected) is the whole configuration: which checkpoint and scorer,
dtype/device, limits, request defaults, and the initial runtime tunables of each deployment (they
travel as Ray Serve `user_config`, so a later `serve deploy` can change them without a restart).
Replica counts, CPUs/GPUs, autoscaling and queue limits are Ray's own deployment options and live in
the YAML `deployments:` section (deploy/serve_config.yaml, deploy/local.yaml).
"""

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from hidream_serve.api.protocol import Defaults, Limits
from hidream_serve.embedded import DEFAULT_SCORER, DISABLED, ENV_MODEL, ENV_SCORER, is_embedded, resolve_model

from .config import EngineOptions, GeneratorConfig, RouterConfig, ScorerConfig
from .generator import Generator
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
    scorer_model: str | None = Field(None, description=f"CLIP directory, 'embedded:tiny-clip' or 'none'; unset: "
                                                       f"${ENV_SCORER}, else {DEFAULT_SCORER}")  # fmt: skip
    scorer_device: Device = "auto"
    scorer_dtype: DType = "auto"
    limits: Limits = Field(default_factory=Limits)
    defaults: Defaults = Field(default_factory=Defaults)
    router: RouterConfig = Field(default_factory=RouterConfig, description="Router user_config (seeds_per_call...)")
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig, description="Generator user_config")
    scorer: ScorerConfig = Field(default_factory=ScorerConfig, description="Scorer user_config")


def _display_name(spec: str) -> str:
    return spec if is_embedded(spec) else Path(spec).name or spec


def assemble(args: AppArgs, options: dict[str, dict[str, Any]] | None = None) -> Application:
    """The application graph; `options` overrides Ray deployment options by name (used by tests)."""
    options = options or {}
    model = resolve_model(args.model, ENV_MODEL)
    scorer_spec = resolve_model(args.scorer_model, ENV_SCORER, DEFAULT_SCORER)
    scorer_on = scorer_spec.lower() not in DISABLED

    scorer = None
    if scorer_on:
        sc = Scorer.options(user_config=args.scorer.model_dump(), **options.get("Scorer", {}))
        scorer = sc.bind(scorer_spec, args.scorer_device, args.scorer_dtype)
    gen = Generator.options(user_config=args.generator.model_dump(), **options.get("Generator", {}))
    engine = args.engine.model_dump(exclude_none=True)
    generator = gen.bind(model, args.device, args.dtype, scorer, engine)  # scorer handle: preview pruning
    info = {
        "model": model, "model_name": _display_name(model), "scorer": scorer_spec if scorer_on else None,
        "limits": args.limits.model_dump(), "defaults": args.defaults.model_dump(),
    }  # fmt: skip
    router = Router.options(user_config=args.router.model_dump(), **options.get("Router", {}))
    return router.bind(generator, scorer, info)


def build_app(args: AppArgs) -> Application:
    """Ray Serve app builder. Serve validates the YAML `args:` against the annotation (AppArgs, unknown keys
    rejected) before calling; a plain dict (older callers) is validated here."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    return assemble(args)
