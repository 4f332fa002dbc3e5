"""The end-of-run client evaluation scores many clients' rows in one pass: each client's metrics
must be what it scores alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fedft.federation.client import ClientRuntime
from fedft.federation.engine import build_task, make_server
from fedft.federation.grid import LocalGrid
from fedft.federation.payload import Message, Payload
from fedft.federation.training import read_state, train_locally, write_state

from helpers import LABEL_WORDS, tiny_config, tiny_llama_config

CASES = {
    "classify": lambda p: tiny_config(p, "lora", **{"federation.clients": 6}),
    "generate-sft": lambda p: tiny_llama_config(p, "lora", **{"federation.clients": 4}),
    "generate-labels": lambda p: tiny_llama_config(p, "lora", **LABEL_WORDS),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_clients_scored_together_score_what_each_scores_alone(tmp_path: Path, case: str):
    task = build_task(CASES[case](tmp_path))
    server = make_server(task)
    runtime = ClientRuntime(task.method, task.model, task.data, task.cfg, task.device)
    clients = [c for c in range(task.cfg.federation.clients) if len(task.data.clients[c].test)]
    messages = [Message(c, "evaluate", server.evaluation_payload(c), 1) for c in clients]
    assert len(clients) >= 3

    together = runtime.handle_batch(messages)
    alone = [runtime.handle(m) for m in messages]

    assert together is not None and len(together) == len(alone)
    for joint, single in zip(together, alone, strict=True):
        assert joint.scalars.keys() == single.scalars.keys()
        assert joint.scalars["num_examples"] == single.scalars["num_examples"]
        for key, value in single.scalars.items():
            assert joint.scalars[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    if case == "generate-sft":  # each client's own generation rows, as alone
        assert all(p.scalars["generated"] == min(2, p.scalars["num_examples"]) for p in together)
    if case != "generate-sft":  # the example-weighted mean of the parts scores the union
        rows = np.concatenate([task.data.clients[c].test for c in clients])
        union = task.model.task.evaluate(
            task.model, task.data.train, rows, task.cfg.train.batch_size * 4, task.device
        )
        weights = np.array([p.scalars["num_examples"] for p in together], dtype=float)
        # (a generated row's loss is per token, not per example: only accuracy adds up so)
        for key in ("loss", "accuracy") if case == "classify" else ("accuracy",):
            mean = sum(p.scalars[key] * w for p, w in zip(together, weights, strict=True))
            mean /= weights.sum()
            assert mean == pytest.approx(union[key], rel=1e-5)


def test_clients_sent_different_tensors_are_scored_one_by_one(tmp_path: Path):
    task = build_task(tiny_config(tmp_path, "lora"))
    server = make_server(task)
    runtime = ClientRuntime(task.method, task.model, task.data, task.cfg, task.device)
    sent = server.evaluation_payload(0)
    other = Payload({k: v + 0.5 for k, v in sent.tensors.items()}, dict(sent.scalars))
    messages = [Message(0, "evaluate", sent, 1), Message(1, "evaluate", other, 1)]

    assert runtime.handle_batch(messages) is None
    replies = LocalGrid(runtime, task.device).exchange(messages)  # falls back, each its own
    for message, reply in zip(messages, replies, strict=True):
        assert reply.ok
        alone = runtime.handle(message).scalars
        assert reply.payload.scalars["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert replies[0].payload.scalars["loss"] != pytest.approx(replies[1].payload.scalars["loss"])


def test_a_joint_evaluation_charges_each_client_an_equal_share(tmp_path: Path):
    task = build_task(tiny_config(tmp_path, "head", **{"federation.clients": 4}))
    server = make_server(task)
    runtime = ClientRuntime(task.method, task.model, task.data, task.cfg, task.device)
    messages = [Message(c, "evaluate", server.evaluation_payload(c), 1) for c in range(4)]
    replies = LocalGrid(runtime, task.device).exchange(messages)
    assert len({r.cost.seconds for r in replies}) == 1
    sent = messages[0].payload.tensor_bytes  # each client is still sent the model it scores
    assert sent > 0 and all(r.cost.bytes_down == sent and r.cost.bytes_up == 0 for r in replies)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_a_text_batch_trimmed_of_its_padding_scores_as_the_padded_one(tmp_path: Path, method):
    task = build_task(tiny_config(tmp_path, method, **{"model.max_length": 32}))
    task.model.eval()
    data = task.data.train
    rows = np.argsort(data.lengths)[:8]  # the shortest rows: most of their columns are padding
    trimmed = data.batch(rows)
    padded = {k: v[torch.as_tensor(rows)] for k, v in data.features.items()}
    padded["labels"] = data.labels[torch.as_tensor(rows)]
    assert trimmed["input_ids"].shape[1] == data.lengths[rows].max() < 32
    assert padded["input_ids"].shape[1] == 32
    with torch.no_grad():
        torch.testing.assert_close(task.model(trimmed), task.model(padded), rtol=1e-4, atol=1e-5)


def test_training_on_trimmed_batches_ends_where_padded_batches_do(tmp_path: Path):
    """Trimming changes no result but the dropout masks' draws: without dropout, the same
    steps on padded and on trimmed batches end at the same weights."""
    task = build_task(tiny_config(tmp_path, "lora", **{"model.max_length": 32}))
    for module in task.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    names, rows = task.method.trainable_names, task.data.clients[0].train
    assert task.data.train.lengths[rows].mean() < 24  # batches are mostly narrower than padded
    start = read_state(task.model, names)
    ends = []
    for data in (task.data.train, dataclasses.replace(task.data.train, trim=False)):
        write_state(task.model, start)
        train_locally(task.model, names, data, rows, task.cfg.train, 1e-2, 0, task.device)
        ends.append(read_state(task.model, names))
    for name in names:
        assert not torch.equal(ends[0][name], start[name])
        torch.testing.assert_close(ends[0][name], ends[1][name], rtol=1e-4, atol=1e-6)
