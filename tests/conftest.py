"""Test session setup: offline, quiet tokenizers; one torch thread per worker when pytest-xdist
runs the suite in parallel (`scripts/test.sh` does, one worker per core)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:
    # The Flower tests mostly wait (a SuperNode and the ServerApp poll every 3 s), so the suite
    # runs one worker per core beside them; more torch threads than cores would slow every
    # worker. Set before torch is imported; the fedft processes a test starts inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
