"""A run killed after round 2 and resumed in a fresh task equals an unbroken run in every figure.

For every method the unbroken run and the resumed one must write the same `summary.json` and
the same `metrics.jsonl` lines, down to the bytes each client moved and every counter a method
keeps (zo's catch-ups, fedpft's sub-model downloads, fedpt's large-model queries), except the
fields that measure the clock or the process's memory; and the same final checkpoint, tensor for
tensor. Each case is tiny (tiny-bert, 3 rounds of a few steps) so that the whole matrix stays
cheap; the option sets are the ones the methods' own tests use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedft.federation.client import ClientRuntime
from fedft.federation.engine import build_task, run_federation
from fedft.federation.grid import LocalGrid
from fedft.metrics import rundir

from helpers import CrashAfter, assert_same_global_state, tiny_config, write_generation_data

# What a resumed run cannot reproduce: wall-clock time and the process's memory.
NOT_REPRODUCIBLE = {
    "seconds",
    "seconds_per_round",
    "client_seconds_mean",
    "client_seconds_max",
    "client_seconds_per_round",
    "server_seconds",
    "server_body_seconds",
    "eval_seconds",
    "round_seconds",
    "elapsed_seconds",
    "distill_seconds",
    "peak_rss_mb",
    "client_peak_rss_mb",
    "client_peak_cuda_mb",
    "server_peak_rss_mb",
    "run_seconds",
}

FEDPFT = {  # tests/test_fedpft.py's SMALL, fewer steps, re-aligning at round 2 (before the kill)
    "method.keep_layers": [0],
    "method.distill_steps": 5,
    "method.realign_steps": 3,
    "method.public_rows": 40,
    "method.public_heldout": 16,
    "method.realign_every": 2,
}
FEDPT = {  # tests/test_fedpt.py's PAIR, distilling each round (it asks the large model)
    "method.small_layers": 1,
    "method.distill_steps": 3,
    "method.public_rows": 40,
    "method.public_heldout": 16,
}
SFPROMPT = {  # tests/test_sfprompt.py's sf_config
    "method.num_tokens": 3,
    "method.head_blocks": 0,
    "method.tail_blocks": 1,
    "method.chunk_batches": 2,
    "federation.clients": 2,
    "federation.sample_fraction": 1.0,
}
ZO = {"train.lr": 1e-2, "train.weight_decay": 0.01}  # tests/test_zo.py's resume test
GENERATE = {  # a causal LM on instruction rows; the untuned model's scores survive the resume
    "model.name": "tiny-llama",
    "model.max_length": 48,
    "data.source": "GENERATION_DATA",
    "data.label_column": "topic",
    "data.max_train_samples": None,
    "data.max_test_samples": None,
    "task.eval_generations": 2,
    "task.client_eval_generations": 1,
    "task.max_new_tokens": 3,
    "federation.eval_initial": True,
}

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("full", "full", {}),
    ("head", "head", {"federation.server_optimizer": "fedadam", "federation.server_lr": 0.05}),
    ("bias", "bias", {}),
    ("adapter", "adapter", {}),
    ("prompt", "prompt", {}),
    ("lora", "lora", {}),
    ("lora-exact-ranks", "lora", {"method.aggregation": "exact", "method.client_ranks": [2, 8]}),
    ("zo-seeds", "zo", ZO),
    ("zo-lora-pool", "zo", {**ZO, "method.params": "lora", "method.seed_pool": 64}),
    ("zo-delta", "zo", {**ZO, "method.params": "bias", "method.mode": "delta"}),
    ("sfprompt", "sfprompt", SFPROMPT),
    ("fedpft", "fedpft", FEDPFT),
    ("fedpt", "fedpt", FEDPT),
    ("generate-lora", "lora", GENERATE),
]


def reproducible(value: Any) -> Any:
    """`value` without the clock and memory fields, at any depth (per_client entries too)."""
    if isinstance(value, dict):
        return {k: reproducible(v) for k, v in value.items() if k not in NOT_REPRODUCIBLE}
    if isinstance(value, list):
        return [reproducible(v) for v in value]
    return value


def run_dir_of(tmp_path: Path, where: str, method: str, sets: dict[str, Any]) -> tuple:
    """The config of one run and its folder; both runs' folders share a name (the summary has it)."""
    cfg = tiny_config(tmp_path / where, method, **{"federation.rounds": 3, **sets})
    path = Path(cfg.output_dir) / "run"
    return cfg, path


@pytest.mark.parametrize(("case", "method", "sets"), CASES, ids=[c[0] for c in CASES])
def test_a_run_killed_after_round_2_and_resumed_equals_an_unbroken_run(
    tmp_path: Path, case: str, method: str, sets: dict[str, Any]
):
    sets = {
        "train.max_steps": 2,
        "data.max_train_samples": 160,
        "data.max_test_samples": 40,
        **sets,
    }
    if sets.get("data.source") == "GENERATION_DATA":
        sets["data.source"] = str(write_generation_data(tmp_path / "gen"))
    cfg, unbroken = run_dir_of(tmp_path, "unbroken", method, sets)
    rundir.start_run_dir(unbroken, "{}", overwrite=False)
    run_federation(build_task(cfg), unbroken)

    cfg, resumed = run_dir_of(tmp_path, "resumed", method, sets)
    rundir.start_run_dir(resumed, "{}", overwrite=False)
    with pytest.raises(KeyboardInterrupt):
        run_federation(build_task(cfg), resumed, progress=CrashAfter(2))
    assert [m["round"] for m in rundir.read_metrics(resumed)] == [1, 2]
    assert not (resumed / rundir.SUMMARY).exists()
    run_federation(build_task(cfg), resumed, resume=True)  # a fresh task, as a new process

    want, got = rundir.read_metrics(unbroken), rundir.read_metrics(resumed)
    assert [m["round"] for m in got] == [1, 2, 3]
    for a, b in zip(want, got, strict=True):
        assert reproducible(b) == reproducible(a), f"round {a['round']}"
    summary_a = json.loads((unbroken / rundir.SUMMARY).read_text())
    summary_b = json.loads((resumed / rundir.SUMMARY).read_text())
    assert reproducible(summary_b) == reproducible(summary_a)

    assert_same_global_state(unbroken, resumed)
    ta, _ = rundir.load_checkpoint(unbroken)
    tb, _ = rundir.load_checkpoint(resumed)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def test_a_resume_over_a_grid_of_clients_that_kept_nothing_catches_them_up(tmp_path: Path):
    """On Flower the server cannot see what the nodes kept, so after a resume it treats each as
    new: a catch-up from the starting weights costs more bytes, never a different model."""
    sets = {"federation.rounds": 3, "train.max_steps": 2, "data.max_train_samples": 160, **ZO}
    cfg, unbroken = run_dir_of(tmp_path, "unbroken", "zo", sets)
    rundir.start_run_dir(unbroken, "{}", overwrite=False)
    run_federation(build_task(cfg), unbroken)
    cfg, resumed = run_dir_of(tmp_path, "resumed", "zo", sets)
    rundir.start_run_dir(resumed, "{}", overwrite=False)
    with pytest.raises(KeyboardInterrupt):
        run_federation(build_task(cfg), resumed, progress=CrashAfter(2))
    task = build_task(cfg)
    # clients the engine does not own (as Flower's nodes), none holding anything of the run
    fresh = LocalGrid(
        ClientRuntime(task.method, task.model, task.data, cfg, task.device), task.device
    )
    run_federation(task, resumed, resume=True, grid=fresh)
    want, got = rundir.read_metrics(unbroken)[-1], rundir.read_metrics(resumed)[-1]
    assert got["failed"] == [] and got["clients"] == want["clients"]
    assert got["bytes_down"] > want["bytes_down"]  # records from version 0 (or the whole state)
    assert_same_global_state(unbroken, resumed)
