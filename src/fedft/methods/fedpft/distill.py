"""Aligning the sub-model with the full model on public unlabeled inputs.

Student and teacher see the same inputs; the loss is, at the output of each compressed block, the
squared error of the student's hidden states against the teacher's, divided by the teacher's
squared norm (so every layer weighs the same whatever its scale), over real tokens only. An
optional term pulls each compressed feed-forward network's weight product (output @ input, a
D x D map) towards the full model's, which constrains the weights directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fedft.data.encode import TensorData
from fedft.federation.training import step_batches
from fedft.methods.fedpft.submodel import Ffn
from fedft.models.backbone import TaskModel


@contextmanager
def block_outputs(model: TaskModel, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Hidden states leaving each of `layers`, filled by the next forward pass."""
    seen: dict[int, torch.Tensor] = {}
    blocks = model.blocks()

    def hook(layer: int):
        def keep(_module: nn.Module, _args: Any, output: Any) -> None:
            seen[layer] = output[0] if isinstance(output, tuple) else output

        return keep

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def token_mask(batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """[B, T, 1] weights of the real tokens (images: every patch)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.ones(*hidden.shape[:2], 1, dtype=hidden.dtype, device=hidden.device)


def hidden_state_loss(
    student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Mean over layers of ||student − teacher||² / ||teacher||², on real tokens."""
    losses = [
        ((student[k] - teacher[k]).pow(2) * mask).sum() / (teacher[k].pow(2) * mask).sum()
        for k in teacher
    ]
    return torch.stack(losses).mean()


def weight_product_loss(student: nn.Module, teacher: nn.Module, ffns: list[Ffn]) -> torch.Tensor:
    """Mean over layers and input projections of ||W_out W_in − W_out' W_in'||² / ||W_out' W_in'||²
    (primed: the teacher's, without gradient). Sub-model and full model share module paths."""
    losses = []
    for ffn in ffns:
        s_out = student.get_submodule(ffn.output).weight
        t_out = teacher.get_submodule(ffn.output).weight.detach()
        for path in ffn.inputs:
            target = t_out @ teacher.get_submodule(path).weight.detach()
            product = s_out @ student.get_submodule(path).weight
            losses.append((product - target).pow(2).sum() / target.pow(2).sum())
    return torch.stack(losses).mean()


@dataclass
class DistillReport:
    heldout_before: float
    heldout_after: float
    steps: int
    seconds: float = 0.0


class Distiller:
    """Trains chosen student tensors to match the teacher's hidden states at `layers`."""

    def __init__(
        self, student: TaskModel, teacher: TaskModel, ffns: list[Ffn], device: torch.device
    ):
        self.student, self.teacher, self.ffns = student, teacher, ffns
        self.layers = [f.layer for f in ffns]
        self.device = device

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), block_outputs(self.teacher, self.layers) as target:
            self.teacher(batch)
        with block_outputs(self.student, self.layers) as got:
            self.student(batch)
        return hidden_state_loss(got, target, token_mask(batch, target[self.layers[0]]))

    @torch.no_grad()
    def heldout_loss(self, data: TensorData, rows: torch.Tensor, batch_size: int) -> float:
        total, seen = 0.0, 0
        with _eval(self.student, self.teacher):
            for start in range(0, len(rows), batch_size):
                index = rows[start : start + batch_size]
                batch = {k: v.to(self.device) for k, v in data.batch(index).items()}
                total += float(self._loss(batch)) * len(index)
                seen += len(index)
        return total / max(seen, 1)

    def train(
        self,
        params: list[nn.Parameter],
        data: TensorData,
        rows: torch.Tensor,
        steps: int,
        batch_size: int,
        lr: float,
        weight_product: float,
        seed: int,
        after_step=None,
        desc: str = "distilling",
    ) -> None:
        """`steps` Adam steps on `params` (dropout off in both models: the targets are exact)."""
        optimizer = torch.optim.Adam(params, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        was = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        # a bar on a terminal only (tqdm turns itself off elsewhere): this can take a minute
        bar = tqdm(total=steps, desc=desc, unit="step", leave=False, disable=None)
        with _eval(self.student, self.teacher), bar:
            for index in step_batches(rows.numpy(), batch_size, steps, generator, None):
                batch = {k: v.to(self.device) for k, v in data.batch(index).items()}
                loss = self._loss(batch)
                if weight_product > 0:
                    loss = loss + weight_product * weight_product_loss(
                        self.student, self.teacher, self.ffns
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
                bar.update()
        for p, flag in zip(params, was, strict=True):
            p.requires_grad_(flag)
            p.grad = None


@contextmanager
def _eval(*models: nn.Module) -> Iterator[None]:
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
