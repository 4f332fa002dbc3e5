"""The server side of the message interface: owns the global state and runs rounds over a Grid.

`FedAvgServer` is the default round (broadcast the trainable tensors, local training, weighted
mean through a server optimizer). Methods with other rounds subclass `Server`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedft.config import RunConfig
from fedft.errors import RunStopped
from fedft.federation.aggregation import ServerOptimizer, Tensors, weighted_mean
from fedft.federation.grid import Grid
from fedft.federation.payload import Message, Payload, Reply


@dataclass
class RoundOutcome:
    replies: list[Reply]
    metrics: dict[str, Any] = field(default_factory=dict)


class Server:
    """Base class: a method's server logic. State must round-trip through `state_dict`."""

    def __init__(self, cfg: RunConfig, initial: Tensors):
        self.cfg = cfg
        self.global_state: Tensors = {k: v.detach().cpu().clone() for k, v in initial.items()}

    def run_round(self, round_number: int, grid: Grid, clients: list[int]) -> RoundOutcome:
        raise NotImplementedError

    def model_state(self) -> Tensors:
        """Tensors to load into the process's model to evaluate the global model."""
        return self.global_state

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return {f"global.{k}": v for k, v in self.global_state.items()}, {}

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.global_state = {
            k.removeprefix("global."): v for k, v in tensors.items() if k.startswith("global.")
        }

    def require_replies(self, replies: list[Reply], round_number: int) -> list[Reply]:
        ok = [r for r in replies if r.ok]
        need = self.cfg.federation.min_replies
        if len(ok) < need:
            raise RunStopped(
                f"round {round_number}: only {len(ok)} of {len(replies)} clients answered, fewer than "
                f"federation.min_replies={need}; the last checkpoint is kept, fix the clients and --resume"
            )
        return ok


class FedAvgServer(Server):
    def __init__(self, cfg: RunConfig, initial: Tensors):
        super().__init__(cfg, initial)
        self.optimizer = ServerOptimizer(cfg.federation)

    def run_round(self, round_number: int, grid: Grid, clients: list[int]) -> RoundOutcome:
        messages = [
            Message(c, "train", Payload(dict(self.global_state)), round_number) for c in clients
        ]
        replies = grid.exchange(messages)
        ok = self.require_replies(replies, round_number)
        weights = [float(r.payload.scalars["num_examples"]) for r in ok]
        aggregate = weighted_mean([r.payload.tensors for r in ok], weights)
        self.global_state = self.optimizer.step(self.global_state, aggregate)
        train_loss = sum(
            float(r.payload.scalars["train_loss"]) * w for r, w in zip(ok, weights, strict=True)
        ) / sum(weights)
        return RoundOutcome(replies, {"train_loss": train_loss})

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors, meta = super().state_dict()
        tensors.update({f"opt.{k}": v for k, v in self.optimizer.state.items()})
        meta["optimizer_steps"] = self.optimizer.steps
        return tensors, meta

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.optimizer.state = {
            k.removeprefix("opt."): v for k, v in tensors.items() if k.startswith("opt.")
        }
        self.optimizer.steps = int(meta.get("optimizer_steps", 0))
