"""Every method on a causal LM (tiny-llama): it trains on the response loss, leaves its frozen
weights alone, sends what it trains; head and bias are refused where a Llama has none; both DP
modes run, and Opacus's per-example gradients of the Llama modules each method trains are the
per-example gradients autograd gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from fedft.errors import ModelError
from fedft.federation.engine import build_task, run_federation
from fedft.methods import get_method
from fedft.metrics import rundir
from fedft.models.backbone import load_like

from helpers import tiny_llama_config

BACKPROP = {"full": {}, "lora": {}, "prompt": {}, "adapter": {}}
LR = {"full": 1e-2, "lora": 1e-2, "prompt": 1e-1, "adapter": 1e-2}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_task(tiny_llama_config(tmp_path_factory.mktemp("causal")))


def fresh(base, method: str, **options):
    model = load_like(base.model, base.cfg)
    plugin = get_method(method)(get_method(method).options_model(**options))
    names = plugin.prepare(model)
    return model, names


@pytest.mark.parametrize("method", list(BACKPROP))
def test_method_trains_the_response_loss_and_leaves_frozen_weights(base, method: str):
    model, names = fresh(base, method, **BACKPROP[method])
    trainable = set(names)
    assert all(p.requires_grad == (n in trainable) for n, p in model.named_parameters())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    batch = base.data.train.batch(np.arange(8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR[method])
    model.eval()
    losses = []
    for _ in range(30):
        loss = model.task.loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), name


def test_what_each_method_trains_on_a_causal_lm(base):
    model, full = fresh(base, "full")
    assert set(full) == {n for n, _ in model.named_parameters()}
    assert "net.lm_head.weight" not in full  # tied: the input embeddings are the LM head
    for method, marker in (("lora", ".lora_"), ("adapter", ".adapter."), ("prompt", "prompt.")):
        names = fresh(base, method)[1]
        assert names and all(marker in n or n.startswith(marker) for n in names), method
    names = fresh(base, "zo", params="lora")[1]
    assert names and all(".lora_" in n for n in names)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("head", "LM head of tiny-llama is tied to its input embeddings"),
        ("bias", "has no bias terms"),
    ],
)
def test_methods_a_llama_cannot_serve_are_refused(base, method: str, message: str):
    with pytest.raises(ModelError, match=message):
        fresh(base, method)


def _run(tmp_path: Path, method: str, **sets):
    cfg = tiny_llama_config(tmp_path, method, **sets)
    task = build_task(cfg)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    run_dir, lock = rundir.new_run_dir(cfg, overwrite=False)
    try:
        summary = run_federation(task, run_dir)
    finally:
        lock.release()
    return task, before, summary, rundir.read_metrics(run_dir)


ROUNDS = {
    "full": {},
    "lora": {"method.target_modules": "all-linear"},
    "prompt": {},
    "adapter": {},
    "zo": {"method.params": "lora"},
    "sfprompt": {"method.head_blocks": 0, "method.tail_blocks": 1, "method.num_tokens": 4},
    "fedpft": {"method.keep_layers": [0], "method.distill_steps": 4, "method.realign_every": 0},
}


@pytest.mark.parametrize("method", list(ROUNDS))
def test_every_method_runs_rounds_on_a_causal_lm(tmp_path: Path, method: str):
    task, before, summary, lines = _run(tmp_path, method, **ROUNDS[method])
    names = set(task.method.trainable_names)
    after = dict(task.model.named_parameters())
    frozen = [n for n in before if n not in names and n in after]
    if method == "fedpft":  # the sub-model's FFNs are the distilled ones the server sent
        frozen = [n for n in frozen if ".mlp." not in n]
    if method != "sfprompt":  # sfprompt's client model has no body; the server's is checked
        assert all(torch.equal(after[n], before[n]) for n in frozen if "lora" not in n)
    assert summary["final_loss"] is not None and np.isfinite(summary["final_loss"])
    assert 0 <= summary["final_rouge_l"] <= 1
    assert summary["failed_client_updates"] == 0
    if method != "sfprompt":  # its clients hold no body to score with
        assert 0 <= summary["client_eval"]["weighted_rouge_l"] <= 1
    clients = [len(m["clients"]) for m in lines]
    up = sum(m["bytes_up"] for m in lines)
    if method in ("full", "lora", "prompt", "adapter"):
        assert up == sum(clients) * task.trainable_bytes
    elif method == "zo":  # one int64 seed and one float32 scalar a step
        steps = task.cfg.train.max_steps
        assert up == sum(clients) * steps * (8 + 4)
    elif method == "fedpft":
        assert sum(m["parameter_bytes"] for m in lines) == 2 * sum(clients) * task.trainable_bytes
    else:
        assert sum(m["activation_bytes"] for m in lines) > 0
    if method == "lora":  # all-linear: the MLP's projections too, never the LM head
        assert any("mlp.down_proj.lora_A" in n for n in names)
        assert not any("lm_head" in n for n in names)


def test_sample_level_dp_runs_and_client_level_dp_runs(tmp_path: Path):
    dp = {"privacy.epsilon": 8.0, "data.max_test_samples": 6, "task.eval_generations": 0}
    _, _, sample, _ = _run(tmp_path / "s", "lora", **{"privacy.mode": "sample", **dp})
    assert 0 < sample["privacy"]["epsilon_max"] <= 8.0 and sample["failed_client_updates"] == 0
    _, _, client, lines = _run(tmp_path / "c", "prompt", **{"privacy.mode": "client", **dp})
    assert 0 < client["privacy"]["epsilon_max"] <= 8.0
    assert all("clients" not in m and m["train_loss"] is None for m in lines)


@pytest.mark.parametrize("method", list(BACKPROP))
def test_opacus_per_example_gradients_of_llama_modules_are_exact(base, method: str):
    """Per-example gradients (what DP-SGD clips) of every trained module of a Llama, embeddings
    tied to the LM head and RMSNorm included for `full`, equal autograd's one example at a time."""
    model, names = fresh(base, method, **BACKPROP[method])
    model.train()  # Opacus records activations in training mode only (tiny-llama has no dropout)
    batch = base.data.train.batch(np.arange(3))
    params = dict(model.named_parameters())
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        model.task.loss(wrapped(batch), batch).backward()
        samples = {n: params[n].grad_sample.detach().clone() for n in names}
    finally:
        wrapped.to_standard_module()
    for i in range(3):
        losses = model.task.example_losses(model(batch), batch)
        grads = torch.autograd.grad(losses[i], [params[n] for n in names])
        for name, grad in zip(names, grads, strict=True):
            torch.testing.assert_close(samples[name][i], grad, rtol=1e-4, atol=1e-6, msg=name)
