"""How alike two images are: PSNR and SSIM on 8-bit RGB images (what `hidream-serve compare` reports).

- `psnr`: 10 log10(255^2 / MSE) in dB over all pixels and the three channels; inf for identical images.
- `ssim`: the structural similarity of Wang et al. (2004) on luma (BT.601 weights, [0, 255]): Gaussian
  window 11x11 with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, the mean of the SSIM map over the windows that
  lie inside the image (no padding, as in the authors' reference implementation). 1.0 for identical images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PEAK = 255.0
WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _pixels(img: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in [0, 255]."""
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    x = np.asarray(img, dtype=np.float64)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {x.shape}")
    return x


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = _pixels(a), _pixels(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape[1]}x{x.shape[0]} vs {y.shape[1]}x{y.shape[0]}")
    return x, y


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    x, y = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK**2 / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """Normalized 1-D Gaussian of `size` taps (float64)."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, valid region only: (H, W) -> (H - n + 1, W - n + 1)."""
    x = x[None, None]
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))[0, 0]


def ssim(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    x, y = _pair(a, b)
    if min(x.shape[:2]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels, got {x.shape[1]}x{x.shape[0]}")
    w = np.asarray(LUMA_WEIGHTS)
    lx, ly = torch.from_numpy(x @ w), torch.from_numpy(y @ w)
    g = gaussian_window()
    mx, my = _filter(lx, g), _filter(ly, g)
    vx = _filter(lx * lx, g) - mx * mx
    vy = _filter(ly * ly, g) - my * my
    cov = _filter(lx * ly, g) - mx * my
    c1, c2 = (K1 * PEAK) ** 2, (K2 * PEAK) ** 2
    smap = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(smap.mean())
