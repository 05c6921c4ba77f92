"""Graceful shutdown (issue 14 item 6): what `scripts/start-local.sh` runs (`python -m services.serve_run
deploy/local.yaml`), as a subprocess on free ports; SIGTERM while a request is in flight. The request completes
(200, all candidates), the process exits on its own without a stack dump, and its Ray processes are gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests._serve import free_port

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
yaml = pytest.importorskip("yaml")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parents[2]


def local_config(tmp_path: Path, port: int) -> Path:
    config = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sigterm_drains_the_in_flight_request_and_exits_cleanly(tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "HIDREAM_SERVE_CACHE": str(tmp_path / "cache"), "HIDREAM_METRICS_PORT": str(metrics_port),
           "OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost"}  # fmt: skip
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "services.serve_run", str(local_config(tmp_path, port))], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=180, trust_env=False) as client:
            deadline = time.time() + 150
            while True:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            descendants = psutil.Process(proc.pid).children(recursive=True)

            answer = {}

            def in_flight():
                body = {"prompt": "a fox", "n": 2, "steps": 40, "width": 512, "height": 512, "return": "all"}
                answer["r"] = client.post("/v1/generate/t2i", json=body)

            thread = threading.Thread(target=in_flight)
            thread.start()
            while True:  # until the request is admitted and on a generator (its job has taken a step)
                running = client.get("/v1/jobs", params={"status": "running"}).json()["data"]
                if running and running[0]["steps_done"] > 0:
                    break
                assert thread.is_alive() and time.time() < deadline + 60, "the request never ran"
                time.sleep(0.2)
            assert thread.is_alive(), "the request finished before the signal: make it longer"
            proc.send_signal(signal.SIGTERM)
            thread.join(timeout=170)
        r = answer["r"]
        assert r.status_code == 200, r.text[:1000]
        body = r.json()
        assert len(body["candidates"]) == 2 and all(c["image"] for c in body["candidates"])
        assert body["scored"] and not body["warnings"], body["warnings"]  # the scorer outlived the request
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = (tmp_path / "serve.log").read_text()
    assert "SIGTERM received" not in out and "Traceback" not in out, out[-3000:]
    assert "requests drained" in out and "shutting down" in out, out[-3000:]
    time.sleep(3)
    left = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline()[:1] for p in left]
