"""Every input rule the engine enforces, run without the model, so a bad request never occupies a GPU.

Uses the engine's own rule functions (mode rules, reference images, sampler settings, resolution,
layout boxes) plus the operator's limits. What it cannot know without the model (tokenizer output,
exact per-ref sizes) the generator still checks, and its errors come back named the same way.
"""

from __future__ import annotations

from hidream_serve.engine.errors import InvalidInput
from hidream_serve.engine.layout import MAX_DRAWN_BOXES, LayoutBox, parse_layout_boxes, render_layout
from hidream_serve.engine.params import (
    GenerationParams,
    check_mode_inputs,
    check_reference_image,
    check_seeds,
    resolve_sampler,
)  # fmt: skip
from hidream_serve.engine.resolution import resolve_size
from hidream_serve.engine.sizing import fit_size, keep_aspect_size, ref_edge_for
from hidream_serve.presets import findings_warnings
from hidream_serve.scoring.pruning import PrunePlan
from hidream_serve.vocabulary import PATCH_SIZE

from .protocol import Limits


def precheck(params: GenerationParams, seeds: list[int], limits: Limits, prune: PrunePlan | None = None) -> dict:
    """Raises InvalidInput naming the field; returns the effective settings known before generating, with a
    warning for every input that will have no effect."""
    check_seeds(seeds)
    check_mode_inputs(params)
    for i, img in enumerate(params.refs):
        check_reference_image(img, f"refs[{i}].image", max_pixels=limits.max_image_pixels)
    sampler, warnings = resolve_sampler(params)
    if sampler.steps > limits.max_steps:
        field = "steps" if params.steps is not None else "recipe"
        raise InvalidInput(field, f"{sampler.steps} steps is more than this server's limit of {limits.max_steps}")
    check_schedule(sampler)
    if params.keep_original_aspect:  # the output takes the first reference's aspect
        width, height = keep_aspect_size(*params.refs[0].size)
        if width * height > limits.max_pixels:
            raise InvalidInput("keep_original_aspect", f"the output would be {width}x{height} = {width * height} "
                               f"pixels, more than this server's limit of {limits.max_pixels}")  # fmt: skip
    else:
        width, height, warn = resolve_size(params.width, params.height, params.exact_size)
        if width * height > limits.max_pixels:
            if (width, height) == (params.width, params.height):
                raise InvalidInput("width", f"width*height = {width * height} is more than this server's "
                                   f"limit of {limits.max_pixels} pixels")  # fmt: skip
            raise InvalidInput("width", f"{params.width}x{params.height} snaps to the trained size {width}x{height} "
                               f"= {width * height} pixels, more than this server's limit of {limits.max_pixels}; "
                               "with exact_size=true the size is used as given")  # fmt: skip
        if warn:
            warnings.append(warn)
        check_reference_sizes(params, width, height)
    if params.mode == "layout":
        boxes = parse_layout_boxes(params.layout_boxes)
        _, colors = render_layout(boxes, width, height)  # rejects boxes that are empty at the output size
        warnings += layout_warnings(boxes, colors, len(params.refs))
    warnings += findings_warnings(list(params.ref_roles), params.prompt, width, height, sampler.recipe,
                                  sampler.guidance)  # fmt: skip
    if prune is not None and len(seeds) < 2:
        warnings.append("prune has no effect with a single candidate: there is nothing to rank")
    return {"width": width, "height": height, "steps": sampler.steps, "recipe": sampler.recipe,
            "guidance": sampler.guidance, "warnings": warnings}  # fmt: skip


def check_reference_sizes(params: GenerationParams, width: int, height: int) -> None:
    """Each reference, and a layout's box picture (the output's size), must keep at least one patch each way at
    the edge that the number of references gives it at this output size (engine/sizing.ref_edge_for)."""
    with_boxes = params.mode == "layout" and bool(params.layout_boxes)
    sizes = [r.size for r in params.refs] + ([(width, height)] if with_boxes and params.refs else [])
    if not sizes:
        return
    edge = ref_edge_for(len(sizes), width, height)
    for i, (w, h) in enumerate(sizes):
        fw, fh = fit_size(w, h, edge)
        if fw > 0 and fh > 0:
            continue
        what = f"{len(sizes)} references (the layout picture counts as one)" if with_boxes else f"{len(sizes)} references"
        field = f"refs[{i}].image" if i < len(params.refs) else "width"
        shape = f"a {w}x{h} image" if i < len(params.refs) else f"the {w}x{h} layout picture"
        raise InvalidInput(field, f"{shape} would be resized to less than one {PATCH_SIZE}-pixel patch: with {what} "
                           f"each gets an edge of {edge} px at the output size {width}x{height}; use a larger "
                           "width/height, fewer references or a less elongated image")  # fmt: skip


def layout_warnings(boxes: list[LayoutBox], colors: list, n_refs: int) -> list[str]:
    """What the layout image will not show. As in the official pipeline, box text is parsed but never drawn,
    only the largest boxes are drawn, and ref i is framed in box i's colour (a ref without a drawn box gets a
    colour that places it nowhere)."""
    warnings = []
    with_text = [i for i, b in enumerate(boxes) if b.text]
    if with_text:
        warnings.append(f"{_fields('layout_boxes', with_text, '.text')} not used: the layout image shows only the "
                        "boxes; describe what goes in a box in the prompt")  # fmt: skip
    undrawn = [i for i, c in enumerate(colors) if c is None]
    if undrawn:
        warnings.append(f"{_fields('layout_boxes', undrawn)} not drawn: only the {MAX_DRAWN_BOXES} largest boxes "
                        "are drawn")  # fmt: skip
    unplaced = [i for i in range(n_refs) if i >= len(colors) or colors[i] is None]
    if unplaced:
        warnings.append(f"{_fields('refs', unplaced)}: no drawn box (ref i goes in layout_boxes[i]): nothing "
                        "places them")  # fmt: skip
    empty = [i for i in range(n_refs, len(boxes)) if colors[i] is not None]
    if empty:
        warnings.append(f"{_fields('layout_boxes', empty)}: no reference image (box i holds refs[i]): "
                        "drawn without a subject")  # fmt: skip
    return warnings


def _fields(name: str, idx: list[int], suffix: str = "") -> str:
    return ", ".join(f"{name}[{i}]{suffix}" for i in idx)


def _schedule_works(scheduler: str, shift: float, steps: int, timesteps) -> bool:
    from hidream_serve.engine.schedulers import make_scheduler  # torch, loaded on first use, not at import

    try:
        make_scheduler(scheduler, shift).set_timesteps(steps, list(timesteps) if timesteps else None)
    except ValueError:
        return False
    return True


def check_schedule(sampler) -> None:
    """A large `shift` squeezes the first integer timesteps together (UniPC: from 25 at 50 steps), and a schedule
    whose first timestep repeats cannot be run; refuse it naming `shift` and the largest value (0.01 steps) that
    works for these steps, before a GPU is asked."""
    if _schedule_works(sampler.scheduler, sampler.shift, sampler.steps, sampler.timesteps):
        return
    lo, hi = 1, int(round(sampler.shift * 100))  # in hundredths; shift 0.01 always works
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _schedule_works(sampler.scheduler, mid / 100, sampler.steps, sampler.timesteps):
            lo = mid
        else:
            hi = mid - 1
    raise InvalidInput("shift", f"shift={sampler.shift:g} gives {sampler.steps} steps of the {sampler.scheduler} "
                                f"scheduler a repeated first timestep; the largest shift that works for "
                                f"{sampler.steps} steps is {lo / 100:g}")  # fmt: skip
