"""Pixel-side image sizing, as the official pipeline does it (PIL resampling, patch-aligned crops)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .network import PATCH_SIZE


def fit_to_area(img: Image.Image, edge: int, multiple: int = PATCH_SIZE) -> Image.Image:
    """Resize so the area is at most edge*edge with both sides multiples of `multiple`; centre-crop the excess.

    Very large inputs are first halved with box filtering (cheap and alias-free), then one bicubic
    resize to cover the target, then a centred crop.
    """
    while min(img.size) >= 2 * edge:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    w, h = img.size
    max_area = edge * edge
    scale = math.sqrt(max_area / (w * h))
    candidates = [
        (round(w * scale) // multiple * multiple, round(h * scale) // multiple * multiple),
        (round(w * scale) // multiple * multiple, math.floor(h * scale) // multiple * multiple),
        (math.floor(w * scale) // multiple * multiple, round(h * scale) // multiple * multiple),
        (math.floor(w * scale) // multiple * multiple, math.floor(h * scale) // multiple * multiple),
    ]
    candidates.sort(key=lambda s: s[0] * s[1], reverse=True)
    tw, th = next((c for c in candidates if c[0] * c[1] <= max_area), candidates[-1])
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


def to_patches(img: Image.Image) -> torch.Tensor:
    """RGB image in [-1, 1] as 32x32 patches in row-major order: (H/32 * W/32, 3*32*32), channel-major per patch."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())  # (H, W, 3)
    x = x.permute(2, 0, 1).float() / 255.0
    x = (x - 0.5) / 0.5
    return patchify(x[None])[0]


def patchify(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/32 * W/32, C*32*32): patches in row-major order, channel-major within a patch."""
    b, c, h, w = x.shape
    p = PATCH_SIZE
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def patches_to_uint8(x01: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Patches already mapped to [0, 1], (L, 3072) or (B, L, 3072) -> uint8 array (H, W, 3) or (B, H, W, 3),
    rounded like the official decode (x * 255, clipped, rounded half to even).

    The arithmetic runs where the tensor is, so a GPU result crosses to the host as bytes, not floats.
    """
    p = PATCH_SIZE
    lead = x01.shape[:-2]
    x = x01.float().reshape(*lead, height // p, width // p, 3, p, p)
    n = len(lead)
    x = x.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)  # (..., H/p, p, W/p, p, 3)
    x = x.reshape(*lead, height, width, 3)
    return torch.round(torch.clamp(x * 255, 0, 255)).to(torch.uint8).cpu().numpy()
