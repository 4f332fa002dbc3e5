"""Many clients per forward pass train as the same clients one after another would (dropout off:
one pass cannot draw k clients' masks), up to float rounding of the joined batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedft.federation.batched import train_batched
from fedft.federation.engine import build_task, run_federation
from fedft.federation.training import read_state, train_locally, write_state
from fedft.metrics import rundir

from helpers import tiny_config, tiny_llama_config


def no_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@pytest.mark.parametrize(
    ("method", "llama"),
    [("lora", False), ("lora", True), ("prompt", False), ("prompt", True)],
    ids=["lora", "lora-llama", "prompt", "prompt-llama"],
)
def test_train_batched_equals_each_client_trained_alone(tmp_path: Path, method: str, llama: bool):
    """Different starts per client, clipping that bites, generation rows of different lengths;
    LoRA factors through routed Linears, prompt tokens gathered per row."""
    config = tiny_llama_config if llama else tiny_config
    sets = {"train.max_steps": 3, "train.max_grad_norm": 0.05}
    if method == "prompt":
        sets["method.num_tokens"] = 4
    task = build_task(config(tmp_path, method, **sets))
    no_dropout(task.model)
    names, cfg = task.method.trainable_names, task.cfg.train
    owners = {n: type(task.model.get_submodule(n.rsplit(".", 1)[0])) for n in names}
    base = read_state(task.model, names)
    starts = [
        {n: t + 0.01 * (c + 1) * torch.randn(t.shape, generator=torch.Generator().manual_seed(c))
         for n, t in base.items()}
        for c in range(3)
    ]  # fmt: skip
    rows = [task.data.clients[c].train for c in range(3)]
    seeds = [11, 12, 13]
    alone = []
    for c in range(3):
        write_state(task.model, starts[c])
        stats = train_locally(task.model, names, task.data.train, rows[c], cfg, 1e-2, seeds[c],
                              task.device)  # fmt: skip
        alone.append((read_state(task.model, names), stats))
    together, stats = train_batched(task.model, names, task.data.train, rows, starts, cfg, 1e-2,
                                    seeds, task.device)  # fmt: skip
    for c in range(3):
        assert stats[c].steps == alone[c][1].steps == 3
        assert stats[c].mean_loss == pytest.approx(alone[c][1].mean_loss, rel=1e-5)
        for name in names:
            torch.testing.assert_close(together[c][name], alone[c][0][name], rtol=1e-3, atol=1e-5)
    for name, kind in owners.items():  # every module is back
        assert type(task.model.get_submodule(name.rsplit(".", 1)[0])) is kind


def test_a_run_with_batched_clients_ends_where_the_sequential_run_does(tmp_path: Path):
    sets = {"federation.clients": 4, "federation.sample_fraction": 1.0, "federation.rounds": 2}
    ends = {}
    for k in (1, 4):
        cfg = tiny_config(tmp_path / str(k), "lora", **{**sets, "federation.batch_clients": k})
        task = build_task(cfg)
        no_dropout(task.model)
        run_dir = Path(cfg.output_dir) / "run"
        rundir.start_run_dir(run_dir, "{}", overwrite=False)
        ends[k] = (run_federation(task, run_dir), run_dir, rundir.read_metrics(run_dir))
    (one, one_dir, one_lines), (four, four_dir, four_lines) = ends[1], ends[4]
    assert four["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    for line in four_lines:  # one joined round a step: each client charged an equal share
        assert len(line["per_client"]) == 4 and len({c["seconds"] for c in line["per_client"]}) == 1
    for a, b in zip(one_lines, four_lines, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
    a, _ = rundir.load_checkpoint(one_dir)
    b, _ = rundir.load_checkpoint(four_dir)
    names = [n for n in a if n.startswith("global.")]
    assert names and names == [n for n in b if n.startswith("global.")]
    for name in names:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
