"""Every input rule the engine enforces, run without the model, so a bad request never occupies a GPU.

Uses the engine's own rule functions (mode rules, reference images, sampler settings, resolution,
layout boxes) plus the operator's limits. What it cannot know without the model (tokenizer output,
exact per-ref sizes) the generator still checks, and its errors come back named the same way.
"""

from __future__ import annotations

from hidream_serve.engine.conditioning import check_reference_image
from hidream_serve.engine.errors import InvalidInput
from hidream_serve.engine.layout import parse_layout_boxes, render_layout
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
    width = height = None
    if not params.keep_original_aspect:
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
