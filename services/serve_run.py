"""`serve run` with Ray's Prometheus metrics, the service's included (services/metrics.py), exported at a fixed
address: http://127.0.0.1:$HIDREAM_METRICS_PORT/metrics (default 8080). `scripts/start-local.sh` runs it.

    python -m services.serve_run deploy/local.yaml [serve run options]

`serve run` starts a local Ray with a random metrics port and has no option for it; this starts that Ray first
(a new local instance, never one a `ray start` left running) with `_metrics_export_port`, then hands over to
`serve run`, which uses the Ray already started. `--address` and `--runtime-env*` are therefore not for here.
"""

from __future__ import annotations

import os
import sys

DEFAULT_METRICS_PORT = 8080


def main(argv: list[str] | None = None) -> None:
    import ray
    from ray.serve.scripts import cli

    port = int(os.environ.get("HIDREAM_METRICS_PORT", DEFAULT_METRICS_PORT))
    ray.init(address="local", namespace="serve", _metrics_export_port=port)
    print(f"metrics: http://127.0.0.1:{port}/metrics", flush=True)
    cli.main(args=["run", *(sys.argv[1:] if argv is None else argv)], prog_name="serve")


if __name__ == "__main__":
    main()
