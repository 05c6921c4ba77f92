"""Pixels to patches and back (torch); the sizing arithmetic is in `sizing`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..vocabulary import PATCH_SIZE


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
