"""The engine's own request object, recipes, and the rules that turn user settings into effective ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from ..vocabulary import MAX_SEED, MAX_STEPS, MODES, RECIPES, SCHEDULERS
from .errors import InvalidInput


# The distilled (dev) model's 28 fixed timesteps.
DEV_TIMESTEPS = (
    999, 987, 974, 960, 945, 929, 913, 895, 877, 857, 836, 814, 790, 764, 737,
    707, 675, 640, 602, 560, 515, 464, 409, 347, 278, 199, 110, 8,
)  # fmt: skip

# Initial-noise scale the official pipeline uses unless a recipe sets one.
DEFAULT_NOISE_SCALE = 8.0


@dataclass(frozen=True)
class Recipe:
    steps: int
    guidance: float
    shift: float
    scheduler: str
    timesteps: tuple[int, ...] | None = None
    noise_scale_start: float = DEFAULT_NOISE_SCALE
    noise_scale_end: float = DEFAULT_NOISE_SCALE
    noise_clip_std: float = 0.0


FULL = Recipe(steps=50, guidance=5.0, shift=3.0, scheduler="unipc")
DEV = Recipe(
    steps=28, guidance=0.0, shift=1.0, scheduler="flash", timesteps=DEV_TIMESTEPS,
    noise_scale_start=7.5, noise_scale_end=7.5, noise_clip_std=2.5,
)  # fmt: skip
# The dev recipe with exactly one reference (an edit) uses plain flow-match Euler, as the official script does.
DEV_SINGLE_REF = replace(DEV, scheduler="flow_match", noise_scale_start=DEFAULT_NOISE_SCALE,
                         noise_scale_end=DEFAULT_NOISE_SCALE, noise_clip_std=0.0)  # fmt: skip


def recipe_for(name: str, n_refs: int) -> Recipe:
    if name == "full":
        return FULL
    if name == "dev":
        return DEV_SINGLE_REF if n_refs == 1 else DEV
    raise InvalidInput("recipe", f"must be one of {list(RECIPES)}, got {name!r}")


@dataclass
class GenerationParams:
    """What to generate. Unset (None) settings take the recipe's values."""

    mode: str
    prompt: str
    refs: list[Image.Image] = field(default_factory=list)
    ref_roles: list[str | None] = field(default_factory=list)
    layout_boxes: Any = None
    width: int = 2048
    height: int = 2048
    exact_size: bool = False
    keep_original_aspect: bool = False
    recipe: str = "full"
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    scheduler: str | None = None
    noise_scale_start: float | None = None
    noise_scale_end: float | None = None
    noise_clip_std: float | None = None


@dataclass(frozen=True)
class SamplerSettings:
    """Effective denoising settings after the recipe and overrides are applied."""

    recipe: str
    steps: int
    guidance: float
    shift: float
    scheduler: str
    timesteps: tuple[int, ...] | None
    noise_scale_start: float
    noise_scale_end: float
    noise_clip_std: float

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0



def check_mode_inputs(p: GenerationParams) -> None:
    if p.mode not in MODES:
        raise InvalidInput("mode", f"must be one of {list(MODES)}, got {p.mode!r}")
    if not isinstance(p.prompt, str):
        raise InvalidInput("prompt", "must be a string")
    n = len(p.refs)
    rules = {
        "t2i": (n == 0, "t2i takes no refs"),
        "edit": (n == 1, f"edit takes exactly one ref, got {n}"),
        "ip": (n >= 1, "ip needs at least one ref"),
        "skeleton": (n >= 2, f"skeleton needs at least two refs (face, background, pose, garments...), got {n}"),
        "layout": (n >= 1, "layout needs at least one ref"),
    }
    ok, why = rules[p.mode]
    if not ok:
        raise InvalidInput("refs", why)
    if p.mode == "layout" and not p.layout_boxes:
        raise InvalidInput("layout_boxes", "layout mode needs boxes")
    if p.mode != "layout" and p.layout_boxes:
        raise InvalidInput("layout_boxes", f"only layout mode takes boxes, not {p.mode}")
    if p.keep_original_aspect and (n != 1 or p.mode == "layout"):
        raise InvalidInput("keep_original_aspect", f"needs exactly one ref and no layout (mode {p.mode}, {n} refs)")


def resolve_sampler(p: GenerationParams) -> tuple[SamplerSettings, list[str]]:
    """Recipe + overrides -> effective settings, with warnings for anything adjusted."""
    base = recipe_for(p.recipe, len(p.refs))
    warnings: list[str] = []
    steps = base.steps if p.steps is None else p.steps
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InvalidInput("steps", f"must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    timesteps = base.timesteps
    if timesteps is not None and steps != len(timesteps):
        warnings.append(f"recipe {p.recipe!r} has {len(timesteps)} fixed timesteps; with steps={steps} "
                        "the scheduler spaces them itself")  # fmt: skip
        timesteps = None
    scheduler = base.scheduler if p.scheduler is None else p.scheduler
    if scheduler not in SCHEDULERS:
        raise InvalidInput("scheduler", f"must be one of {list(SCHEDULERS)}, got {scheduler!r}")
    values = {}
    for name, default, lo, hi in (
        ("guidance", base.guidance, 0.0, 30.0),
        ("shift", base.shift, 0.01, 100.0),
        ("noise_scale_start", base.noise_scale_start, 0.0, 100.0),
        ("noise_scale_end", base.noise_scale_end, 0.0, 100.0),
        ("noise_clip_std", base.noise_clip_std, 0.0, 100.0),
    ):
        v = getattr(p, name)
        v = default if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise InvalidInput(name, f"must be a number in [{lo}, {hi}], got {v!r}")
        values[name] = float(v)
    if scheduler != "flash" and (p.noise_scale_end is not None or p.noise_clip_std is not None):
        warnings.append("noise_scale_end and noise_clip_std only act with the flash scheduler")
    if timesteps is not None and p.shift is not None:
        warnings.append(f"shift is not used: recipe {p.recipe!r} runs its {len(timesteps)} fixed timesteps "
                        "(shift applies with another number of steps)")  # fmt: skip
    if p.guidance is not None and 0.0 < values["guidance"] < 1.0:
        warnings.append("guidance below 1 acts as no guidance (classifier-free guidance runs only above 1)")
    return SamplerSettings(recipe=p.recipe, steps=steps, scheduler=scheduler, timesteps=timesteps, **values), warnings


def check_seeds(seeds: Sequence[int]) -> list[int]:
    if not seeds:
        raise InvalidInput("seeds", "at least one seed is needed")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise InvalidInput(f"seeds[{i}]", f"must be an integer in [0, {MAX_SEED}], got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise InvalidInput("seeds", "seeds must be distinct")
    return list(seeds)


def check_reference_image(img: Image.Image, field: str, max_pixels: int = 64_000_000) -> None:
    if img.width < 1 or img.height < 1:
        raise InvalidInput(field, "image is empty")
    if img.width * img.height > max_pixels:
        raise InvalidInput(field, f"image has {img.width * img.height} pixels, more than {max_pixels}")
    if max(img.size) / min(img.size) > 16:
        raise InvalidInput(field, f"aspect ratio {img.width}x{img.height} is too extreme (over 16:1)")
