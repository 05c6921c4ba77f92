"""Autoscaling of the generators (issue 14), on the real service (Ray Serve in-process, tiny models, CPU).

Generator autoscaling from 1 to 2 replicas with short delays. Sustained load (clients that retry a 503 after its
Retry-After) starts the second replica; once idle the deployment goes back to one. No request is lost meanwhile:
every request ends in a complete 200."""

from __future__ import annotations

import threading
import time

import pytest
from tests._serve import cpu_options, running_service, tiny_app_args, wait_ready

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CLIENTS = 4
N = 2
LIMITS = {"max_n": 4, "max_steps": 8, "max_pixels": 128 * 128, "max_refs": 2, "max_image_bytes": 100_000,
          "max_image_pixels": 1_000_000, "max_prompt_chars": 200}  # fmt: skip
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 1,
               "upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2}  # fmt: skip
OPTIONS = cpu_options({"autoscaling_config": AUTOSCALING, "max_ongoing_requests": 1})


def service_args():
    return tiny_app_args(
        router={"seeds_per_call": 2, "prune_group_size": 2, "generate_timeout_s": 60, "queue_timeout_s": 60,
                "score_timeout_s": 60, "retry_after_s": 1, "ready_cache_s": 0.5},
        defaults={"width": 128, "height": 128, "exact_size": True, "steps": 4}, generator={"max_batch": 2},
        limits=LIMITS,
    )  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(str(tmp_path_factory.mktemp("hidream-cache")), service_args(), OPTIONS, timeout=180) as c:
        wait_ready(c)
        yield c


def running_generators() -> int:
    from ray import serve

    dep = serve.status().applications["hidream"].deployments["Generator"]
    return sum(n for st, n in dep.replica_states.items() if str(st).endswith("RUNNING"))


def wait_for(predicate, timeout: float, step: float = 0.5) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def test_scales_up_under_load_and_back_when_idle_losing_nothing(service):
    assert running_generators() == 1
    stop, results, lock = threading.Event(), [], threading.Lock()

    def client(k: int):
        i = 0
        while not stop.is_set():
            body = {"prompt": f"a fox {k}-{i}", "n": N, "seed": 1000 * k + i, "return": "all"}
            attempts = 0
            while True:  # a 503 is "retry later", never a lost request
                r = service.post("/v1/generate/t2i", json=body)
                attempts += 1
                if r.status_code != 503:
                    break
                time.sleep(float(r.headers["retry-after"]))
            with lock:
                results.append((r.status_code, r.json(), attempts))
            i += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        scaled_up = wait_for(lambda: running_generators() == 2, timeout=40)
        if scaled_up:
            time.sleep(3)  # keep the load on two replicas for a while
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert scaled_up, "the second generator replica never started under load"
    assert results and all(status == 200 for status, _, _ in results), [s for s, _, _ in results]
    for _, body, _ in results:
        assert len(body["candidates"]) == N and all(c["image"] for c in body["candidates"]), body["warnings"]
    replicas_used = {g["replica"] for _, body, _ in results for g in body["debug"]["groups"]}
    assert len(replicas_used) == 2, replicas_used

    assert wait_for(lambda: running_generators() == 1, timeout=40), "did not scale back to one replica when idle"
    r = service.post("/v1/generate/t2i", json={"prompt": "after scaling down", "n": N, "return": "all"})
    assert r.status_code == 200 and len(r.json()["candidates"]) == N
