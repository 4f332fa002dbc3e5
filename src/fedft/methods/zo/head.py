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
LABEL_ROWS = "label_head.rows"  # a causal LM's label-word rows, as a parameter of their own


def head_module(net: nn.Module) -> tuple[str, nn.Module] | None:
    """The classification head of a Hugging Face classifier (or fedft's zero-shot classifier):
    the module whose output is the logits; None where there is none."""
    for name in HEAD_MODULES:
        module = getattr(net, name, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            return name, module
    return None


class LabelWordRows(nn.Module):
    """A causal LM's LM-head rows of its label words' tokens, as a small parameter of their own.

    The LM head of a small Llama is its input embedding matrix (49k x 576 for SmolLM2): training
    it would move every token's embedding and send 28M values. These rows start as copies of the
    head's rows for the tokens the label words are made of and replace those tokens' logits (a
    hook on the LM head), so the label words' scores train while every embedding stays put."""

    def __init__(self, head: nn.Module, token_ids: list[int]):
        super().__init__()
        self.register_buffer("ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(head.weight.detach()[self.ids].clone())
        head.register_forward_hook(self._patch)

    def _patch(self, _module: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        hidden = args[0]
        logits = logits.clone()
        logits[..., self.ids] = hidden @ self.rows.to(hidden.dtype).T
        return logits


def attach_label_rows(model: Any) -> nn.Module:
    """Give a causal LM run on label words its `LabelWordRows`; returns the LM head (the module
    the exact head re-runs)."""
    from fedft.errors import ModelError

    task = model.task
    if getattr(task, "mode", None) != "labels":
        raise ModelError(
            "method.head=exact on a causal LM trains the label words' rows of its LM head; the "
            "run's rows are not classification rows (text + label); use method.head=zo"
        )
    head = model.net.get_output_embeddings()
    ids = sorted({t for word in task.word_ids for t in word})
    model.add_module("label_head", LabelWordRows(head, ids))
    return head


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
