"""Vision-tower inputs for the conditioning images, computed the way Qwen3-VL's image processor does.

Kept free of torchvision: resizing uses torch's native uint8 antialiased bicubic kernel (the one the
processor's torchvision backend reaches for uint8 images), and the rescale/normalise and patch
ordering follow the processor's math. `preprocessor_config.json` supplies the sizes and statistics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class VisionPreprocessConfig:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dir(cls, directory: str | Path) -> "VisionPreprocessConfig":
        path = Path(directory) / "preprocessor_config.json"
        raw = json.loads(path.read_text())
        size = raw.get("size") or {}
        return cls(
            patch_size=raw.get("patch_size", cls.patch_size),
            temporal_patch_size=raw.get("temporal_patch_size", cls.temporal_patch_size),
            merge_size=raw.get("merge_size", cls.merge_size),
            min_pixels=size.get("shortest_edge", raw.get("min_pixels", cls.min_pixels)),
            max_pixels=size.get("longest_edge", raw.get("max_pixels", cls.max_pixels)),
            image_mean=tuple(raw.get("image_mean", cls.image_mean)),
            image_std=tuple(raw.get("image_std", cls.image_std)),
            rescale_factor=raw.get("rescale_factor", cls.rescale_factor),
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Nearest size with both sides multiples of `factor` and the area inside [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _resize_uint8_bicubic(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # x: (3, H, W) uint8 -> (3, height, width) uint8. The processor's torchvision backend resizes uint8 images
    # with torch's native uint8 antialiased bicubic kernel (fixed point, uint8 between its two separable
    # passes); resizing in float and rounding once gives different pixels.
    return F.interpolate(x.cpu()[None], size=(height, width), mode="bicubic", align_corners=False, antialias=True)[0]


@dataclass
class VisionInputs:
    pixel_values: torch.Tensor  # (sum of grid cells, C * tp * p * p)
    grid_thw: torch.Tensor  # (n_images, 3) in vision patches
    tokens_per_image: list[int]  # image-pad tokens each image takes in the text (after merging)


def prepare_vision_inputs(images: list[Image.Image], cfg: VisionPreprocessConfig) -> VisionInputs:
    factor = cfg.patch_size * cfg.merge_size
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1) / cfg.rescale_factor
    std = torch.tensor(cfg.image_std).view(3, 1, 1) / cfg.rescale_factor
    all_patches, grids, counts = [], [], []
    for img in images:
        x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        h, w = smart_resize(x.shape[1], x.shape[2], factor, cfg.min_pixels, cfg.max_pixels)
        if (h, w) != tuple(x.shape[1:]):
            x = _resize_uint8_bicubic(x, h, w)
        x = (x.float() - mean) / std  # rescale and normalise fused, as the processor does
        p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
        gh, gw = h // p, w // p
        # (C, gh/m, m, p, gw/m, m, p) -> (gh/m, gw/m, m, m, C, p, p): merge windows stay contiguous
        x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, tp, -1, -1)  # a still image fills every temporal slot
        all_patches.append(x.reshape(gh * gw, 3 * tp * p * p))
        grids.append([1, gh, gw])
        counts.append(gh * gw // (m * m))
    return VisionInputs(torch.cat(all_patches), torch.tensor(grids, dtype=torch.long), counts)
