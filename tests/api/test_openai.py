"""The OpenAI-compatible Images API through the real `openai` client, against the in-process service (Ray Serve,
tiny embedded models, CPU): generate (b64 and url), edit (one image and several, roles), streaming partial images,
and errors as openai.BadRequestError naming the param."""

from __future__ import annotations

import base64
import io
import time

import pytest
from PIL import Image
from tests._images import encode, noise_image
from tests._serve import cpu_options, running_service, tiny_app_args

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

LIMITS = {"max_n": 4, "max_steps": 200, "max_pixels": 512 * 512, "max_refs": 4, "max_image_bytes": 200_000,
          "max_image_pixels": 1_000_000, "max_prompt_chars": 200}  # fmt: skip
FAST = {"steps": 4}


def service_args():
    return tiny_app_args(
        router={"seeds_per_call": 2, "generate_timeout_s": 120, "score_timeout_s": 60, "retry_after_s": 1},
        defaults={"width": 64, "height": 64, "exact_size": True, "steps": 2}, limits=LIMITS,
        jobs={"preview_at": [0.25, 0.5, 0.75], "preview_size": 64},
    )  # fmt: skip


OPTIONS = cpu_options({"num_replicas": 1, "max_ongoing_requests": 2})


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(str(tmp_path_factory.mktemp("hidream-cache")), service_args(), OPTIONS) as http:
        yield http


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=str(service.base_url).rstrip("/") + "/v1", api_key="not-checked", max_retries=0, timeout=180,
                         http_client=openai.DefaultHttpxClient(trust_env=False))  # fmt: skip


def png_of(b64_json: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64_json)))


def test_generate_b64_then_url_gives_the_same_image(client, service):
    out = client.images.generate(prompt="a red cube", n=2, size="64x64",
                                 extra_body={"seed": 11, "best_of": 2, **FAST})  # fmt: skip
    assert len(out.data) == 2 and out.size == "64x64" and out.output_format == "png"
    seeds = [d.model_extra["seed"] for d in out.data]
    assert seeds[0] in (11, 12) and seeds[1] in (13, 14)  # image i: candidates seed + 2i, seed + 2i + 1
    for d in out.data:
        im = png_of(d.b64_json)
        assert im.format == "PNG" and im.size == (64, 64) and im.text["seed"] == str(d.model_extra["seed"])
    job = service.get(f"/v1/jobs/{out.data[0].model_extra['job_id']}").json()
    assert [c["seed"] for c in job["candidates"]] == [11, 12] and job["status"] == "succeeded"

    one = {"prompt": "a red cube", "n": 1, "size": "64x64", "extra_body": {"seed": 40, **FAST}}
    url = client.images.generate(response_format="url", **one).data[0].url
    assert url.startswith(str(service.base_url)) and url.endswith("/images/40.png")
    fetched = httpx.get(url, trust_env=False)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    b64_json = client.images.generate(**one).data[0].b64_json
    assert fetched.content == base64.b64decode(b64_json)  # same seed, same settings, same PNG


def test_quality_maps_to_a_recipe_and_output_format_is_honoured(client, service):
    out = client.images.generate(prompt="a blue sphere", quality="low", output_format="jpeg", output_compression=70,
                                 response_format="url", extra_body={"seed": 3, **FAST})  # fmt: skip
    job = service.get(f"/v1/jobs/{out.data[0].model_extra['job_id']}").json()
    assert job["result"]["settings"]["recipe"] == "dev" and job["settings"]["recipe"] == "dev"
    assert out.data[0].url.endswith(".jpeg?compression=70")
    jpeg = httpx.get(out.data[0].url, trust_env=False)
    assert jpeg.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    missing = httpx.get(out.data[0].url.replace("/3.jpeg", "/4.jpeg"), trust_env=False)
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "seed"

    webp = client.images.generate(prompt="a blue sphere", quality="high", output_format="webp", size="auto",
                                  extra_body={"seed": 3, **FAST})  # fmt: skip
    assert png_of(webp.data[0].b64_json).format == "WEBP" and webp.size == "64x64"  # auto: the server's default
    job = service.get(f"/v1/jobs/{webp.data[0].model_extra['job_id']}").json()
    assert job["result"]["settings"]["recipe"] == "full"


def test_edit_one_image_is_edit_several_are_ip_and_mode_roles_choose_others(client, service):
    a, b = encode(noise_image(64, 64, seed=1)), encode(noise_image(64, 64, seed=2))
    one = client.images.edit(image=("a.png", a, "image/png"), prompt="make it blue",  # one file: the `image` part
                             extra_body={"seed": 5, **FAST})  # fmt: skip
    assert png_of(one.data[0].b64_json).size == (64, 64)
    assert service.get(f"/v1/jobs/{one.data[0].model_extra['job_id']}").json()["mode"] == "edit"

    two = client.images.edit(image=[("a.png", a, "image/png"), ("b.png", b, "image/png")], prompt="together",
                             extra_body={"seed": 5, **FAST})  # fmt: skip
    assert service.get(f"/v1/jobs/{two.data[0].model_extra['job_id']}").json()["mode"] == "ip"

    roles = client.images.edit(image=[("a.png", a, "image/png"), ("b.png", b, "image/png")], prompt="dress her",
                               extra_body={"mode": "skeleton", "roles": ["face", "garment"], "seed": 5, **FAST})  # fmt: skip
    job = service.get(f"/v1/jobs/{roles.data[0].model_extra['job_id']}").json()
    assert job["mode"] == "skeleton" and job["status"] == "succeeded"


def test_stream_sends_partial_images_then_completed(client):
    stream = client.images.generate(prompt="a green pyramid", stream=True, partial_images=2,
                                    extra_body={"seed": 21, **FAST})  # fmt: skip
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert png_of(e.b64_json).format == "PNG"
    assert events[-1].size == "64x64" and events[-1].model_extra["seed"] == 21

    edit = client.images.edit(image=[("a.png", encode(noise_image(64, 64, seed=3)), "image/png")], prompt="x",
                              stream=True, partial_images=1, extra_body={"seed": 2, **FAST})  # fmt: skip
    assert [e.type for e in edit] == ["image_edit.partial_image", "image_edit.completed"]


@pytest.mark.parametrize("call, param", [
    (lambda c: c.images.generate(prompt="x", background="transparent"), "background"),
    (lambda c: c.images.edit(image=[("a.png", encode(noise_image(64, 64)), "image/png")], prompt="x",
                             mask=("m.png", encode(noise_image(64, 64)), "image/png")), "mask"),
    (lambda c: c.images.generate(prompt="x", size="big"), "size"),
    (lambda c: c.images.generate(prompt="x", n=11), "n"),
    (lambda c: c.images.generate(prompt="x", model="dall-e-3"), "model"),
    (lambda c: c.images.generate(prompt="x", extra_body={"steps": 0}), "steps"),
    (lambda c: c.images.generate(prompt="x", extra_body={"best_of": 5}), "best_of"),  # past limits.max_n
    (lambda c: c.images.generate(prompt="x", extra_body={"colour": "red"}), "colour"),
    (lambda c: c.images.generate(prompt="x", size="65x64"), "size"),  # not a multiple of the patch size
    (lambda c: c.images.generate(prompt="x", extra_body={"guidance": 99}), "guidance"),
    (lambda c: c.images.edit(image=[("a.png", b"not an image", "image/png")], prompt="x"), "image[0]"),
    (lambda c: c.images.edit(image=[("a.png", encode(noise_image(64, 64)), "image/png")], prompt="x",
                             extra_body={"roles": ["face", "pose"]}), "roles"),
    (lambda c: c.images.generate(prompt="", extra_body=FAST), "prompt"),
])  # fmt: skip
def test_errors_are_bad_requests_naming_the_param(client, call, param):
    with pytest.raises(openai.BadRequestError) as info:
        call(client)
    err = info.value
    assert err.status_code == 400 and err.param == param, (err.param, err.message)
    assert err.type == "invalid_request_error" and err.code and err.message


def test_a_stream_closed_early_cancels_its_job(client, service):
    stream = client.images.generate(prompt="a slow one", stream=True, partial_images=1, size="512x512",
                                    extra_body={"seed": 77, "steps": 200})  # fmt: skip
    with stream:
        first = next(iter(stream))
        assert first.type == "image_generation.partial_image"
    job_id = service.get("/v1/jobs", params={"limit": 1}).json()["data"][0]["id"]
    deadline = time.monotonic() + 60
    while (status := service.get(f"/v1/jobs/{job_id}").json()["status"]) == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    job = service.get(f"/v1/jobs/{job_id}").json()
    assert status == "cancelled", job["finished_at"] - job["started_at"]
