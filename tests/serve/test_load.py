"""Admission control under load (issue 14), on the real service (Ray Serve in-process, tiny models, CPU).

One generator replica taking one seed group at a time, generate_timeout_s = queue_timeout_s: the queue holds one
waiting group per slot, so two requests of one group each are in flight at most (services/admission.py). Twelve
concurrent requests: every one is answered 200 or 503 with Retry-After, the 503s at once, and every 200 is
complete (all its candidates, each with its image)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from tests._serve import cpu_options, running_service, tiny_app_args, wait_ready

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CONCURRENT = 12
N = 2  # candidates per request: one group of two seeds
LIMITS = {"max_n": 4, "max_steps": 8, "max_pixels": 128 * 128, "max_refs": 2, "max_image_bytes": 100_000,
          "max_image_pixels": 1_000_000, "max_prompt_chars": 200}  # fmt: skip
OPTIONS = cpu_options({"num_replicas": 1, "max_ongoing_requests": 1})


def service_args():
    return tiny_app_args(
        router={"seeds_per_call": 2, "prune_group_size": 2, "generate_timeout_s": 60, "queue_timeout_s": 60,
                "score_timeout_s": 60, "retry_after_s": 3},
        defaults={"width": 128, "height": 128, "exact_size": True, "steps": 4}, generator={"max_batch": 2},
        limits=LIMITS,
    )  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(str(tmp_path_factory.mktemp("hidream-cache")), service_args(), OPTIONS, timeout=180) as c:
        wait_ready(c)
        yield c


def test_overload_is_refused_early_and_every_accepted_request_completes(service):
    def post(i: int):
        t0 = time.perf_counter()
        r = service.post("/v1/generate/t2i", json={"prompt": f"a fox {i}", "n": N, "seed": 100 * i, "return": "all"})
        return r, time.perf_counter() - t0

    assert service.post("/v1/generate/t2i", json={"prompt": "warm up", "n": N}).status_code == 200
    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(post, range(CONCURRENT)))

    ok = [(r, s) for r, s in answers if r.status_code == 200]
    refused = [(r, s) for r, s in answers if r.status_code == 503]
    assert len(ok) + len(refused) == CONCURRENT, [r.status_code for r, _ in answers]
    assert ok and refused, [r.status_code for r, _ in answers]
    slowest_ok = max(s for _, s in ok)
    for r, seconds in refused:
        assert r.headers.get("retry-after") == "3", r.headers
        body = r.json()["error"]
        assert body["type"] == "unavailable" and "capacity" in body["message"], body
        assert seconds < slowest_ok, (seconds, slowest_ok)  # refused at once, not after waiting
    for r, _ in ok:
        body = r.json()
        assert len(body["candidates"]) == N and all(c["image"] for c in body["candidates"]), body["warnings"]
        assert body["winner"]["image"] and body["scored"]

    # once the load is gone, the refused requests are served
    r = service.post("/v1/generate/t2i", json={"prompt": "after the load", "n": N, "return": "all"})
    assert r.status_code == 200 and len(r.json()["candidates"]) == N
