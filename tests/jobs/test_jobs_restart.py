"""Stopping the whole service mid-job and starting it again (same store) finishes the job with the same images."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from tests._serve import running_service
from tests.jobs.test_jobs_api import OPTIONS, service_args, submit, wait_done, wait_for_event

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_service_restart_resumes_the_job(tmp_path):
    cache = str(tmp_path / "cache")
    store = {"db_path": str(tmp_path / "store" / "jobs.sqlite3"), "results_dir": str(tmp_path / "store" / "results")}
    body = {"mode": "t2i", "prompt": "outlives a restart", "n": 4, "seed": 300, "width": 256, "height": 256,
            "exact_size": True, "steps": 30}  # fmt: skip
    with running_service(cache, service_args(job_store=store), OPTIONS) as client:
        job_id = submit(client, body)["id"]
        wait_for_event(client, job_id, "candidate")  # stop with one group stored and the other running
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    with running_service(cache, service_args(job_store=store), OPTIONS) as client:
        job = wait_done(client, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        sync = client.post("/v1/generate/t2i", json={k: v for k, v in body.items() if k != "mode"} | {"return": "all"})
        expected = {c["seed"]: base64.b64decode(c["image"]) for c in sync.json()["candidates"]}
        assert {c["seed"] for c in job["result"]["candidates"]} == set(expected)
        for c in job["result"]["candidates"]:
            got = Image.open(io.BytesIO(client.get(c["url"]).content)).tobytes()
            assert got == Image.open(io.BytesIO(expected[c["seed"]])).tobytes()
