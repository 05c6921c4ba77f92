"""Image sizing as the official pipeline does it (PIL resampling, patch-aligned crops), and the same
arithmetic without pixels, so that the ingress can tell a request's sizes without torch or the image work."""

from __future__ import annotations

import math

from PIL import Image

from ..vocabulary import KEEP_ASPECT_EDGE, PATCH_SIZE


def fit_size(width: int, height: int, edge: int, multiple: int = PATCH_SIZE, halve: bool = True) -> tuple[int, int]:
    """The size `fit_to_area` gives an image of this size: halved while the short side is at least 2*edge
    (`halve`), then the largest `multiple`-aligned size of area at most edge*edge at about its aspect."""
    w, h = width, height
    while halve and min(w, h) >= 2 * edge:
        w, h = w // 2, h // 2
    max_area = edge * edge
    scale = math.sqrt(max_area / (w * h))
    sides = [(round(w * scale), round(h * scale)), (round(w * scale), math.floor(h * scale)),
             (math.floor(w * scale), round(h * scale)), (math.floor(w * scale), math.floor(h * scale))]  # fmt: skip
    candidates = sorted(((a // multiple * multiple, b // multiple * multiple) for a, b in sides),
                        key=lambda s: s[0] * s[1], reverse=True)  # fmt: skip
    return next((c for c in candidates if c[0] * c[1] <= max_area), candidates[-1])


def ref_edge_for(n_refs: int, width: int, height: int) -> int:
    """Edge (sqrt of area) each reference is resized to, by how many references share the sequence."""
    longest = max(width, height)
    if n_refs == 1:
        return longest
    if n_refs == 2:
        return longest * 48 // 64
    if n_refs <= 4:
        return longest // 2
    if n_refs <= 8:
        return longest * 24 // 64
    return longest // 4


def keep_aspect_size(width: int, height: int) -> tuple[int, int]:
    """The output size `keep_original_aspect` gives for a first reference of this size."""
    return fit_size(width, height, KEEP_ASPECT_EDGE)


def fit_to_area(img: Image.Image, edge: int, multiple: int = PATCH_SIZE) -> Image.Image:
    """Resize so the area is at most edge*edge with both sides multiples of `multiple`; centre-crop the excess.

    Very large inputs are first halved with box filtering (cheap and alias-free), then one bicubic
    resize to cover the target, then a centred crop.
    """
    while min(img.size) >= 2 * edge:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    w, h = img.size
    tw, th = fit_size(w, h, edge, multiple, halve=False)
    if tw <= 0 or th <= 0:
        raise ValueError(f"image of size {w}x{h} is too small or too elongated to fit {edge}x{edge}")
    if w / tw < h / th:  # width is the tighter side: scale by width, crop height
        new_h = round(h / (w / tw))
        img = img.resize([tw, new_h], resample=Image.BICUBIC)
        top = (new_h - th) // 2
        return img.crop((0, top, tw, top + th))
    new_w = round(w / (h / th))
    img = img.resize([new_w, th], resample=Image.BICUBIC)
    left = (new_w - tw) // 2
    return img.crop((left, 0, left + tw, th))


def size_for_area(edge: int, aspect: float) -> tuple[int, int]:
    """Width and height (multiples of 32, floored) of an edge*edge area at the given aspect ratio."""
    w = math.sqrt(edge * edge * aspect)
    h = w / aspect
    return int(w / 32) * 32, int(h / 32) * 32


