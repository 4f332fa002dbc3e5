"""Shared helpers: small configs on tiny random models, and the path to the shared real data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedft.config import RunConfig, build_config
from fedft.metrics import rundir

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_config(
    tmp_path: Path, method: str = "lora", model: str = "tiny-bert", **sets: object
) -> RunConfig:
    base: dict[str, object] = {
        "output_dir": str(tmp_path / "runs"),
        "model.name": model,
        "model.max_length": 16,
        "method.name": method,
        "data.max_train_samples": 240,
        "data.max_test_samples": 80,
        "federation.clients": 4,
        "federation.rounds": 2,
        "federation.sample_fraction": 0.5,
        "train.batch_size": 16,
        "train.max_steps": 3,
    }
    base.update(sets)
    return build_config(base=base)


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"../shared/data/{name} is not here (a user's clone has no ../shared)")
    return path


def assert_same_global_state(a: Path, b: Path) -> None:
    """Two run folders' last checkpoints hold bit-identical global tensors."""
    ta, _ = rundir.load_checkpoint(a)
    tb, _ = rundir.load_checkpoint(b)
    names = [n for n in ta if n.startswith("global.")]
    assert names and names == [n for n in tb if n.startswith("global.")]
    for name in names:
        assert torch.equal(ta[name], tb[name]), name


class CrashAfter:
    """A progress display that kills the run once round `n` is checkpointed, as a crash would."""

    def __init__(self, n: int):
        self.n = n

    def start(self, *args) -> None: ...
    def client_done(self, reply) -> None: ...
    def close(self) -> None: ...

    def round_done(self, line: dict) -> None:
        if line["round"] == self.n:
            raise KeyboardInterrupt


# the smallest real run through the CLI: tiny-bert, 120 demo rows, 3 clients, one step a round
TINY_CLI = [
    "--model",
    "tiny-bert",
    "--set",
    "data.max_train_samples=120",
    "--set",
    "federation.clients=3",
    "--set",
    "federation.rounds=1",
    "--set",
    "train.max_steps=1",
    "--set",
    "model.max_length=16",
    "--quiet",
]
