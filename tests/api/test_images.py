"""Image transport without Ray: decoding with limits (errors name the field) and PNG text chunks."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from tests._images import b64, encode, noise_image, solid_image
from PIL import Image

from hidream_serve.api.images import decode_image, encode_png, png_text
from hidream_serve.engine.errors import InvalidInput

F = "refs[0].image"
MB = 2**20


def test_plain_base64_and_data_url_decode_to_the_same_rgb_pixels():
    img = noise_image(40, 30)
    a = decode_image(b64(img), F, MB, 10**6)
    b = decode_image(b64(img, data_url=True), F, MB, 10**6)
    assert a.mode == b.mode == "RGB" and a.size == (40, 30)
    assert np.array_equal(np.asarray(a), np.asarray(img)) and np.array_equal(np.asarray(a), np.asarray(b))


def test_whitespace_and_missing_padding_are_tolerated():
    s = b64(solid_image(8, 8))
    wrapped = "\n".join(s[i : i + 20] for i in range(0, len(s), 20)).rstrip("=")
    assert decode_image(wrapped, F, MB, 10**6).size == (8, 8)


def test_jpeg_and_rgba_are_converted_to_rgb_with_white_behind_transparency():
    assert decode_image(b64(noise_image(16, 16), "JPEG"), F, MB, 10**6).mode == "RGB"
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = decode_image(b64(rgba), F, MB, 10**6)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "data, why",
    [
        ("", "non-empty"),
        ("!!!not base64!!!", "not valid base64"),
        (base64.b64encode(b"definitely not an image").decode(), "cannot decode"),
        ("data:text/plain;base64," + base64.b64encode(b"hi").decode(), "must hold an image"),
        ("data:image/png,rawdata", "base64"),
    ],
)
def test_bad_data_names_the_field(data, why):
    with pytest.raises(InvalidInput) as e:
        decode_image(data, F, MB, 10**6)
    assert e.value.field == F and why in e.value.message


def test_truncated_image_is_a_named_error_not_a_crash():
    raw = encode(noise_image(64, 64))
    with pytest.raises(InvalidInput) as e:
        decode_image(base64.b64encode(raw[: len(raw) // 2]).decode(), "refs[3].image", MB, 10**6)
    assert e.value.field == "refs[3].image"


def test_too_many_bytes_is_rejected_before_decoding():
    data = b64(noise_image(200, 200))  # ~120 KB of noise
    with pytest.raises(InvalidInput) as e:
        decode_image(data, F, 50_000, 10**8)
    assert e.value.field == F and "bytes" in e.value.message


def test_too_many_pixels_is_rejected_from_the_header():
    big = Image.new("1", (5000, 4000))  # 20 Mpx, a few KB as PNG
    with pytest.raises(InvalidInput) as e:
        decode_image(b64(big), F, MB, 10_000_000)
    assert e.value.field == F and "pixels" in e.value.message


def test_png_text_chunks_carry_the_recipe():
    settings = {"width": 64, "height": 64, "steps": 2, "recipe": "full"}
    png = encode_png(solid_image(64, 64), {"prompt": "a fox — ünïcode", "seed": "7", "mode": "t2i",
                                           "settings": settings})  # fmt: skip
    text = png_text(png)
    assert text["prompt"] == "a fox — ünïcode" and text["seed"] == "7" and text["mode"] == "t2i"
    assert json.loads(text["settings"]) == settings and text["Software"] == "hidream-serve"
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_png_encoding_is_deterministic():
    img = noise_image(32, 32)
    assert encode_png(img, {"seed": "1"}) == encode_png(img.copy(), {"seed": "1"})
