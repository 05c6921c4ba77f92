"""Smoke test of an installed Ray Serve (e.g. the stripped ray of scripts/offline-bundle.sh), standard library + ray.

    python scripts/serve_smoke.py            # prints one line per check, exits non-zero on the first failure

Starts a local Ray with the dashboard (its agent, metrics and REST API must come up without the parts the bundle
leaves out), deploys one deployment over HTTP, sends it a request, checks the application's status and that the
dashboard's HTTP server answers, and shuts everything down. Its Ray lives under a temporary directory
(RAY_TMPDIR), so it never joins another Ray cluster running on the same machine.
"""

import json
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_answer(url: str, wait_s: float = 60) -> int:
    """HTTP status of the dashboard's answer; any answer counts (Ray may require its auth token: 401)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.time() + wait_s  # the dashboard may come up a little after Serve
    while True:
        try:
            with opener.open(url, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def main() -> int:
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: unix socket paths
    import ray
    from ray import serve

    print(f"ray {ray.__version__} from {os.path.dirname(ray.__file__)}")
    http_port, dash_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=True, dashboard_port=dash_port, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})

        @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
        class Echo:
            async def __call__(self, request):
                body = await request.json()
                return {"echo": body["x"] * 2, "pid": os.getpid()}

        serve.run(Echo.bind(), name="smoke", route_prefix="/smoke")
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/smoke", data=json.dumps({"x": 21}).encode(),
                                     headers={"content-type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=30) as resp:
            answer = json.load(resp)
        assert answer["echo"] == 42, answer
        print(f"ok: deployment answered over HTTP {answer}")
        app_status = serve.status().applications["smoke"].status
        assert app_status == "RUNNING", app_status
        print(f"ok: serve.status() reports application smoke {app_status}")
        code = dashboard_answer(f"http://127.0.0.1:{dash_port}/api/version")
        print(f"ok: the dashboard's HTTP server answered /api/version (HTTP {code})")
    finally:
        serve.shutdown()
        ray.shutdown()
    print("serve smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
