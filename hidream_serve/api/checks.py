"""Every input rule the engine enforces, run without the model, so a bad request never occupies a GPU.

Uses the engine's own rule functions (mode rules, reference images, sampler settings, resolution,
layout boxes) plus the operator's limits. What it cannot know without the model (tokenizer output,
exact per-ref sizes) the generator still checks, and its errors come back named the same way.
"""

from __future__ import annotations

import math

from hidream_serve.engine.conditioning import KEEP_ASPECT_EDGE, check_reference_image
from hidream_serve.engine.errors import InvalidInput
from hidream_serve.engine.layout import parse_layout_boxes, render_layout
from hidream_serve.engine.network import PATCH_SIZE
from hidream_serve.engine.params import GenerationParams, check_mode_inputs, resolve_sampler
from hidream_serve.engine.pipeline import check_seeds
from hidream_serve.engine.resolution import resolve_size

from .protocol import Limits


def precheck(params: GenerationParams, seeds: list[int], limits: Limits) -> dict:
    """Raises InvalidInput naming the field; returns the effective settings known before generating."""
    check_seeds(seeds)
    check_mode_inputs(params)
    for i, img in enumerate(params.refs):
        check_reference_image(img, f"refs[{i}].image", max_pixels=limits.max_image_pixels)
    sampler, warnings = resolve_sampler(params)
    if sampler.steps > limits.max_steps:
        field = "steps" if params.steps is not None else "recipe"
        raise InvalidInput(field, f"{sampler.steps} steps is more than this server's limit of {limits.max_steps}")
    if params.keep_original_aspect:  # the output takes the reference's aspect at about KEEP_ASPECT_EDGE**2
        width, height = keep_aspect_size(*params.refs[0].size)
        if width * height > limits.max_pixels:
            raise InvalidInput("keep_original_aspect", f"the output would be {width}x{height} = {width * height} "
                               f"pixels, more than this server's limit of {limits.max_pixels}")  # fmt: skip
    else:
        width, height, warn = resolve_size(params.width, params.height, params.exact_size)
        if width * height > limits.max_pixels:
            raise InvalidInput("width", f"width*height = {width * height} is more than this server's "
                               f"limit of {limits.max_pixels} pixels")  # fmt: skip
        if warn:
            warnings.append(warn)
    if params.mode == "layout":
        boxes = parse_layout_boxes(params.layout_boxes)
        render_layout(boxes, width, height)  # rejects boxes that are empty at the output size
    return {"width": width, "height": height, "steps": sampler.steps, "recipe": sampler.recipe,
            "guidance": sampler.guidance, "warnings": warnings}  # fmt: skip


def keep_aspect_size(width: int, height: int, edge: int = KEEP_ASPECT_EDGE) -> tuple[int, int]:
    """The output size `keep_original_aspect` gives for a reference of this size: the sizing arithmetic of
    `hidream_serve.engine.images.fit_to_area` (halve while the short side is at least 2*edge, then the
    largest patch-aligned size of area at most edge*edge), without touching the pixels."""
    w, h = width, height
    while min(w, h) >= 2 * edge:
        w, h = w // 2, h // 2
    max_area = edge * edge
    scale = math.sqrt(max_area / (w * h))
    sides = [(round(w * scale), round(h * scale)), (round(w * scale), math.floor(h * scale)),
             (math.floor(w * scale), round(h * scale)), (math.floor(w * scale), math.floor(h * scale))]  # fmt: skip
    candidates = sorted(((a // PATCH_SIZE * PATCH_SIZE, b // PATCH_SIZE * PATCH_SIZE) for a, b in sides),
                        key=lambda s: s[0] * s[1], reverse=True)  # fmt: skip
    return next((c for c in candidates if c[0] * c[1] <= max_area), candidates[-1])
