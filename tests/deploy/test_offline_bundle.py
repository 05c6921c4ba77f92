"""scripts/offline-bundle.sh end to end: a wheelhouse built for a "node" that has only torch installs there with
`pip install --no-index`, and the local service starts from the installed package and answers a request.

The node is a fresh venv of this machine's Python with the CPU torch in it (as a GPU node has its CUDA torch);
its `pip freeze` is the bundle's `--have`, exactly as for deploy/gpu-node-freeze.txt. Needs PyPI for the build
(skips without it); about 3-5 minutes, most of it pip downloading ray and torch (cached after the first run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests._serve import free_port

ROOT = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # the CPU build (scripts/install.sh's default)
pytestmark = pytest.mark.slow


def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10).close()
        return True
    except (urllib.error.URLError, OSError):
        return False


def _run(cmd: list[str], **kw) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _get(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"} if data else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.skipif(sys.platform != "linux", reason="the bundle targets manylinux")
def test_bundle_installs_offline_and_the_local_service_starts(tmp_path):
    if not _pypi_reachable():
        pytest.skip("building the bundle needs PyPI")
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    node = tmp_path / "node"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)

    # 1. the "node": a fresh venv that has its own torch and nothing of ours
    _run([sys.executable, "-m", "venv", str(node)])
    py = str(node / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", TORCH], env=env, timeout=1200)
    have = tmp_path / "have.txt"
    have.write_text(_run([py, "-m", "pip", "list", "--format=freeze"], env=env))

    # 2. the bundle for it, built here (PyPI reachable), then installed there with no index at all
    bundle = tmp_path / "bundle"
    build = subprocess.run(["bash", "scripts/offline-bundle.sh", "--have", str(have), "--python", pyver, "-o",
                            str(bundle)], cwd=ROOT, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = {p.name.split("-")[0] for p in bundle.glob("*.whl")}
    assert "hidream_serve" in wheels and "ray" in wheels and "torch" not in wheels, sorted(wheels)
    ray_wheel = next(bundle.glob("ray-*.whl"))
    assert "+serveonly" in ray_wheel.name
    _run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(bundle), "hidream-serve[serve]"],
         env=env, timeout=900)  # fmt: skip
    version = _run([py, "-c", "import importlib.metadata as m, ray.serve, fastapi, hidream_serve, services.app; print(m.version('ray'))"],
                   env=env, cwd=tmp_path)  # fmt: skip
    assert version.strip().endswith("+serveonly"), version

    # 3. the local service from the installed package (not this checkout): deploy/local.yaml on a free port
    port = free_port()
    config = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    serve_env = {**env, "HIDREAM_SERVE_CACHE": str(tmp_path / "cache"), "RAY_TMPDIR": ray_tmp,
                 "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(node / "bin" / "serve"), "run", str(tmp_path / "local.yaml")], cwd=run_dir,
                            env=serve_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        status = None
        while time.time() < deadline and proc.poll() is None:
            try:
                status, _ = _get(f"{base}/readyz", timeout=10)
            except (urllib.error.URLError, OSError):
                status = None
            if status == 200:
                break
            time.sleep(2)
        assert status == 200, f"not ready (exit {proc.poll()}):\n{(tmp_path / 'serve.log').read_text()[-4000:]}"
        status, raw = _get(f"{base}/v1/generate/t2i", {"prompt": "a lighthouse", "n": 2, "seed": 3, "steps": 2,
                                                       "width": 64, "height": 64, "exact_size": True})  # fmt: skip
        assert status == 200, raw[:2000]
        body = json.loads(raw)
        assert body["winner"]["seed"] in (3, 4) and len(body["candidates"]) == 2
        # the package that answered is the bundle's, not this checkout
        origin = _run([py, "-c", "import services, hidream_serve; print(services.__file__, hidream_serve.__file__)"],
                      env=env, cwd=run_dir)  # fmt: skip
        assert str(ROOT) not in origin and str(node) in origin, origin
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
