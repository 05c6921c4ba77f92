#!/usr/bin/env bash
# Install, then start the service on the embedded default (tiny model + tiny scorer, CPU) on port 8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/serve run deploy/local.yaml "$@"
