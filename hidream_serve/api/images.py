"""Image transport: decode client images (base64 or data URL) with limits, encode PNGs that carry their recipe.

Decoding checks the encoded size before decoding the base64, and the pixel count from the header before
decoding the pixels, so a hostile image never costs more than the limits allow. Every error names the
request field it came from (e.g. `refs[1].image`).

Memory: a reference is reduced at decode time to what the engine will use (`reduce_for_edge`: the same
halvings `engine.sizing.fit_to_area` would make, so the engine's output is unchanged), full-size decodes run
within a per-process pixel budget (`PixelBudget`), a request holds at most its `RefBudget.request_pixels`
after reduction, and `release_memory` hands freed heap back to the OS after large requests.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import ctypes.util
import io
import json
import re
import threading
import warnings
import weakref
from dataclasses import dataclass
from concurrent.futures import Executor
from typing import Any

import numpy as np

from PIL import Image, ImageOps, UnidentifiedImageError

from hidream_serve.engine.errors import InvalidInput, Overloaded
from hidream_serve.png import encode_rgb

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
PNG_SOFTWARE = "hidream-serve"


def decode_base64(data: str, field: str, max_bytes: int) -> bytes:
    """Raw bytes of a base64 string or a `data:<mime>;base64,` URL; whitespace inside is ignored."""
    if not isinstance(data, str) or not data:
        raise InvalidInput(field, "must be a non-empty base64 string or data URL")
    m = _DATA_URL.match(data)
    if m:
        mime = (m.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise InvalidInput(field, f"data URL must hold an image, got {mime!r}")
        data = data[m.end() :]
    elif data.startswith("data:"):
        raise InvalidInput(field, "data URLs must be base64-encoded (data:image/...;base64,...)")
    data = _WHITESPACE.sub("", data)
    if len(data) // 4 * 3 > max_bytes + 3:
        raise InvalidInput(field, f"image is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(field, "is not valid base64") from None
    if not raw:
        raise InvalidInput(field, "is empty")
    if len(raw) > max_bytes:
        raise InvalidInput(field, f"image is {len(raw)} bytes, more than {max_bytes}")
    return raw


class PixelBudget:
    """Pixels being decoded at full size at once in this process, across requests: a decode waits for its
    share, at most `wait_s`, then the request is refused as overloaded (503). One image larger than the whole
    budget waits for the budget to be free and then runs alone."""

    def __init__(self, pixels: int, wait_s: float):
        self.pixels, self.wait_s = pixels, wait_s
        self.in_use = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int, field: str):
        share = min(pixels, self.pixels)
        with self._cond:
            if not self._cond.wait_for(lambda: self.in_use + share <= self.pixels, timeout=self.wait_s):
                raise Overloaded(f"{field}: the server is decoding other large images; retry shortly")
            self.in_use += share
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= share
                self._cond.notify_all()


@dataclass
class RefBudget:
    """One request's reference decoding: at most `request_pixels` held after reduction, full-size decodes within
    the process's `in_flight` budget. `held` counts what this request holds so far."""

    request_pixels: int
    in_flight: PixelBudget | None = None
    release_at: int | None = None  # full-size pixels decoded from which the request gives memory back
    held: int = 0
    decoded: int = 0  # full-size pixels decoded so far

    @property
    def large(self) -> bool:
        return self.release_at is not None and self.decoded >= self.release_at

    def charge(self, img: Image.Image, field: str) -> None:
        self.held += img.width * img.height
        if self.held > self.request_pixels:
            raise InvalidInput(field, f"the references hold {self.held} pixels after reduction to the sizes the "
                               f"engine uses, more than this server's {self.request_pixels} per request")  # fmt: skip


def reduce_for_edge(img: Image.Image, edge: int) -> Image.Image:
    """Halve (box filter) while the short side is at least 2*edge: exactly the first stage of `fit_to_area(img,
    edge)`, so the engine's result is the same while the full-size pixels can be dropped at once."""
    while min(img.size) >= 2 * edge:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    return img


def decode_image(data: str, field: str, max_bytes: int, max_pixels: int, edge: int | None = None,
                 budget: RefBudget | None = None) -> Image.Image:  # fmt: skip
    """A client image as an RGB PIL image (EXIF orientation applied, transparency composited on white).

    With `edge` (the edge the engine resizes this reference to), the image is reduced to what the engine will use
    (`reduce_for_edge`) while it is decoded; `budget` bounds the pixels decoded at once and held per request."""
    raw = decode_base64(data, field, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            w, h = img.size
            if w < 1 or h < 1:
                raise InvalidInput(field, "image is empty")
            if w * h > max_pixels:
                raise InvalidInput(field, f"image is {w}x{h} = {w * h} pixels, more than {max_pixels}")
            in_flight = budget.in_flight if budget is not None else None
            with in_flight.hold(w * h, field) if in_flight is not None else contextlib.nullcontext():
                img.load()
                img = ImageOps.exif_transpose(img)
                if budget is not None:
                    budget.decoded += w * h
                if edge is not None:
                    # grey images halve in one band (the same values as their RGB copy), the rest as RGB
                    img = reduce_for_edge(img.convert("L") if img.mode in ("1", "L") else to_rgb(img), edge)
                img = to_rgb(img)
    except (InvalidInput, Overloaded):
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInput(field, f"cannot decode image: {type(e).__name__}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... on corrupt data
        raise InvalidInput(field, f"cannot decode image: {type(e).__name__}: {str(e)[:200]}") from None
    if budget is not None:
        budget.charge(img, field)
    return img


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def release_memory() -> bool:
    """Give the heap that freed images leave behind back to the OS (glibc `malloc_trim`; large decodes raise
    glibc's mmap threshold, so their successors land in a heap that is otherwise never returned)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:
        return False
    return bool(trim(0))


def release_after(held, budget: RefBudget | None) -> None:
    """After a request that decoded large references (`budget.large`): give the freed memory back now, and again
    once the object holding the reduced references (`held`, the request's params) is dropped."""
    if budget is not None and budget.large:
        release_memory()
        weakref.finalize(held, release_memory)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def encode_png(img: Image.Image, text: dict[str, Any] | None = None, compress_level: int = 4,
               pool: Executor | None = None) -> bytes:  # fmt: skip
    """RGB PNG bytes; every `text` entry becomes an iTXt chunk (non-strings as JSON) so the image can be reproduced.
    Deflated in bands on `pool`'s threads when given (`hidream_serve/png.py`)."""
    chunks = [("Software", PNG_SOFTWARE)]
    for key, value in (text or {}).items():
        if value is None:
            continue
        chunks.append((key, value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))))
    return encode_rgb(np.asarray(img.convert("RGB")), chunks, compress_level, pool)


def png_text(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG (what `encode_png` wrote)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return {k: str(v) for k, v in getattr(img, "text", {}).items()}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")
