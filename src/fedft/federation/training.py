"""Local training and evaluation on the shared model, and moving trainable state in and out of it.

Randomness is derived from (run seed, round, client), never from a global stream, so a client's
work is the same whichever order clients run in, and a resumed run replays exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedft.config import TrainConfig
from fedft.data.encode import TensorData
from fedft.tasks import Classify, Task


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def parameters_by_name(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    return {name: params[name] for name in names}


def read_state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the named parameters: what a client sends."""
    params = parameters_by_name(model, names)
    return {name: p.detach().to("cpu", copy=True) for name, p in params.items()}


@torch.no_grad()
def write_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        params[name].copy_(value)


GROUP = 50  # batches per length-sorted group (as transformers' Trainer groups by length)


def batches(
    indices: np.ndarray,
    batch_size: int,
    generator: torch.Generator,
    shuffle: bool = True,
    lengths: np.ndarray | None = None,
):
    """Batches of `indices` in a shuffled order. With `lengths` (each data row's length), rows are
    shuffled, cut into groups of `GROUP` batches, each group sorted by length before it is cut
    into batches, and the batches shuffled: every row once per epoch, with little padding."""
    order = (
        torch.randperm(len(indices), generator=generator).numpy()
        if shuffle
        else np.arange(len(indices))
    )
    if lengths is None:
        for start in range(0, len(indices), batch_size):
            yield indices[order[start : start + batch_size]]
        return
    shuffled = indices[order]
    grouped = []
    span = batch_size * GROUP
    for start in range(0, len(shuffled), span):
        group = shuffled[start : start + span]
        group = group[np.argsort(-lengths[group], kind="stable")]
        grouped += [group[s : s + batch_size] for s in range(0, len(group), batch_size)]
    for i in torch.randperm(len(grouped), generator=generator).tolist():
        yield grouped[i]


def step_batches(
    rows: np.ndarray,
    batch_size: int,
    steps: int,
    generator: torch.Generator,
    poisson_rate: float | None,
    lengths: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """`steps` batches: shuffled epochs (grouped by length when `lengths` are given), or (for DP)
    Poisson samples with the accountant's rate."""
    if poisson_rate is not None:
        for _ in range(steps):
            mask = torch.rand(len(rows), generator=generator) < poisson_rate
            yield rows[mask.numpy()]
        return
    taken = 0
    while taken < steps:
        for index in batches(rows, batch_size, generator, lengths=lengths):
            yield index
            taken += 1
            if taken >= steps:
                return


def row_lengths(data: TensorData, cfg: TrainConfig) -> np.ndarray | None:
    """The lengths to group batches by: generation rows (those with targets), when
    `train.group_by_length` is on. Classification batches stay plain shuffles (each is still
    trimmed of the padding none of its rows uses)."""
    generation = "target_ids" in data.features
    return data.lengths if cfg.group_by_length and generation else None


@dataclass
class TrainStats:
    num_examples: int
    steps: int
    mean_loss: float


def local_steps(cfg: TrainConfig, rows: int) -> int:
    """Steps a client takes in one round: `max_steps`, else `epochs` passes of batches."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return cfg.epochs * math.ceil(rows / cfg.batch_size)


def make_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def task_of(model: nn.Module) -> Task:
    """A model's task (a bare module that returns class logits is a classifier)."""
    return getattr(model, "task", None) or Classify()


def supports_checkpointing(net: nn.Module) -> bool:
    return bool(getattr(net, "supports_gradient_checkpointing", False))


@contextmanager
def checkpointing(model: nn.Module, cfg: TrainConfig) -> Iterator[None]:
    """`train.gradient_checkpointing` for the block's steps only: the model is shared with
    evaluation and other methods' code, which get it back as it was."""
    net = getattr(model, "net", model)
    if not (cfg.gradient_checkpointing and supports_checkpointing(net)):
        yield
        return
    # transformers 5.x renamed it "activation checkpointing" (the old names warn)
    if hasattr(net, "activation_checkpointing_enable"):
        net.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
        disable = net.activation_checkpointing_disable
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = net.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


def train_locally(
    model: nn.Module,
    names: list[str],
    data: TensorData,
    indices: np.ndarray,
    cfg: TrainConfig,
    lr: float,
    seed: int,
    device: torch.device,
) -> TrainStats:
    """Epochs (or `max_steps`) of minibatch steps on the task's loss over the client's rows,
    updating `names`."""
    if len(indices) == 0:
        raise ValueError("client has no training rows")
    params = list(parameters_by_name(model, names).values())
    optimizer = make_optimizer(params, cfg, lr)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    model.train()
    task = task_of(model)
    lengths = row_lengths(data, cfg)
    steps, total_loss, seen = 0, 0.0, 0
    target = cfg.max_steps
    epoch = 0
    bf16 = cfg.precision == "bf16"
    with checkpointing(model, cfg):
        while True:
            for index in batches(indices, cfg.batch_size, generator, lengths=lengths):
                batch = {k: v.to(device) for k, v in data.batch(index).items()}
                with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    loss = task.loss(model(batch), batch).float()
                if not bool(torch.isfinite(loss)):  # this client failed; the round goes on
                    raise FloatingPointError(f"non-finite training loss at local step {steps + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                steps += 1
                total_loss += float(loss.detach()) * len(index)
                seen += len(index)
                if target is not None and steps >= target:
                    return TrainStats(len(indices), steps, total_loss / seen)
            epoch += 1
            if target is None and epoch >= cfg.epochs:
                return TrainStats(len(indices), steps, total_loss / seen)


@dataclass
class EvalStats:
    """A model's scores on some rows: `metrics` holds the task's (classify: loss and accuracy;
    generate: loss, perplexity, and Rouge-L or label-word accuracy)."""

    num_examples: int
    metrics: dict[str, float]

    @property
    def loss(self) -> float:
        return self.metrics.get("loss", float("nan"))

    @property
    def accuracy(self) -> float:
        return self.metrics.get("accuracy", float("nan"))


def evaluate(
    model: nn.Module,
    data: TensorData,
    indices: np.ndarray | None,
    batch_size: int,
    device: torch.device,
    generations: int | None = None,
) -> EvalStats:
    """Score `model` on rows of `data` (None: all) the way its task scores."""
    metrics = dict(task_of(model).evaluate(model, data, indices, batch_size, device, generations))
    count = int(metrics.pop("num_examples"))
    return EvalStats(count, metrics)
