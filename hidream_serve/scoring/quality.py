"""Weight-free quality guard: blur and exposure, a small tie-breaker in the composite.

Both work on the luma of the image scaled down so its longer side is at most `ANALYSIS_EDGE` (so the
numbers do not depend on the output size and a 2048x2048 image costs milliseconds); each takes the
image or its `luma`, so the composite computes the luma once for both:

- `sharpness` = log(1 + variance of the 4-neighbour Laplacian) of luma in [0, 255]: low for a blurry
  or flat picture. (It rises with noise too, which is why it is only a tie-breaker.)
- `exposure` = -(fraction of clipped pixels (luma <= 2 or >= 253) + |mean luma - 0.5|): 0 for a
  well-exposed picture, negative for a washed-out, crushed or too dark/bright one.

Higher is better for both.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

ANALYSIS_EDGE = 512
CLIP_LOW, CLIP_HIGH = 2, 253


def luma(img: Image.Image) -> np.ndarray:
    """Luma in [0, 255] of the image scaled down to at most `ANALYSIS_EDGE` on its longer side; what
    `sharpness` and `exposure` measure (compute it once and pass it to both)."""
    img = img.convert("RGB")
    w, h = img.size
    if max(w, h) > ANALYSIS_EDGE:
        s = ANALYSIS_EDGE / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32)
    return x @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def sharpness(img: Image.Image | np.ndarray) -> float:
    """Of an image, or of its `luma` if already computed."""
    y = img if isinstance(img, np.ndarray) else luma(img)
    if y.shape[0] < 3 or y.shape[1] < 3:
        return 0.0
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1]
    return math.log1p(float(lap.var()))


def exposure(img: Image.Image | np.ndarray) -> float:
    """Of an image, or of its `luma` if already computed."""
    y = img if isinstance(img, np.ndarray) else luma(img)
    clipped = float(((y <= CLIP_LOW) | (y >= CLIP_HIGH)).mean())
    return -(clipped + abs(float(y.mean()) / 255.0 - 0.5))
