"""Small images made in the tests (never read from disk)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.randint(0, 256, (h, w, channels), dtype=np.uint8), mode)


def solid_image(w: int, h: int, color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(img: Image.Image, fmt: str = "PNG", data_url: bool = False) -> str:
    s = base64.b64encode(encode(img, fmt)).decode()
    return f"data:image/{fmt.lower()};base64,{s}" if data_url else s
