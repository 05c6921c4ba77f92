"""Image transport: decode client images (base64 or data URL) with limits, encode PNGs that carry their recipe.

Decoding checks the encoded size before decoding the base64, and the pixel count from the header before
decoding the pixels, so a hostile image never costs more than the limits allow. Every error names the
request field it came from (e.g. `refs[1].image`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
from typing import Any

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from hidream_serve.engine.errors import InvalidInput

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


def decode_image(data: str, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """A client image as an RGB PIL image (EXIF orientation applied, transparency composited on white)."""
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
            img.load()
            img = ImageOps.exif_transpose(img)
    except InvalidInput:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInput(field, f"cannot decode image: {type(e).__name__}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... on corrupt data
        raise InvalidInput(field, f"cannot decode image: {type(e).__name__}: {str(e)[:200]}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def encode_png(img: Image.Image, text: dict[str, Any] | None = None, compress_level: int = 4) -> bytes:
    """PNG bytes; every `text` entry becomes an iTXt chunk (non-strings as JSON) so the image can be reproduced."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    for key, value in (text or {}).items():
        if value is None:
            continue
        s = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
        info.add_itxt(key, s)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


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
