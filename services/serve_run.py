"""`serve run` with Ray's Prometheus metrics, the service's included (services/metrics.py), exported at a fixed
address: http://127.0.0.1:$HIDREAM_METRICS_PORT/metrics (default 8080). `scripts/start-local.sh` runs it.

    python -m services.serve_run deploy/local.yaml [serve run options]

`serve run` starts a local Ray with a random metrics port and has no option for it; this starts that Ray first
(a new local instance, never one a `ray start` left running) with `_metrics_export_port`, then hands over to
`serve run`, which uses the Ray already started. `--address` and `--runtime-env*` are therefore not for here.
"""

from __future__ import annotations

import os
import signal
import sys

DEFAULT_METRICS_PORT = 8080


def drain_on_signal() -> None:
    """Ctrl-C or SIGTERM: each application's Router stops admitting and finishes the requests in flight
    (`Router.drain`), then every application is deleted (each replica finishing what it still runs within its
    deployment's graceful_shutdown_timeout_s) while the HTTP proxy still answers, then `serve run` shuts Serve and
    this Ray down. (`serve run` alone shuts the proxy down at once, dropping requests in flight, and Ray's own
    SIGTERM handler prints a crash-like stack dump.) A second signal stops at once."""
    draining = False

    def handler(signum, frame):
        nonlocal draining
        if draining:
            raise KeyboardInterrupt
        draining = True
        print("stopping: finishing the requests in flight (Ctrl-C again to stop at once)", flush=True)
        try:
            from ray import serve

            apps = list(serve.status().applications)
            for name in apps:
                try:
                    left = serve.get_deployment_handle("Router", name).drain.remote().result()
                    print(f"{name}: requests drained" + (f", {left} seed groups still running" if left else ""),
                          flush=True)  # fmt: skip
                except Exception as e:  # noqa: BLE001 - no Router (or it is gone): nothing to drain there
                    print(f"{name}: not drained ({type(e).__name__})", flush=True)
            for name in apps:
                serve.delete(name)
        finally:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> None:
    import ray
    from ray.serve.scripts import cli

    port = int(os.environ.get("HIDREAM_METRICS_PORT", DEFAULT_METRICS_PORT))
    ray.init(address="local", namespace="serve", _metrics_export_port=port)
    drain_on_signal()
    print(f"metrics: http://127.0.0.1:{port}/metrics", flush=True)
    cli.main(args=["run", *(sys.argv[1:] if argv is None else argv)], prog_name="serve")


if __name__ == "__main__":
    main()
