#!/usr/bin/env bash
# Install, then start the service on the embedded default (tiny model + tiny scorer, CPU) on port 8000,
# with Prometheus metrics at http://127.0.0.1:${HIDREAM_METRICS_PORT:-8080}/metrics (docs/metrics.md):
# `serve run deploy/local.yaml` on a local Ray started with that metrics port (services/serve_run.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m services.serve_run deploy/local.yaml "$@"
