#!/usr/bin/env bash
# Set up, then run the test suite (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m ruff check src tests benchmarks
.venv/bin/python -m pytest -q -n auto --dist worksteal "$@"
