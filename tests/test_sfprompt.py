"""`sfprompt`: the cut, the split protocol's gradients, EL2N pruning, and what the client holds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedft.federation.client import ClientRuntime
from fedft.federation.engine import build_task, run_federation
from fedft.federation.grid import LocalGrid
from fedft.federation.training import (
    derived_seed,
    parameters_by_name,
    read_state,
    write_state,
)
from fedft.methods.prompt import PromptOptions, PromptTuning
from fedft.methods.sfprompt import client as sf_client
from fedft.methods.sfprompt.client import SplitClient
from fedft.methods.sfprompt.pruning import el2n_scores, keep_highest
from fedft.methods.sfprompt.split import BodyRunner, Stop, blocks_prefix, strip_body
from fedft.metrics import rundir
from fedft.models.backbone import load_task_model

from helpers import assert_same_global_state, shared_dataset, tiny_config


def no_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def sample_batch(model_name: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    sets = {"data.source": str(shared_dataset("optdigits"))} if model_name == "tiny-vit" else {}
    task = build_task(tiny_config(tmp_path, "head", model=model_name, **sets))
    return task.data.train.batch(np.arange(6))


def split_logits(client, runner, batch, relay) -> torch.Tensor:
    relay.mode = "capture"
    try:
        client(batch)
    except Stop as stop:
        head_out = stop.hidden
    relay.mode = "skip"
    inputs = (
        {
            "input_ids": torch.zeros_like(batch["attention_mask"]),
            "attention_mask": batch["attention_mask"],
        }
        if "attention_mask" in batch
        else {"pixel_values": torch.zeros_like(batch["pixel_values"])}
    )
    body_out = runner.forward(head_out, inputs)
    relay.mode, relay.incoming = "inject", body_out
    try:
        return client(batch)
    finally:
        relay.mode, relay.incoming = "skip", None


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-vit"])
@pytest.mark.parametrize(("head", "tail"), [(0, 1), (1, 0)])
@pytest.mark.parametrize("prompts", [0, 3])
def test_split_forward_equals_the_unsplit_model(tmp_path: Path, model_name, head, tail, prompts):
    batch = sample_batch(model_name, tmp_path)
    models = [load_task_model(model_name, 10, 16, seed=0) for _ in range(3)]
    if prompts:
        for m in models:
            torch.manual_seed(1)  # the same prompt tokens in all three
            PromptTuning(PromptOptions(num_tokens=prompts)).attach(m)
    whole, client, server = models
    for m in models:
        m.eval()
    relay = strip_body(client, head, tail)
    runner = BodyRunner(server, head, tail)
    with torch.no_grad():
        expected = whole(batch)
        got = split_logits(client, runner, batch, relay)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the server's model is whole again after the call
    torch.testing.assert_close(server(batch), expected, rtol=1e-5, atol=1e-5)


def sf_config(tmp_path: Path, **sets):
    base = {
        "method.num_tokens": 3,
        "method.head_blocks": 0,
        "method.tail_blocks": 1,
        "federation.clients": 2,
        "federation.sample_fraction": 1.0,
    }
    return tiny_config(tmp_path, "sfprompt", **{**base, **sets})


def test_client_model_holds_no_body_parameter(tmp_path: Path):
    task = build_task(sf_config(tmp_path))
    prefix = blocks_prefix(task.model)
    names = [n for n, _ in task.model.named_parameters()]
    assert not [n for n in names if n.startswith(prefix + "0.")]  # the body: block 0 of 2
    assert any(n.startswith(prefix + "1.") for n in names)  # the tail is here
    server = task.method.make_server(task.cfg, read_state(task.model, task.method.trainable_names))
    body = dict(server.model.named_parameters())
    body_params = [p for n, p in body.items() if n.startswith(prefix + "0.")]
    assert body_params
    full = sum(p.numel() for p in server.model.parameters())
    client = sum(p.numel() for p in task.model.parameters())
    assert client == full - sum(p.numel() for p in body_params)
    client_storage = {p.data_ptr() for p in task.model.parameters()}
    assert not client_storage & {p.data_ptr() for p in body_params}


def test_split_protocol_gradients_equal_autograd_on_the_unsplit_model(tmp_path: Path):
    cfg = sf_config(
        tmp_path,
        **{
            "federation.clients": 2,
            "train.optimizer": "sgd",
            "train.lr": 1.0,
            "method.prompt_lr": 1.0,
            "train.max_steps": 1,
            "method.keep_fraction": 1.0,
            "method.local_epochs": 0,
            "method.chunk_batches": 1,
        },
    )
    task = build_task(cfg)
    no_dropout(task.model)
    names = task.method.trainable_names
    initial = read_state(task.model, names)
    server = task.method.make_server(cfg, initial)
    runtime = ClientRuntime(task.method, task.model, task.data, cfg, task.device)
    plans = {}  # the split batches a client planned (its state is emptied when its round ends)

    def keep_plan(reply) -> None:
        if reply.kind == "sf_start":
            plans[reply.client] = runtime.states[reply.client]["plan"].clone()

    grid = LocalGrid(runtime, task.device, on_reply=keep_plan)
    outcome = server.run_round(1, grid, [0])
    kinds = [r.kind for r in outcome.replies]
    assert kinds == ["sf_start", "sf_tail", "sf_head"]  # one chunk of one batch

    rows = plans[0][0]
    batch = task.data.train.batch(rows[rows >= 0].numpy())
    reference = load_task_model(
        cfg.model.name, task.data.num_labels, cfg.model.max_length, cfg.seed
    )
    PromptTuning(PromptOptions(num_tokens=3)).attach(reference)
    write_state(reference, initial)
    no_dropout(reference)
    reference.train()
    params = parameters_by_name(reference, names)
    loss = F.cross_entropy(reference(batch), batch["labels"])
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, value), grad in zip(params.items(), grads, strict=True):
        expected = value.detach() - grad  # SGD at lr 1 for prompts and tail
        torch.testing.assert_close(server.global_state[name], expected, rtol=1e-4, atol=1e-6)
    prompt_grads = [g for n, g in zip(names, grads, strict=True) if n.startswith("prompt.")]
    assert prompt_grads and all(float(g.abs().max()) > 0 for g in prompt_grads)


def test_el2n_pruning_keeps_the_highest_scores(tmp_path: Path):
    rows = np.arange(100, 117)
    scores = np.random.default_rng(0).random(17)
    for fraction in (0.1, 0.5, 0.77, 1.0):
        kept = keep_highest(rows, scores, fraction)
        assert len(kept) == math.ceil(fraction * 17)
        assert kept.tolist() == (rows[np.argsort(-scores)][: len(kept)]).tolist()
    task = build_task(tiny_config(tmp_path, "head"))
    split = task.data.clients[0].train
    got = el2n_scores(task.model, task.data.train, split, 7, task.device)
    task.model.eval()
    with torch.no_grad():
        batch = task.data.train.batch(split)
        probs = task.model(batch).softmax(-1)
    onehot = F.one_hot(batch["labels"], probs.shape[-1]).float()
    np.testing.assert_allclose(got, (probs - onehot).norm(dim=-1).numpy(), rtol=1e-5)


def test_class_balanced_pruning_keeps_the_share_of_each_class():
    """Where one class holds every high score, a global cut keeps that class alone; per class,
    each label keeps ceil(share * its rows), its own highest, all highest first."""
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.array([0] * 20 + [1] * 9))
    scores = rng.random(29) + (labels == 0)  # every row of class 0 scores above class 1's
    rows = np.arange(300, 329)
    assert set(labels[keep_highest(rows, scores, 0.5) - 300]) == {0}
    kept = keep_highest(rows, scores, 0.5, labels)
    for label, share in ((0, 10), (1, 5)):
        members = rows[labels == label]
        best = members[np.argsort(-scores[labels == label])][:share]
        assert sorted(r for r in kept if labels[r - 300] == label) == sorted(best)
    assert list(scores[kept - 300]) == sorted(scores[kept - 300], reverse=True)


def test_warm_up_rounds_keep_every_row_then_pruning_starts(tmp_path: Path):
    sets = {
        "method.keep_fraction": 0.5,
        "method.prune_warmup_rounds": 1,
        "method.prune_per_class": True,
        "federation.rounds": 2,
    }
    cfg = sf_config(tmp_path, **sets)
    task = build_task(cfg)
    run_dir = Path(cfg.output_dir) / "warm"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    run_federation(task, run_dir)
    first, second = rundir.read_metrics(run_dir)
    clients = [task.data.clients[c].train for c in (0, 1)]
    assert first["kept_examples"] == sum(len(rows) for rows in clients)
    labels = task.data.train.labels
    per_class = [
        math.ceil(0.5 * int((labels[rows] == label).sum()))
        for rows in clients
        for label in labels[rows].unique().tolist()
    ]
    assert second["kept_examples"] == sum(per_class)


def test_a_round_reports_activation_and_parameter_bytes_apart(tmp_path: Path):
    cfg = sf_config(tmp_path, **{"method.keep_fraction": 0.5, "method.chunk_batches": 2})
    task = build_task(cfg)
    run_dir = Path(cfg.output_dir) / "sf"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    summary = run_federation(task, run_dir)
    lines = rundir.read_metrics(run_dir)
    for line in lines:
        tensor_bytes = line["bytes_up"] + line["bytes_down"]
        assert line["activation_bytes"] + line["parameter_bytes"] == tensor_bytes
        assert line["parameter_bytes"] == 2 * 2 * task.trainable_bytes  # both ways, 2 clients
        assert line["activation_bytes"] > 0 and line["clients"] == [0, 1]
        kept = [math.ceil(0.5 * len(task.data.clients[c].train)) for c in (0, 1)]
        assert line["kept_examples"] == sum(kept)
        assert line["exchanges"] == 2 * (1 + 2 * 2)  # 3 batches in chunks of 2: 2 chunks
    assert summary["final_accuracy"] is not None


def test_a_resumed_sfprompt_run_equals_an_unbroken_one(tmp_path: Path):
    sets = {"federation.rounds": 3, "method.chunk_batches": 2}
    a = Path(tmp_path / "runs" / "a")
    rundir.start_run_dir(a, "{}", overwrite=False)
    full = run_federation(build_task(sf_config(tmp_path, **sets)), a)
    b = Path(tmp_path / "runs" / "b")
    rundir.start_run_dir(b, "{}", overwrite=False)
    run_federation(build_task(sf_config(tmp_path, **{**sets, "federation.rounds": 2})), b)
    resumed = run_federation(build_task(sf_config(tmp_path, **sets)), b, resume=True)
    assert resumed["final_loss"] == full["final_loss"]
    assert_same_global_state(a, b)


@pytest.mark.parametrize("phase1_rows", ["kept", "all"])
def test_phase_1_trains_on_the_rows_pruning_kept(tmp_path: Path, monkeypatch, phase1_rows: str):
    kept, trained = [], []
    prune = sf_client.keep_highest
    monkeypatch.setattr(
        sf_client, "keep_highest", lambda *args: kept.append(prune(*args)) or kept[-1]
    )
    local_loss_phase = SplitClient.local_loss_phase

    def spying(self, rows):
        batch = self.batch
        self.batch = lambda index: trained.append(index) or batch(index)
        try:
            return local_loss_phase(self, rows)
        finally:
            del self.batch

    monkeypatch.setattr(SplitClient, "local_loss_phase", spying)
    cfg = sf_config(
        tmp_path,
        **{
            "method.keep_fraction": 0.25,
            "method.local_epochs": 1,
            "method.phase1_rows": phase1_rows,
            "train.max_steps": 50,  # phase 1 runs its whole epoch
        },
    )
    task = build_task(cfg)
    server = task.method.make_server(cfg, read_state(task.model, task.method.trainable_names))
    runtime = ClientRuntime(task.method, task.model, task.data, cfg, task.device)
    server.run_round(1, LocalGrid(runtime, task.device), [1])
    (pruned,) = kept
    rows = task.data.clients[1].train
    assert len(pruned) == math.ceil(0.25 * len(rows)) < len(rows)
    expected = pruned if phase1_rows == "kept" else rows
    assert sorted(np.concatenate(trained).tolist()) == sorted(expected.tolist())  # one epoch


def test_a_client_holds_nothing_once_its_round_is_over(tmp_path: Path):
    cfg = sf_config(tmp_path, **{"federation.clients": 3, "method.chunk_batches": 1})
    task = build_task(cfg)
    server = task.method.make_server(cfg, read_state(task.model, task.method.trainable_names))
    runtime = ClientRuntime(task.method, task.model, task.data, cfg, task.device)
    during = {}

    def after(reply) -> None:  # between a client's requests its state bridges them
        state = runtime.states[reply.client]
        if reply.kind == "sf_tail":
            during[reply.client] = {k for k, v in state.items() if torch.is_tensor(v)}

    for number in (1, 2):
        outcome = server.run_round(number, LocalGrid(runtime, task.device, after), [0, 2])
        assert all(r.ok for r in outcome.replies)
        assert {c: runtime.states[c] for c in (0, 2)} == {0: {}, 2: {}}
    assert any(k.startswith("optt.") for k in during[0])  # the tail's Adam moments, mid-round


@pytest.mark.parametrize("keep", ["hardest", "easiest", "random"])
def test_pruning_keeps_the_hardest_the_easiest_or_a_seeded_random_share(
    tmp_path: Path, monkeypatch, keep: str
):
    asked, scored = [], []
    prune, el2n = sf_client.keep_highest, sf_client.el2n_scores
    monkeypatch.setattr(sf_client, "keep_highest", lambda *args: asked.append(args) or prune(*args))
    monkeypatch.setattr(
        sf_client, "el2n_scores", lambda *args: scored.append(el2n(*args)) or scored[-1]
    )
    cfg = sf_config(tmp_path, **{"method.keep_fraction": 0.5, "method.prune_keep": keep})
    task = build_task(cfg)
    server = task.method.make_server(cfg, read_state(task.model, task.method.trainable_names))
    runtime = ClientRuntime(task.method, task.model, task.data, cfg, task.device)
    server.run_round(1, LocalGrid(runtime, task.device), [1])
    ((rows, scores, fraction, _),) = asked
    assert fraction == 0.5 and len(rows) == len(task.data.clients[1].train)
    if keep == "random":  # no scoring pass; the client's own seeded draw
        assert not scored
        seed = derived_seed(cfg.seed, 1, 1)
        np.testing.assert_array_equal(scores, np.random.default_rng(seed).random(len(rows)))
    else:  # EL2N as scored, the hardest first or the easiest first
        (el2n_now,) = scored
        np.testing.assert_array_equal(scores, el2n_now if keep == "hardest" else -el2n_now)
