"""Cutting a transformer into head / body / tail without touching the model family's own code.

The blocks of a Hugging Face encoder are called in a loop as `block(hidden_states, mask, ...)`
and return the new hidden states; every other step (embeddings, attention-mask preparation, the
final norm, pooler and classifier) stays the family's own. So the cut swaps blocks in that list:

- On the client, the body's blocks are gone. The first is replaced by a `Relay` (which either
  lets the hidden states through, stops the forward pass and hands out the head's output, or puts
  the server's body output in their place), the others by `Skip`. No body weight is left.
- On the server, `BodyRunner` runs only the body: the head's blocks are skipped for the call, the
  client's activations replace the hidden states at the first body block, and the pass stops at
  the body's output. The model's own mask code runs on the client's attention mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fedft.errors import ModelError
from fedft.models.backbone import Skip, TaskModel


class Stop(Exception):
    """Ends a forward pass at a cut, carrying the hidden states that reached it."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("forward stopped at the cut")
        self.hidden = hidden


class Relay(nn.Module):
    """Stands in the client model for the whole body.

    `skip`: pass through (the local loss of phase 1, EL2N scoring). `capture`: stop the pass and
    hand out the head's output (raises `Stop`). `inject`: continue from `self.incoming`, the body's
    output that the server sent back."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "skip"
        self.incoming: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.mode == "capture":
            raise Stop(hidden_states)
        if self.mode == "inject":
            assert self.incoming is not None
            return self.incoming
        return hidden_states


@contextmanager
def blocks_skipped(model: TaskModel, count: int) -> Iterator[None]:
    """The model's first `count` blocks pass hidden states through for the duration: the head's
    blocks are not needed where the body's input (server) or output (client) comes from outside."""
    blocks = model.blocks()
    kept = [blocks[i] for i in range(count)]
    for i in range(count):
        blocks[i] = Skip()
    try:
        yield
    finally:
        for i, block in enumerate(kept):
            blocks[i] = block


def check_cut(model: TaskModel, head_blocks: int, tail_blocks: int) -> tuple[int, int, int]:
    """(first body block, first tail block, number of blocks); refuses a cut with no body."""
    n = len(model.blocks())
    if head_blocks + tail_blocks >= n:
        raise ModelError(
            f"method 'sfprompt': head_blocks={head_blocks} + tail_blocks={tail_blocks} leave no "
            f"body in the {n} blocks of {model.source}; lower one of them"
        )
    return head_blocks, n - tail_blocks, n


def strip_body(model: TaskModel, head_blocks: int, tail_blocks: int) -> Relay:
    """Remove the body's blocks from a client's model; returns the relay that stands for them."""
    start, end, _ = check_cut(model, head_blocks, tail_blocks)
    blocks = model.blocks()
    relay = Relay()
    blocks[start] = relay
    for index in range(start + 1, end):
        blocks[index] = Skip()
    return relay


def blocks_prefix(model: TaskModel) -> str:
    blocks = model.blocks()
    for name, module in model.named_modules():
        if module is blocks:
            return name + "."
    raise ModelError(f"model {model.source}: cannot name its transformer blocks")


class BodyRunner:
    """The server's side of the cut on a full model: body(activations) -> body output."""

    def __init__(self, model: TaskModel, head_blocks: int, tail_blocks: int):
        self.model = model
        self.start, self.end, _ = check_cut(model, head_blocks, tail_blocks)

    @contextmanager
    def _body_only(self, activations: torch.Tensor) -> Iterator[None]:
        blocks = self.model.blocks()
        enter = blocks[self.start].register_forward_pre_hook(
            lambda _m, args, kwargs: (
                ((activations, *args[1:]), kwargs)
                if args
                else (args, {**kwargs, "hidden_states": activations})
            ),
            with_kwargs=True,
        )

        def stop(_module: nn.Module, _args: Any, output: Any) -> None:
            raise Stop(output[0] if isinstance(output, tuple) else output)

        leave = blocks[self.end - 1].register_forward_hook(stop)
        try:
            with blocks_skipped(self.model, self.start):
                yield
        finally:
            enter.remove()
            leave.remove()

    def forward(self, activations: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The body's output for the head's `activations`. `inputs` are the batch's model inputs
        as the client has them (ids are not needed: any ids of the right shape do), so the
        model's own code prepares the attention mask."""
        with self._body_only(activations):
            try:
                self.model(inputs)
            except Stop as stop:
                return stop.hidden
        raise RuntimeError("the body's last block never ran")
