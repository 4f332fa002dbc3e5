"""The client side of the message interface: a context per request, and the runtime that routes a
request to the method's handler for its kind.

The runtime is engine-free: the local engine calls it in-process; the Flower adapter calls it from
inside a ClientApp. Per-client state (whatever a method keeps between rounds) lives in
`ClientContext.state`, which the engine keeps for the client: tensors and scalars only (int,
float, str, bool), so that it persists the same way in both engines (Flower's `context.state`,
the local engine's checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedft.config import RunConfig
from fedft.data import FederatedData
from fedft.data.partition import ClientSplit
from fedft.federation.payload import Message, Payload
from fedft.federation.training import derived_seed
from fedft.models.backbone import TaskModel

if TYPE_CHECKING:
    from fedft.methods.base import Method


@dataclass
class ClientContext:
    client: int
    round: int
    model: TaskModel
    data: FederatedData
    split: ClientSplit
    cfg: RunConfig
    device: torch.device
    trainable: list[str]
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return derived_seed(self.cfg.seed, self.round, self.client)

    @property
    def train_rows(self) -> np.ndarray:
        return self.split.train

    @property
    def test_rows(self) -> np.ndarray:
        return self.split.test


Handler = Callable[[ClientContext, Payload], Payload]
CLIENT = "client."  # checkpoint prefix of the clients' lasting state
Scalar = int | float | str | bool


class ClientRuntime:
    """One process's clients: the shared model, the data, and each client's lasting state.

    Client `c` trains on `data.clients[c]`, unless the runtime is given one `split` of its own: a
    Flower node that brings its own dataset holds only that split, yet must still run as the
    client it is named (its seeds and state follow the client id, not the split's position)."""

    def __init__(
        self,
        method: Method,
        model: TaskModel,
        data: FederatedData,
        cfg: RunConfig,
        device: torch.device,
        split: ClientSplit | None = None,
    ):
        self.method = method
        self.model = model
        self.data = data
        self.cfg = cfg
        self.device = device
        self.split = split
        self.trainable = method.trainable_names
        self.states: dict[int, dict[str, Any]] = {}
        self.handlers = method.client_handlers()

    def handle(self, message: Message) -> Payload:
        handler = self.handlers.get(message.kind)
        if handler is None:
            raise ValueError(
                f"method '{self.method.name}' has no client handler for '{message.kind}'"
            )
        return handler(self.context(message), message.payload)

    def handle_batch(self, messages: list[Message]) -> list[Payload] | None:
        """Messages of one kind from several clients at once, where the method's handler for it
        is its default and it can: train in one forward pass a step
        (`Method.client_train_batch`), evaluate in one pass over all their test rows
        (`Method.client_evaluate_batch`); None otherwise."""
        kind = messages[0].kind
        batched = {
            "train": (self.method.client_train, self.method.client_train_batch),
            "evaluate": (self.method.client_evaluate, self.method.client_evaluate_batch),
        }
        if kind not in batched or any(m.kind != kind for m in messages):
            return None
        handler, batch_handler = batched[kind]
        if self.handlers.get(kind) != handler:
            return None
        contexts = [self.context(m) for m in messages]
        return batch_handler(contexts, [m.payload for m in messages])

    def context(self, message: Message) -> ClientContext:
        return ClientContext(
            client=message.client,
            round=message.round,
            model=self.model,
            data=self.data,
            split=self.split if self.split is not None else self.data.clients[message.client],
            cfg=self.cfg,
            device=self.device,
            trainable=self.trainable,
            state=self.states.setdefault(message.client, {}),
        )

    # --- lasting state across a restart ---------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every client's lasting state, for the run's checkpoint: a process that dies loses its
        clients' memory, and a resumed run must find them holding what they held.

        A tensor that several states hold (one object: e.g. zo's shared synced copy, or fedpft's
        sub-model, which is the process's model itself) is saved once, under the first holder's
        `client.<id>.<key>`, and the others name it; loading gives them one object again. Meta:
        `{client: {"scalars": {...}, "tensors": {key: checkpoint name}}}`."""
        tensors: dict[str, torch.Tensor] = {}
        saved: dict[int, str] = {}  # id(tensor) -> its checkpoint name
        meta: dict[str, Any] = {}
        for client in sorted(self.states):
            state = self.states[client]
            scalars: dict[str, Scalar] = {}
            names: dict[str, str] = {}
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    if id(value) not in saved:
                        saved[id(value)] = f"{CLIENT}{client}.{key}"
                        tensors[saved[id(value)]] = value.detach().cpu()
                    names[key] = saved[id(value)]
                elif isinstance(value, Scalar | np.generic):
                    scalars[key] = value.item() if isinstance(value, np.generic) else value
                else:
                    raise TypeError(
                        f"method '{self.method.name}', client {client}: state '{key}' is a "
                        f"{type(value).__name__}; a client's lasting state holds only tensors "
                        "and scalars (int, float, str, bool)"
                    )
            meta[str(client)] = {"scalars": scalars, "tensors": names}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Put back what `state_dict` saved (tensors shared as they were), then let the method
        relink what its process kept beside the states (`Method.client_states_loaded`)."""
        self.states = {
            int(client): {
                **dict(entry["scalars"]),
                **{key: tensors[name] for key, name in entry["tensors"].items()},
            }
            for client, entry in meta.items()
        }
        self.method.client_states_loaded(self.states, self.model)
