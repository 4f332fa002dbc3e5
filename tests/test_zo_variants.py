"""zo's variants: each direction distribution (and sparse perturbations) estimates what it should
on a quadratic, directions are the same on every device, the exact head's gradient is autograd's,
the zero-shot start, and seeds-mode rounds with all of them replay exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedft.errors import ConfigError, ModelError
from fedft.federation.engine import build_task, run_federation
from fedft.methods.zo.directions import Directions, sparse_masks
from fedft.methods.zo.head import head_module
from fedft.metrics import rundir
from fedft.models.zero_shot import CosineHead

from helpers import LABEL_WORDS, tiny_config, tiny_llama_config


def quadratic_estimate(directions: Directions, theta: list[torch.Tensor], draws: int):
    """The mean of (f(θ+εz) − f(θ−εz)) / 2ε · z over `draws` seeds, for f(θ) = ½θᵀAθ + bᵀθ
    over the concatenated parameters; and ∇f at θ."""
    torch.manual_seed(0)
    d = sum(t.numel() for t in theta)
    m = torch.randn(d, d, dtype=torch.float64)
    a = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, dtype=torch.float64)

    def f() -> float:
        x = torch.cat([t.flatten() for t in theta]).double()
        return float(0.5 * x @ a @ x + b @ x)

    x = torch.cat([t.flatten() for t in theta]).double()
    true = a @ x + b
    eps, total = 1e-2, torch.zeros(d, dtype=torch.float64)
    for seed in range(draws):
        directions.add(theta, seed, [eps] * len(theta))
        plus = f()
        directions.add(theta, seed, [-2 * eps] * len(theta))
        minus = f()
        directions.add(theta, seed, [eps] * len(theta))
        z = [torch.zeros_like(t) for t in theta]
        directions.add(z, seed, [1.0] * len(z))
        total += (plus - minus) / (2 * eps) * torch.cat([t.flatten() for t in z]).double()
    return total / draws, true


def params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 5, generator=g), torch.randn(6, generator=g)]


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_each_distribution_estimates_the_gradient_of_a_quadratic(distribution: str):
    theta = params()
    estimate, true = quadratic_estimate(Directions(distribution), theta, 6000)
    assert F.cosine_similarity(estimate, true, dim=0) > 0.97
    assert float(estimate.norm() / true.norm()) == pytest.approx(1.0, abs=0.1)
    after = params()
    # every draw put θ back, up to float32 rounding over 6000 draws
    assert all(torch.allclose(t, u, atol=1e-4) for t, u in zip(theta, after, strict=True))


def test_sparse_perturbations_estimate_the_masked_gradient():
    theta = params()
    masks = sparse_masks(theta, 0.75)
    assert masks[1] is None  # a vector moves whole
    kept = masks[0]
    assert int(kept.sum()) == 5  # ⌈0.25 · 20⌉ entries, the smallest in magnitude
    assert float(theta[0].abs()[kept].max()) <= float(theta[0].abs()[~kept].min())
    estimate, true = quadratic_estimate(Directions("gaussian", masks), theta, 6000)
    mask = torch.cat([kept.flatten().double(), torch.ones(6, dtype=torch.float64)])
    assert estimate[mask == 0].abs().max() == 0  # frozen entries never move
    assert F.cosine_similarity(estimate, mask * true, dim=0) > 0.97
    assert float(estimate.norm() / (mask * true).norm()) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_directions_are_the_same_on_every_device_present(distribution: str):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    draws = []
    for device in devices:
        z = [torch.zeros(3, 1 << 19, device=device), torch.zeros(7, device=device)]
        Directions(distribution).add(z, 1234, [1.0, 1.0])
        draws.append([t.cpu() for t in z])
    again = [torch.zeros(3, 1 << 19), torch.zeros(7)]
    Directions(distribution).add(again, 1234, [1.0, 1.0])
    for got in [*draws, again]:
        assert all(torch.equal(a, b) for a, b in zip(got, draws[0], strict=True))
    if distribution == "rademacher":
        assert set(torch.unique(draws[0][0]).tolist()) == {-1.0, 1.0}


def test_the_exact_head_gradient_is_autograds(tmp_path: Path):
    task = build_task(
        tiny_config(tmp_path, "zo", **{"method.start": "task", "method.head": "exact"})
    )
    model, names = task.model, task.method.head_names
    assert names == ["net.classifier.weight", "net.classifier.bias"]
    assert not any(n in task.method.body_names for n in names)
    head = task.method.exact_head(model)
    batch = task.data.train.batch(np.arange(8))
    model.eval()
    with torch.no_grad(), head.capture():
        model(batch)
    ours = head.gradients(batch)
    assert all(not p.requires_grad for p in model.parameters())  # inference-level again
    params = dict(model.named_parameters())
    with torch.enable_grad():
        for n in names:
            params[n].requires_grad_(True)
        loss = F.cross_entropy(model(batch), batch["labels"])
        theirs = torch.autograd.grad(loss, [params[n] for n in names])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_the_zero_shot_start_scores_label_names(tmp_path: Path):
    task = build_task(tiny_config(tmp_path, "zo", **{"method.start": "zero_shot"}))
    name, head = head_module(task.model.net)
    assert name == "classifier" and isinstance(head, CosineHead)
    assert head.weight.shape[0] == task.model.num_labels
    assert "net.classifier.weight" in task.method.trainable_names
    with pytest.raises(ModelError, match="not a text encoder"):  # a causal LM has label words
        build_task(tiny_llama_config(tmp_path / "v", "zo", **{"method.start": "zero_shot"}))


def test_exact_head_refusals(tmp_path: Path):
    with pytest.raises(ConfigError, match="mechanism and accountant of their own"):
        build_task(
            tiny_config(
                tmp_path,
                "zo",
                **{"method.head": "exact", "privacy.mode": "sample", "privacy.epsilon": 8},
            )
        )
    with pytest.raises(ConfigError, match="use method 'head'"):
        build_task(tiny_config(tmp_path, "zo", **{"method.head": "exact", "method.params": "head"}))


DP = {"privacy.mode": "sample", "privacy.epsilon": 8}


@pytest.mark.parametrize(
    ("llama", "sets", "start", "head", "lr", "head_lr", "sparsity"),
    [
        (False, {}, "zero_shot", "exact", 1e-4, 1e-1, 0.0),
        (False, DP, "zero_shot", "zo", 1e-4, None, 0.0),  # the exact head has no DP mechanism
        (False, {"method.params": "head"}, "zero_shot", "zo", 1e-3, None, 0.0),
        (False, {"method.params": "lora"}, "zero_shot", "exact", 3e-3, 1e-1, 0.0),
        (False, {"method.start": "task"}, "task", "exact", 1e-4, 1e-1, 0.0),
        (False, {"method.start": "task", "method.head": "zo"}, "task", "zo", 3e-3, None, 0.0),
        (True, {**LABEL_WORDS, "method.params": "lora"}, "task", "exact", 3e-3, 1e-2, 0.75),
        (True, {**LABEL_WORDS, "method.sparsity": 0.0}, "task", "exact", 1e-4, 1e-2, 0.0),
        (True, {**LABEL_WORDS, **DP}, "task", "zo", 3e-3, None, 0.0),
        (True, {"method.params": "lora"}, "task", "zo", 3e-3, None, 0.0),  # no label rows
    ],
)
def test_zo_defaults_are_the_benchmarks_best_variant_where_the_run_allows_it(
    tmp_path: Path,
    llama: bool,
    sets: dict,
    start: str,
    head: str,
    lr: float,
    head_lr: float,
    sparsity: float,
):
    """`--method zo` alone: a meaningful start (an encoder's zero-shot head; a causal LM's label
    words are one already), the exact head, with the swept learning rates, and on a causal LM's
    label words sparse perturbations (the SmolLM2 row that held); an explicit value wins."""
    cfg = (tiny_llama_config if llama else tiny_config)(tmp_path, "zo", **sets)
    task = build_task(cfg)
    assert task.method.choices() == {
        "start": start,
        "head": head,
        "head_lr": head_lr,
        "sparsity": sparsity,
    }
    masks = task.method.directions_for([torch.randn(4, 4)]).masks
    assert (masks is not None) == (sparsity > 0)
    assert task.method.lr(cfg) == lr
    assert bool(task.method.head_names) == (head == "exact")
    if start == "zero_shot":
        assert isinstance(head_module(task.model.net)[1], CosineHead)


@pytest.mark.parametrize(
    "sets",
    [
        {"method.head": "exact", "method.start": "zero_shot"},
        {"method.head": "zo", "method.distribution": "rademacher", "method.sparsity": 0.5},
        {"method.head": "exact", "method.params": "lora", "method.distribution": "rademacher"},
    ],
    ids=["exact-zero-shot", "rademacher-sparse", "exact-lora-rademacher"],
)
def test_seeds_mode_rounds_replay_exactly_and_send_what_they_say(tmp_path: Path, sets: dict):
    """Clients that sat out rounds catch up by replaying records (a checksum mismatch would fail
    them), the exact head travels whole, the rest as 12 bytes a step."""
    cfg = tiny_config(
        tmp_path,
        "zo",
        **{
            "federation.rounds": 4,
            "federation.clients": 4,
            "federation.sample_fraction": 0.5,
            **sets,
        },
    )
    task = build_task(cfg)
    run_dir, lock = rundir.new_run_dir(cfg, overwrite=False)
    try:
        summary = run_federation(task, run_dir)
    finally:
        lock.release()
    lines = rundir.read_metrics(run_dir)
    assert summary["failed_client_updates"] == 0
    assert summary["method_choices"] == task.method.choices()  # what ran, beside the config
    assert summary["lr"] == task.method.lr(cfg)
    caught_up = [c for m in lines[1:] for c in m["clients"] if c not in lines[0]["clients"]]
    assert caught_up  # someone synced from records or the whole state, and it checked out
    params = dict(task.model.named_parameters())
    head = sum(params[n].numel() * 4 for n in task.method.head_names)
    steps = cfg.train.max_steps
    for m in lines:
        assert all(c["bytes_up"] == steps * 12 + head for c in m["per_client"])


def test_a_causal_lms_label_word_rows_train_by_exact_gradients(tmp_path: Path):
    """On label words, the exact head is the LM head's rows of the label words' tokens, kept as a
    parameter of their own: the model starts as it was, and their gradient is autograd's."""
    sets = {**LABEL_WORDS, "method.params": "lora", "method.head": "exact"}
    task = build_task(tiny_llama_config(tmp_path, "zo", **sets))
    model = task.model
    assert task.method.head_names == ["label_head.rows"]
    ids = model.label_head.ids
    assert sorted(set(ids.tolist())) == sorted({t for w in model.task.word_ids for t in w})
    batch = task.data.train.batch(np.arange(4))
    model.eval()
    with torch.no_grad():
        patched = model(batch)
        model.label_head.rows.add_(0.0)  # the rows are the LM head's own: nothing changed
        head = model.net.get_output_embeddings()
        plain = model.net(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits[:, -patched.shape[1] :]
    torch.testing.assert_close(patched, plain)
    exact = task.method.exact_head(model)
    with torch.no_grad(), exact.capture():
        model(batch)
    ours = exact.gradients(batch)[0]
    rows = model.label_head.rows
    with torch.enable_grad():
        rows.requires_grad_(True)
        (theirs,) = torch.autograd.grad(model.task.loss(model(batch), batch), [rows])
        rows.requires_grad_(False)
    torch.testing.assert_close(ours, theirs)
    assert head.weight.shape[0] > 1000 and rows.shape[0] == len(ids)  # a few rows, not the matrix
    # and rounds: the rows travel whole, the LoRA as seeds, and catching up replays exactly
    cfg = tiny_llama_config(
        tmp_path / "run",
        "zo",
        **{
            **sets,
            "federation.rounds": 3,
            "federation.clients": 4,
            "federation.sample_fraction": 0.5,
        },
    )
    task = build_task(cfg)
    run_dir, lock = rundir.new_run_dir(cfg, overwrite=False)
    try:
        summary = run_federation(task, run_dir)
    finally:
        lock.release()
    assert summary["failed_client_updates"] == 0
    lines = rundir.read_metrics(run_dir)
    assert any(c not in lines[0]["clients"] for m in lines[1:] for c in m["clients"])
    per_client = cfg.train.max_steps * 12 + rows.numel() * 4
    assert all(c["bytes_up"] == per_client for m in lines for c in m["per_client"])
