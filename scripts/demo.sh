#!/usr/bin/env bash
# Set up, then run fedft on the built-in defaults (MiniLM, demo data, 10 clients, Dirichlet 0.5, lora), offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/fedft run "$@"
