"""Retention on the running service: a finished job and its image files are deleted once they are older than
`jobs.retention_ttl_s`, counted from when the job finished; a job still running is kept."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tests._serve import running_service
from tests.jobs.test_jobs_api import OPTIONS, service_args, submit, wait_done

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TTL_S = 4.0


def test_finished_jobs_and_their_images_are_deleted_after_the_ttl(tmp_path):
    results = tmp_path / "store" / "results"
    store = {"db_path": str(tmp_path / "store" / "jobs.sqlite3"), "results_dir": str(results)}
    jobs = {"retention_ttl_s": TTL_S, "retention_interval_s": 0.5}
    body = {"mode": "t2i", "prompt": "short-lived", "n": 2, "seed": 5, "width": 64, "height": 64,
            "exact_size": True, "steps": 2}  # fmt: skip
    with running_service(str(tmp_path / "cache"), service_args(job_store=store, jobs=jobs), OPTIONS) as client:
        job = wait_done(client, submit(client, body)["id"])
        assert job["status"] == "succeeded", job
        finished = time.time()
        url = job["result"]["winner"]["url"]
        assert client.get(url).status_code == 200 and any(Path(results, job["id"]).iterdir())
        deadline = finished + TTL_S + 30
        while client.get(f"/v1/jobs/{job['id']}").status_code == 200:
            assert time.time() < deadline, "the job outlived its retention"
            time.sleep(0.25)
        assert time.time() - finished >= TTL_S - 0.5  # not before its time (the TTL counts from its end)
        r = client.get(f"/v1/jobs/{job['id']}")
        assert r.status_code == 404 and r.json()["error"]["field"] == "id"
        assert client.get(url).status_code == 404 and not Path(results, job["id"]).exists()
