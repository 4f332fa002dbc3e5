"""The local engine: bytes counted, resume equals an unbroken run, failing clients, outputs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedft.errors import ModelError, RunStopped
from fedft.federation.engine import build_task, run_federation
from fedft.methods import register
from fedft.methods.bias import BiasOnly
from fedft.metrics import rundir

from helpers import tiny_config

METHODS = ["full", "head", "bias", "adapter", "prompt", "lora"]
TIMING_KEYS = {
    "seconds",
    "client_seconds_mean",
    "client_seconds_max",
    "client_peak_rss_mb",
    "client_peak_cuda_mb",
    "server_seconds",
    "eval_seconds",
    "round_seconds",
    "elapsed_seconds",
    "peak_rss_mb",
    "seconds_per_round",
    "client_seconds_per_round",
    "run_seconds",
}


def start(cfg, name: str = "run") -> Path:
    path = Path(cfg.output_dir) / name
    rundir.start_run_dir(path, "{}", overwrite=False)
    return path


def strip_timing(value):
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value


@pytest.mark.parametrize("method", METHODS)
def test_uplink_bytes_per_client_equal_trainable_tensor_bytes(tmp_path: Path, method: str):
    cfg = tiny_config(tmp_path, method, **{"federation.rounds": 1, "train.max_steps": 1})
    task = build_task(cfg)
    params = dict(task.model.named_parameters())
    expected = sum(
        params[n].numel() * params[n].element_size() for n in task.method.trainable_names
    )
    assert expected == sum(p.numel() * 4 for p in task.model.parameters() if p.requires_grad)
    run_dir = start(cfg)
    run_federation(task, run_dir)
    (line,) = rundir.read_metrics(run_dir)
    assert line["per_client"] and all(
        c["bytes_up"] == expected and c["bytes_down"] == expected for c in line["per_client"]
    )
    assert line["bytes_up"] == expected * len(line["clients"])
    # scalars (num_examples, train_loss, steps) are counted apart, 8 bytes each
    assert line["scalar_bytes"] == 3 * 8 * len(line["clients"])
    assert line["round_bytes"] == 2 * expected * len(line["clients"]) + line["scalar_bytes"]


def test_resumed_run_equals_unbroken_run(tmp_path: Path):
    sets = {
        "federation.rounds": 3,
        "federation.server_optimizer": "fedadam",
        "federation.server_lr": 0.05,
    }
    cfg = tiny_config(tmp_path, "lora", **sets)
    full_dir = start(cfg, "unbroken")
    unbroken = run_federation(build_task(cfg), full_dir)

    stopped = tiny_config(tmp_path, "lora", **{**sets, "federation.rounds": 2})
    part_dir = start(stopped, "resumed")
    run_federation(build_task(stopped), part_dir)
    resumed = run_federation(build_task(cfg), part_dir, resume=True)

    assert strip_timing(rundir.read_metrics(part_dir)) == strip_timing(
        rundir.read_metrics(full_dir)
    )
    assert strip_timing(resumed) | {"name": None} == strip_timing(unbroken) | {"name": None}
    a, b = (
        load_file(str(full_dir / rundir.CHECKPOINT)),
        load_file(str(part_dir / rundir.CHECKPOINT)),
    )
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_crash_between_metrics_and_checkpoint(tmp_path: Path):
    cfg = tiny_config(tmp_path, "bias", **{"federation.rounds": 2})
    run_dir = start(cfg)
    run_federation(build_task(cfg), run_dir)
    lines = rundir.read_metrics(run_dir)
    # a line for a round 3 that never reached the checkpoint must be dropped on resume
    rundir.append_metrics(run_dir, {**lines[-1], "round": 3})
    longer = tiny_config(tmp_path, "bias", **{"federation.rounds": 3})
    run_federation(build_task(longer), run_dir, resume=True)
    assert [m["round"] for m in rundir.read_metrics(run_dir)] == [1, 2, 3]


@register
class FlakyBias(BiasOnly):
    """A real plug-in whose client 1 raises, as a broken client would."""

    name = "test-flaky-bias"

    def client_train(self, ctx, payload):
        if ctx.client == 1:
            raise RuntimeError("disk full on client 1")
        return super().client_train(ctx, payload)


def test_failing_client_is_recorded_and_left_out(tmp_path: Path):
    cfg = tiny_config(
        tmp_path, "test-flaky-bias", **{"federation.sample_fraction": 1.0, "federation.rounds": 1}
    )
    task = build_task(cfg)
    run_dir = start(cfg)
    summary = run_federation(task, run_dir)
    (line,) = rundir.read_metrics(run_dir)
    assert line["failed"] == [{"client": 1, "error": "RuntimeError: disk full on client 1"}]
    assert line["clients"] == [0, 1, 2, 3]
    assert summary["failed_client_updates"] == 1
    assert summary["final_accuracy"] is not None
    # the aggregate equals the weighted mean of the three that answered
    ok = [c for c in line["per_client"] if c["error"] is None]
    assert [c["client"] for c in ok] == [0, 2, 3]


def test_too_few_replies_stop_the_run_and_keep_the_checkpoint(tmp_path: Path):
    cfg = tiny_config(
        tmp_path, "test-flaky-bias", **{"federation.sample_count": 1, "federation.rounds": 30}
    )
    task = build_task(cfg)
    run_dir = start(cfg)
    with pytest.raises(RunStopped, match="fewer than federation.min_replies=1"):
        run_federation(task, run_dir)
    rounds = [m["round"] for m in rundir.read_metrics(run_dir)]
    _, meta = rundir.load_checkpoint(run_dir)
    assert rounds and meta["round"] == rounds[-1]  # the checkpoint is the last completed round


def test_run_folder_outputs(tmp_path: Path):
    cfg = tiny_config(tmp_path, "lora", **{"federation.eval_every": 2, "federation.rounds": 3})
    run_dir = start(cfg)
    summary = run_federation(build_task(cfg), run_dir)
    lines = rundir.read_metrics(run_dir)
    assert [m["test_accuracy"] is not None for m in lines] == [False, True, True]
    assert lines[-1]["total_bytes"] == sum(m["round_bytes"] for m in lines)
    saved = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["final_accuracy"] == lines[-1]["test_accuracy"]
    assert saved["best_accuracy"] == max(
        m["test_accuracy"] for m in lines if m["test_accuracy"] is not None
    )
    assert saved["client_peak_rss_mb"] > 50
    assert (
        0 <= saved["client_eval"]["min_accuracy"] <= saved["client_eval"]["weighted_accuracy"] <= 1
    )
    assert (run_dir / rundir.PLOT).stat().st_size > 10_000


def test_final_client_evaluation_samples_a_bounded_number_and_counts_in_the_run_totals(
    tmp_path: Path,
):
    sets = {"federation.clients": 8, "federation.eval_clients": 3, "federation.rounds": 1}
    cfg = tiny_config(tmp_path, "bias", **sets)
    task = build_task(cfg)
    asked = []
    task.method.client_handlers = lambda: {  # note which clients the final evaluation asks
        "train": BiasOnly.client_train.__get__(task.method),
        "evaluate": lambda ctx, p: (
            asked.append(ctx.client) or BiasOnly.client_evaluate(task.method, ctx, p)
        ),
    }
    summary = run_federation(task, start(cfg))
    evaluated = summary["client_eval"]
    assert len(asked) == evaluated["clients"] == 3 and len(set(asked)) == 3
    assert evaluated["sampled_from"] == sum(len(c.test) > 0 for c in task.data.clients) == 8
    assert summary["run_total_mb"] * 1e6 == pytest.approx(
        summary["total_bytes"] + evaluated["bytes"]
    )
    assert evaluated["bytes"] > 0
    assert summary["run_seconds"] == pytest.approx(summary["seconds"] + evaluated["seconds"])


def test_same_seed_same_result_and_other_seed_differs(tmp_path: Path):
    a = run_federation(
        build_task(tiny_config(tmp_path, "bias")), start(tiny_config(tmp_path, "bias"), "a")
    )
    b = run_federation(
        build_task(tiny_config(tmp_path, "bias")), start(tiny_config(tmp_path, "bias"), "b")
    )
    c_cfg = tiny_config(tmp_path, "bias", seed=1)
    c = run_federation(build_task(c_cfg), start(c_cfg, "c"))
    assert a["final_loss"] == b["final_loss"]
    assert a["final_loss"] != c["final_loss"]


def test_method_that_does_not_fit_the_model(tmp_path: Path):
    with pytest.raises(ModelError, match="no linear modules named"):
        build_task(tiny_config(tmp_path, "lora", **{"method.target_modules": ["attn_qkv"]}))
