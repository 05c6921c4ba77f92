"""The service's Prometheus metrics (services/metrics.py), read from Ray's metrics endpoint after real requests
on the in-process service: a synchronous best-of-2 with pruning, a refused request, and a job with previews and
a webhook delivered to a local receiver."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tests._serve import cpu_options, free_port, running_service, tiny_app_args

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SECRET = "metrics-test-webhook-secret-0123"
SMALL = {"width": 64, "height": 64, "exact_size": True, "steps": 4}


def service_args():
    return tiny_app_args(
        router={"seeds_per_call": 2, "generate_timeout_s": 120, "score_timeout_s": 60, "retry_after_s": 1},
        defaults=SMALL, jobs={"preview_at": [0.5], "preview_size": 64, "webhook_secret": SECRET},
    )  # fmt: skip


OPTIONS = cpu_options({"num_replicas": 1})


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, labels): value} for the service's metrics."""
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_hidream_"):
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    want = set((k, str(v)) for k, v in labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


def test_metrics_after_requests(tmp_path):
    port = free_port()
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    try:
        with running_service(str(tmp_path), service_args(), OPTIONS, metrics_port=port) as client:
            r = client.post("/v1/generate/t2i", json={"prompt": "a cat", "n": 2, "seed": 1,
                                                      "prune": {"at": 0.5, "keep": 0.5}})  # fmt: skip
            assert r.status_code == 200, r.text[:500]
            assert r.json()["candidates"][1]["pruned"] or r.json()["candidates"][0]["pruned"]
            assert client.post("/v1/generate/t2i", json={"prompt": " "}).status_code == 422
            job = client.post("/v1/jobs", json={"mode": "t2i", "prompt": "a dog", "n": 1, "seed": 3,
                                                "webhook": {"url": hook, "events": ["succeeded"]}}).json()  # fmt: skip
            deadline = time.monotonic() + 120
            while client.get(f"/v1/jobs/{job['id']}").json()["status"] != "succeeded":
                assert time.monotonic() < deadline
                time.sleep(0.3)

            expected = {  # sample -> labels: each must reach a value > 0
                "ray_hidream_requests_total": {"route": "generate", "mode": "t2i", "status": 200,
                                               "deployment": "Router"},
                "ray_hidream_queue_wait_seconds_count": {"stage": "group"},
                "ray_hidream_generation_step_seconds_count": {"mode": "t2i", "deployment": "Generator"},
                "ray_hidream_generation_image_seconds_count": {"mode": "t2i"},
                "ray_hidream_candidates_generated_total": {"mode": "t2i"},
                "ray_hidream_candidates_pruned_total": {"mode": "t2i"},
                "ray_hidream_scoring_seconds_count": {"mode": "t2i", "deployment": "Scorer"},
                "ray_hidream_jobs_total": {"state": "succeeded", "deployment": "Jobs"},
                "ray_hidream_previews_total": {},
                "ray_hidream_webhooks_total": {"outcome": "delivered"},
            }
            found, missing = {}, list(expected)
            deadline = time.monotonic() + 60
            while missing and time.monotonic() < deadline:
                time.sleep(1)
                found = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=10).text)
                missing = [n for n, labels in expected.items() if value(found, n, **labels) <= 0]
            assert not missing, (missing, sorted({n for n, _ in found}))
    finally:
        receiver.shutdown()

    assert value(found, "ray_hidream_requests_total", route="generate", status=422) >= 1  # the refused one
    assert value(found, "ray_hidream_candidates_generated_total", mode="t2i") >= 3  # 2 + the job's 1
    assert value(found, "ray_hidream_candidates_pruned_total", mode="t2i") == 1
    assert value(found, "ray_hidream_queue_wait_seconds_count", stage="job") >= 1
    assert value(found, "ray_hidream_jobs_total", state="queued") >= 1
    assert value(found, "ray_hidream_jobs_total", state="started") >= 1
    assert value(found, "ray_hidream_previews_total") >= 1  # preview_at [0.5]: one per candidate
    assert any(n == "ray_hidream_jobs_active" and ("state", "queued") in ls for n, ls in found)
    assert value(found, "ray_hidream_gpu_peak_memory_bytes") == 0  # CPU replicas export no GPU memory
