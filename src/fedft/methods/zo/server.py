"""The `seeds`-mode server: rebuilds the global parameters from the clients' (seed, scalar) pairs.

Clients never upload parameters. Each round the server turns the replies into one round record,
applies it to the global state, and keeps it; a client that comes back after missing rounds gets
the records it missed, or the whole trainable state where that is fewer bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedft.config import RunConfig
from fedft.federation.aggregation import Tensors, weighted_mean
from fedft.federation.grid import Grid
from fedft.federation.payload import Message, Payload
from fedft.federation.server import RoundOutcome, Server, mean_train_loss
from fedft.methods.zo.directions import checksum, decayed_mask
from fedft.methods.zo.records import (
    ClientSteps,
    RoundRecord,
    apply_record,
    build_record,
    pack_records,
)

HEAD = "head."  # as in fedft.methods.zo: an exact head's tensors travel whole

if TYPE_CHECKING:
    from fedft.methods.zo import Zo


class SeedReplayServer(Server):
    def __init__(self, cfg: RunConfig, initial: Tensors, method: Zo):
        super().__init__(cfg, initial)
        self.method = method
        self.records: list[RoundRecord] = []
        # The version (number of records applied) each client holds. Checkpointed with the
        # clients' own states on the local engine; forgotten where those did not come back.
        self.synced: dict[int, int] = {}
        self._checksum = checksum(self.ordered_params())

    def ordered_params(self) -> list[torch.Tensor]:
        """The tensors SPSA moves, in the model's parameter order: the order z is drawn in (an
        exact head is averaged as tensors instead)."""
        return [self.global_state[name] for name in self.method.body_names]

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{HEAD}{n}": self.global_state[n] for n in self.method.head_names}

    @property
    def version(self) -> int:
        return len(self.records)

    def catch_up(self, client: int) -> Payload:
        """The records the client missed, or the whole state: whichever is fewer bytes."""
        base = self.synced.get(client, 0)
        replay = pack_records(self.records[base:], base, self.version, self._checksum)
        replay.tensors.update(self.head_tensors())
        full = Payload(dict(self.global_state), {"sync": "full", "version": self.version})
        return replay if replay.nbytes <= full.nbytes else full

    def run_round(self, round_number: int, grid: Grid, clients: list[int]) -> RoundOutcome:
        clients, spent = self.admit(round_number, clients)
        messages = [Message(c, "train", self.catch_up(c), round_number) for c in clients]
        replies = grid.exchange(messages)
        for reply in replies:
            if reply.ok:
                self.synced[reply.client] = self.version
            else:  # whatever it holds is unknown now; the pretrained weights are always safe
                self.synced.pop(reply.client, None)
        ok = self.require_replies(replies, round_number)
        steps = [
            ClientSteps(
                r.payload.tensors["seeds"].to(torch.int64),
                r.payload.tensors["grads"],
                float(r.payload.scalars["num_examples"]),
            )
            for r in ok
        ]
        options = self.method.options
        record = build_record(
            steps,
            self.method.round_lr(self.cfg, round_number),
            options.directions,
            self.cfg.train.weight_decay,
            self.cfg.federation.server_lr,
            options.seed_pool,
        )
        params = self.ordered_params()
        apply_record(
            params, decayed_mask(params), record, self.cfg.seed, options.seed_pool,
            self.method.directions_for(params),
        )  # fmt: skip
        if self.method.head_names:  # the exact head: a weighted mean of what clients sent
            heads = [
                {n: r.payload.tensors[f"{HEAD}{n}"] for n in self.method.head_names} for r in ok
            ]
            weights = [float(r.payload.scalars["num_examples"]) for r in ok]
            self.global_state.update(weighted_mean(heads, weights))
        self.records.append(record)
        self._checksum = checksum(params)
        metrics = {"train_loss": mean_train_loss(ok), "record_pairs": record.size}
        return RoundOutcome(replies, {**metrics, **self.account(ok, spent)})

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors, meta = super().state_dict()
        for i, record in enumerate(self.records):
            tensors[f"record.{i}.seeds"] = record.seeds
            tensors[f"record.{i}.coefs"] = record.coefs
        meta["record_decays"] = [r.decay for r in self.records]
        meta["synced"] = {str(c): v for c, v in self.synced.items()}
        return tensors, meta

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.records = [
            RoundRecord(tensors[f"record.{i}.seeds"], tensors[f"record.{i}.coefs"], decay)
            for i, decay in enumerate(meta.get("record_decays", []))
        ]
        self.synced = {int(c): int(v) for c, v in meta.get("synced", {}).items()}
        self._checksum = checksum(self.ordered_params())

    def forget_client_state(self) -> None:
        """Clients whose state did not come back start again from the starting weights, which
        every party holds (the records since version 0, or the whole state where that is fewer
        bytes), never records from a version they may no longer hold."""
        self.synced = {}
