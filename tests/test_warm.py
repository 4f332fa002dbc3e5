"""A node's warm worker: a real process that builds the runtime once, serves every message of its
source, answers as the in-process runtime does, and exits when idle."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from fedft.federation import warm
from fedft.federation.training import read_state

pytestmark = pytest.mark.slow

SETS = (
    "model.name=tiny-bert; model.max_length=16; data.max_train_samples=120; "
    "data.max_test_samples=20; federation.clients=2; train.max_steps=2; method.name=bias"
)


def request(runtime, client: int) -> dict:
    state = read_state(runtime.model, runtime.trainable)
    return {
        "client": client,
        "kind": "train",
        "round": 1,
        "tensors": {k: v.numpy() for k, v in state.items()},
        "scalars": {},
        "state": {},
        "state_scalars": {},
    }


def test_one_warm_worker_serves_its_source_and_answers_as_in_process(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FEDFT_WARM_DIR", str(tmp_path / "warm"))
    run_config = {"fedft-set": SETS}
    node = {"partition-id": 0, "num-partitions": 2, "fedft-warm-idle": 2}
    local = warm.build_runtime(run_config, node)  # the in-process reference
    files = warm.worker_files(warm.runtime_key(run_config, node))
    asked = {client: request(local, client) for client in (0, 1)}
    try:
        first = warm.call(run_config, node, asked[0])
        pid = int(files["pid"].read_text())
        started = time.perf_counter()
        second = warm.call(run_config, {**node, "partition-id": 1}, asked[1])
        assert time.perf_counter() - started < 5  # no model load: the worker was warm
        assert int(files["pid"].read_text()) == pid  # the other partition, the same worker
        assert len(list((tmp_path / "warm").glob("*.pid"))) == 1
        for client, answer in ((0, first), (1, second)):
            expected = warm.handle(local, asked[client])  # the payload sets the start
            assert answer["scalars"] == expected["scalars"]
            assert answer["tensors"].keys() == expected["tensors"].keys()
            for name, value in expected["tensors"].items():
                np.testing.assert_allclose(answer["tensors"][name], value, rtol=1e-6, atol=1e-7)
            assert answer["cost"]["peak_rss_bytes"] > 0 and answer["cost"]["seconds"] > 0
        bad = {**asked[0], "kind": "no-such-kind"}
        with pytest.raises(RuntimeError, match="no client handler for 'no-such-kind'"):
            warm.call(run_config, node, bad)
        deadline = time.monotonic() + 30  # idle for fedft-warm-idle seconds: it exits
        while files["sock"].exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not files["sock"].exists() and not files["pid"].exists()
        # this process started it (a ClientApp would have exited): reap it, it ended cleanly
        assert os.waitpid(pid, 0) == (pid, 0)
    finally:
        warm.stop_workers(tmp_path / "warm")


def test_prestart_starts_one_worker_that_the_first_message_then_uses(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FEDFT_WARM_DIR", str(tmp_path / "warm"))
    run_config = {"fedft-set": SETS}
    node = {"partition-id": 0, "num-partitions": 2, "fedft-warm-idle": 30}
    files = warm.worker_files(warm.runtime_key(run_config, node))
    try:
        warm.prestart(run_config, node)  # returns before the worker has loaded anything
        pid = int(files["pid"].read_text())
        warm.prestart(run_config, {**node, "partition-id": 1})  # the same source: no second one
        assert int(files["pid"].read_text()) == pid
        assert len(list((tmp_path / "warm").glob("*.pid"))) == 1
        local = warm.build_runtime(run_config, node)
        answer = warm.call(run_config, node, request(local, 0))
        assert answer["ok"] and int(files["pid"].read_text()) == pid  # served by the prestarted one
    finally:
        warm.stop_workers(tmp_path / "warm")
