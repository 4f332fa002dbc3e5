"""Training speed options of local backprop: gradient checkpointing changes memory, not the
step; bf16 autocast changes the step only by bf16 rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedft.errors import ConfigError
from fedft.federation.engine import build_task
from fedft.federation.training import read_state, train_locally, write_state

from helpers import tiny_config, tiny_llama_config


def one_round(task, **train) -> tuple[dict[str, torch.Tensor], float]:
    """How two SGD steps of client 0 move the trainable tensors from the same start (SGD: the
    move is the gradients'), and the mean loss."""
    update = {"max_steps": 2, "max_grad_norm": None, "optimizer": "sgd", **train}
    cfg = task.cfg.train.model_copy(update=update)
    names = task.method.trainable_names
    start = read_state(task.model, names)
    rows = task.data.clients[0].train
    stats = train_locally(task.model, names, task.data.train, rows, cfg, 1e-1, 7, task.device)
    moved = {n: t - start[n] for n, t in read_state(task.model, names).items()}
    write_state(task.model, start)
    return moved, stats.mean_loss


@pytest.mark.parametrize("llama", [False, True])
def test_checkpointing_gives_the_same_step_and_bf16_a_close_one(tmp_path: Path, llama: bool):
    config = tiny_llama_config if llama else tiny_config
    task = build_task(config(tmp_path, "lora"))
    for module in task.model.modules():  # dropout would draw differently when recomputed
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    calls = []  # a module inside a block: the backward pass re-runs it when recomputing
    inner = next(m for m in task.model.blocks()[0].modules() if isinstance(m, torch.nn.Linear))
    inner.register_forward_hook(lambda *_: calls.append(1))
    plain, plain_loss = one_round(task)
    assert len(calls) == 2  # a forward a step
    recomputed, recomputed_loss = one_round(task, gradient_checkpointing=True)
    assert len(calls) == 2 + 4  # and again in each backward pass: recomputed
    assert recomputed_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, tensor in plain.items():
        torch.testing.assert_close(recomputed[name], tensor, rtol=1e-5, atol=1e-7)
    assert not task.model.net.is_activation_checkpointing  # the shared model is as it was
    half, half_loss = one_round(task, precision="bf16")
    assert half_loss == pytest.approx(plain_loss, rel=3e-2)
    a = torch.cat([t.flatten() for t in plain.values()])
    b = torch.cat([half[n].flatten() for n in plain])
    assert not torch.equal(a, b)  # bf16 rounding changed the step, not its direction
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99


def test_checkpointing_a_model_that_cannot_is_refused(tmp_path: Path):
    sets = {"train.gradient_checkpointing": True, "method.start": "zero_shot"}
    with pytest.raises(ConfigError, match="cannot recompute its blocks"):
        build_task(tiny_config(tmp_path, "zo", **sets))
