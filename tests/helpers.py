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


# --- generation (causal LM) ---------------------------------------------------------------------
TOPICS = ("sports", "weather", "markets")


def write_generation_data(folder: Path, train: int = 60, test: int = 12) -> Path:
    """A small instruction dataset (instruction, input, output, topic) as train/test jsonl: the
    headline is the article's first words, so a model can learn it."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    words = [
        "alpha",
        "bravo",
        "charlie",
        "delta",
        "echo",
        "foxtrot",
        "golf",
        "hotel",
        "india",
        "juliet",
        "kilo",
        "lima",
    ]
    for name, count, offset in (("train", train, 0), ("test", test, 1000)):
        with (folder / f"{name}.jsonl").open("w") as fh:
            for i in range(count):
                k = i + offset
                article = " ".join(words[(k + j) % len(words)] for j in range(6 + k % 5))
                row = {
                    "instruction": "Write a headline for this news article.",
                    "input": f"{TOPICS[k % 3]} news: {article}.",
                    "output": " ".join(article.split()[:3]).title(),
                    "topic": TOPICS[k % 3],
                }
                fh.write(json.dumps(row) + "\n")
    return folder


LABEL_WORDS = {  # tiny-llama on classification rows: label words scored by its LM head
    "data.source": "demo",
    "data.label_column": "label",
    "data.max_train_samples": 64,
    "data.max_test_samples": 16,
    "data.partition": "iid",
    "model.max_length": 64,
}


def tiny_llama_config(tmp_path: Path, method: str = "lora", **sets: object) -> RunConfig:
    """A tiny-llama run on a small instruction set: short rows, few generations, no initial
    evaluation unless asked."""
    data = write_generation_data(tmp_path / "gen-data")
    base: dict[str, object] = {
        "data.source": str(data),
        "data.label_column": "topic",
        "model.max_length": 64,
        "task.eval_generations": 4,
        "task.client_eval_generations": 2,
        "task.max_new_tokens": 6,
        "federation.eval_initial": False,
        "data.max_train_samples": None,
        "data.max_test_samples": None,
        "federation.clients": 3,
        "train.batch_size": 8,
        "train.max_steps": 2,
    }
    base.update(sets)
    return tiny_config(tmp_path, method, "tiny-llama", **base)


def sets_string(sets: dict) -> str:
    """Overrides as a Flower run config's `fedft-set` value."""
    return "; ".join(f"{k}={'null' if v is None else v}" for k, v in sets.items())


def local_run(tmp_path: Path, sets: dict) -> tuple[dict, list[dict]]:
    """The same settings on the local engine, in `tmp_path/local/run`: a Flower run's reference."""
    from fedft.federation.engine import build_task, run_federation

    cfg = build_config(base={**sets, "output_dir": str(tmp_path / "local")})
    run_dir = Path(cfg.output_dir) / "run"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    summary = run_federation(build_task(cfg), run_dir)
    return summary, rundir.read_metrics(run_dir)
