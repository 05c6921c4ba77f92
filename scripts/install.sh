#!/usr/bin/env bash
# Create .venv and install hidream-serve with the CPU build of torch (idempotent).
# On a GPU machine, install your CUDA torch first or set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.11.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch (or torchvision) would pull the multi-GB CUDA stack.
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[serve,test]"
echo "installed into $(pwd)/.venv"
