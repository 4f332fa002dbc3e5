"""The task head trained by exact first-order gradients while SPSA moves the body (Addax, Hi-ZFO).

A classification head is small and sits at the end: its exact gradient needs only the hidden
state that reaches it, not a graph through the body. So the forward passes of a zo step run
without autograd, as always; a hook keeps the head module's input of each pass, and the head is
re-run on it with autograd on the head's parameters alone. The gradients at the two perturbed
points (θ ± εz of the body) are averaged, which is the gradient at θ up to O(ε²). Memory stays at
inference level: the only graph is the head's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fedft.tasks import Task

HEAD_MODULES = ("classifier", "score")  # the module that gives a classifier's logits


def head_module(net: nn.Module) -> tuple[str, nn.Module] | None:
    """The classification head of a Hugging Face classifier (or fedft's zero-shot classifier):
    the module whose output is the logits; None where there is none."""
    for name in HEAD_MODULES:
        module = getattr(net, name, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            return name, module
    return None


class ExactHead:
    def __init__(self, module: nn.Module, params: list[nn.Parameter], lr: float, task: Task):
        self.module, self.params, self.lr, self.task = module, params, lr, task
        self.inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Keep the head's input of every forward pass inside the block."""

        def keep(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs.append((tuple(a.detach() for a in args), dict(kwargs)))

        handle = self.module.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def gradients(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The mean over the kept inputs of the task loss's gradient in the head's parameters."""
        total = [torch.zeros_like(p) for p in self.params]
        flags = [p.requires_grad for p in self.params]
        try:
            for p in self.params:
                p.requires_grad_(True)
            with torch.enable_grad():
                for args, kwargs in self.inputs:
                    loss = self.task.loss(self.module(*args, **kwargs), batch)
                    for acc, g in zip(total, torch.autograd.grad(loss, self.params), strict=True):
                        acc.add_(g)
        finally:
            for p, flag in zip(self.params, flags, strict=True):
                p.requires_grad_(flag)
        count = max(len(self.inputs), 1)
        self.inputs.clear()
        return [g / count for g in total]

    @torch.no_grad()
    def step(self, batch: dict[str, torch.Tensor]) -> None:
        """One SGD step on the head from the inputs kept since the last one."""
        for p, g in zip(self.params, self.gradients(batch), strict=True):
            p.sub_(g, alpha=self.lr)
