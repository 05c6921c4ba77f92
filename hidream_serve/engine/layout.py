"""Layout mode: parse boxes and draw the layout reference image the model was trained with.

Boxes are [x1, x2, y1, y2] as fractions of the output size (note the x-x-y-y order), or items
{"bbox": [...], "text": "..."}; a dict wrapping the list under "boxes" (or "bboxes", "layout_bboxes",
"bbox_list") is accepted too. Unlike the official script, a malformed box is an error naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .errors import InvalidInput
from .sizing import fit_to_area

MAX_DRAWN_BOXES = 5
BOX_COLORS = (
    (255, 0, 0),
    (0, 180, 0),
    (0, 0, 255),
    (204, 180, 0),
    (255, 0, 255),
    (0, 255, 255),
    (128, 0, 0),
    (0, 128, 0),
    (0, 0, 128),
    (128, 128, 0),
)
_WRAPPER_KEYS = ("layout_bboxes", "bboxes", "boxes", "bbox_list")


@dataclass(frozen=True)
class LayoutBox:
    x1: float
    x2: float
    y1: float
    y2: float
    text: str = ""


def parse_layout_boxes(raw, field: str = "layout_boxes") -> list[LayoutBox]:
    if isinstance(raw, dict):
        key = next((k for k in _WRAPPER_KEYS if k in raw), None)
        if key is None:
            raise InvalidInput(field, f"a dict must hold the boxes under one of {list(_WRAPPER_KEYS)}")
        raw = raw[key]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise InvalidInput(field, "must be a non-empty list of boxes")
    return [_parse_box(item, f"{field}[{i}]") for i, item in enumerate(raw)]


def _parse_box(item, field: str) -> LayoutBox:
    text = ""
    if isinstance(item, dict):
        unknown = set(item) - {"bbox", "box", "text", "label"}
        if unknown:
            raise InvalidInput(field, f"unknown keys {sorted(unknown)}")
        bbox = item.get("bbox", item.get("box"))
        text = item.get("text", item.get("label")) or ""
        if not isinstance(text, str):
            raise InvalidInput(field, "text must be a string")
        if bbox is None:
            raise InvalidInput(field, "missing 'bbox'")
    else:
        bbox = item
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise InvalidInput(field, f"a box is 4 numbers [x1, x2, y1, y2], got {bbox!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise InvalidInput(field, f"box values must be finite numbers, got {bbox!r}")
    x1, x2, y1, y2 = (float(v) for v in bbox)
    if not all(0.0 <= v <= 1.0 for v in (x1, x2, y1, y2)):
        raise InvalidInput(field, f"box values are fractions of the image and must lie in [0, 1], got {bbox!r}")
    if not (x1 < x2 and y1 < y2):
        raise InvalidInput(field, f"box must satisfy x1 < x2 and y1 < y2 (order [x1, x2, y1, y2]), got {bbox!r}")
    return LayoutBox(x1, x2, y1, y2, text)


def _pixel_box(box: LayoutBox, width: int, height: int, field: str) -> tuple[int, int, int, int]:
    def clamp(v: float, hi: int) -> int:
        return max(0, min(hi - 1, int(round(v))))

    x1, x2 = clamp(box.x1 * width, width), clamp(box.x2 * width, width)
    y1, y2 = clamp(box.y1 * height, height), clamp(box.y2 * height, height)
    if x2 <= x1 or y2 <= y1:
        raise InvalidInput(field, f"box is empty at {width}x{height} pixels")
    return x1, y1, x2, y2


def render_layout(boxes: list[LayoutBox], width: int, height: int) -> tuple[Image.Image, list]:
    """Black canvas with the largest boxes outlined, thickest first. Returns the image and each box's colour
    (None for boxes beyond the drawn ones)."""
    pixel = [_pixel_box(b, width, height, f"layout_boxes[{i}]") for i, b in enumerate(boxes)]
    edge = math.sqrt(width * height)
    max_line = int(edge * 0.05)
    gap = max(1, max_line // MAX_DRAWN_BOXES)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    colors: list = [None] * len(boxes)
    area = lambda i: max(0, pixel[i][2] - pixel[i][0]) * max(0, pixel[i][3] - pixel[i][1])  # noqa: E731
    order = sorted(range(len(boxes)), key=area, reverse=True)[:MAX_DRAWN_BOXES]
    for rank, i in enumerate(order):
        color = BOX_COLORS[rank % len(BOX_COLORS)]
        colors[i] = color
        draw.rectangle(list(pixel[i]), outline=color, width=max(max_line - rank * gap, 5))
    return canvas, colors


def _inner_border(img: Image.Image, color, width: int) -> Image.Image:
    img = img.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for t in range(max(0, width)):
        draw.rectangle([t, t, w - 1 - t, h - 1 - t], outline=tuple(color))
    return img


def layout_references(refs: list[Image.Image], boxes: list[LayoutBox], width: int, height: int, ref_edge: int):
    """Refs framed in their box's colour, followed by the layout image."""
    layout_img, colors = render_layout(boxes, width, height)
    framed = []
    for i, ref in enumerate(refs):
        ref = fit_to_area(ref, ref_edge)
        color = colors[i] if i < len(colors) and colors[i] is not None else BOX_COLORS[i % len(BOX_COLORS)]
        framed.append(_inner_border(ref, color, int(math.sqrt(ref.width * ref.height) * 0.04)))
    return framed + [layout_img]
