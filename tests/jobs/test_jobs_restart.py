"""Stopping the whole service mid-job and starting it again (same store) finishes the job with the same images."""

from __future__ import annotations

import base64
import io
import time

import pytest
from PIL import Image
from tests._serve import running_service
from tests.jobs.test_jobs_api import OPTIONS, service_args, submit

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_service_restart_resumes_the_job(tmp_path):
    cache = str(tmp_path / "cache")
    store = {"db_path": str(tmp_path / "store" / "jobs.sqlite3"), "results_dir": str(tmp_path / "store" / "results")}
    body = {"mode": "t2i", "prompt": "outlives a restart", "n": 4, "seed": 300, "width": 256, "height": 256,
            "exact_size": True, "steps": 30}  # fmt: skip
    with running_service(cache, service_args(job_store=store), OPTIONS) as client:
        job_id = submit(client, body)["id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as r:
            for line in r.iter_lines():
                if line == "event: candidate":  # stop with one group stored and the other running
                    break
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    with running_service(cache, service_args(job_store=store), OPTIONS) as client:
        deadline = time.time() + 120
        while True:
            r = client.get(f"/v1/jobs/{job_id}")
            if r.status_code == 200 and r.json()["status"] not in ("queued", "running"):
                break
            assert time.time() < deadline, r.text
            time.sleep(0.5)
        job = r.json()
        assert job["status"] == "succeeded", job
        sync = client.post("/v1/generate/t2i", json={k: v for k, v in body.items() if k != "mode"} | {"return": "all"})
        expected = {c["seed"]: base64.b64decode(c["image"]) for c in sync.json()["candidates"]}
        assert {c["seed"] for c in job["result"]["candidates"]} == set(expected)
        for c in job["result"]["candidates"]:
            got = Image.open(io.BytesIO(client.get(c["url"]).content)).tobytes()
            assert got == Image.open(io.BytesIO(expected[c["seed"]])).tobytes()
