#!/usr/bin/env bash
# Create .venv and install hidream-serve with the CPU build of torch (idempotent).
# On a GPU machine, install your CUDA torch first or set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.11.0").
# A finished install is remembered (.venv/.hidream-install: pyproject.toml's checksum and TORCH_SPEC), so
# start-local.sh and test.sh skip pip until either changes; FORCE_INSTALL=1 reinstalls anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP=.venv/.hidream-install
WANT="$(cksum < pyproject.toml) $TORCH_SPEC"
if [ -z "${FORCE_INSTALL:-}" ] && [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "already installed in $(pwd)/.venv (FORCE_INSTALL=1 reinstalls)"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch (or torchvision) would pull the multi-GB CUDA stack.
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[serve,test]"
echo "$WANT" > "$STAMP"
echo "installed into $(pwd)/.venv"
