#!/usr/bin/env bash
# Create .venv and install fedft with its test tools and Flower's simulation engine (Ray). torch==2.13.0 (CPU build) goes in first so
# that no looser torch requirement pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,simulation]"
