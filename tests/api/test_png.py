"""hidream_serve/png.py: the banded parallel PNG encoder against PIL's decoder and zlib's own checks."""

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from hidream_serve.api.images import PNG_SOFTWARE, encode_png, png_text
from hidream_serve.png import ROWS_PER_BAND, _adler32_combine, encode_rgb


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        out.append((kind, body))
        pos += 12 + length
    return out


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (ROWS_PER_BAND, 5), (ROWS_PER_BAND + 1, 64), (3 * ROWS_PER_BAND + 17, 33)])
def test_round_trip_is_lossless_and_the_stream_checks(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    smooth = np.add.outer(np.arange(shape[0]), np.arange(shape[1]))[..., None] * np.array([1, 2, 3])
    pixels = ((smooth + rng.integers(0, 9, (*shape, 3))) % 256).astype(np.uint8)
    with ThreadPoolExecutor(3) as pool:
        data = encode_rgb(pixels, [("Software", "t"), ("prompt", "a fox — ünïcode\nline 2")], 4, pool)
        assert data == encode_rgb(pixels, [("Software", "t"), ("prompt", "a fox — ünïcode\nline 2")], 4)  # pool-free
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.mode == "RGB" and img.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(img), pixels)
        assert img.text == {"Software": "t", "prompt": "a fox — ünïcode\nline 2"}
    chunks = _chunks(data)
    assert [k for k, _ in chunks] == [b"IHDR", b"tEXt", b"iTXt", b"IDAT", b"IEND"]
    raw = zlib.decompress(next(b for k, b in chunks if k == b"IDAT"))  # verifies the combined Adler-32
    assert len(raw) == shape[0] * (1 + 3 * shape[1])


def test_adler32_combine_matches_zlib():
    a, b = b"hello, " * 1000, bytes(range(256)) * 300
    assert _adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)
    assert _adler32_combine(1, zlib.adler32(b), len(b)) == zlib.adler32(b)


def test_encode_png_keeps_the_text_chunks_and_refuses_bad_pixels():
    img = Image.fromarray(np.full((40, 30, 3), 200, np.uint8))
    data = encode_png(img, {"prompt": "p", "seed": 7, "settings": {"steps": 2}, "skip": None})
    assert png_text(data) == {"Software": PNG_SOFTWARE, "prompt": "p", "seed": "7", "settings": '{"steps":2}'}
    with pytest.raises(ValueError, match="uint8"):
        encode_rgb(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="H, W, 3"):
        encode_rgb(np.zeros((4, 4), np.uint8))
