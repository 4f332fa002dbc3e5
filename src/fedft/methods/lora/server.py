"""`lora`'s server: FedAvg whose LoRA factors are combined by `method.aggregation`, for clients of
one rank or of several (`method.client_ranks`)."""

from __future__ import annotations

from typing import Any

import torch

from fedft.config import RunConfig
from fedft.federation.aggregation import weighted_mean
from fedft.federation.payload import Payload, Reply
from fedft.federation.server import FedAvgServer
from fedft.methods.lora.aggregation import (
    LoraPair,
    Tensors,
    client_residual,
    lora_pairs,
    pad,
    product,
    relative_gap,
    slot_mean,
    truncate,
    weighted_update,
)


def rank_of(ranks: list[int] | None, rank: int, client: int) -> int:
    """A client's LoRA rank: `method.client_ranks` by client id, cyclically; else `method.r`."""
    return ranks[client % len(ranks)] if ranks else rank


class LoraServer(FedAvgServer):
    def __init__(
        self,
        cfg: RunConfig,
        initial: Tensors,
        *,
        rank: int,
        scale: float,
        exact: bool,
        client_ranks: list[int] | None,
    ):
        self.pairs: list[LoraPair] = lora_pairs(initial)
        self.rank, self.scale, self.exact, self.client_ranks = rank, scale, exact, client_ranks
        if exact:  # the residual starts at zero: the global model is the frozen one plus s·B·A
            initial = dict(initial)
            for pair in self.pairs:
                b, a = initial[pair.b], initial[pair.a]
                initial[pair.residual] = torch.zeros(b.shape[0], a.shape[1], dtype=a.dtype)
        super().__init__(cfg, initial)
        factor_names = {n for p in self.pairs for n in (p.a, p.b, p.residual)}
        self.other_names = [n for n in self.global_state if n not in factor_names]

    def aggregates_a_sum(self) -> bool:
        """`mean` of one rank is the weighted mean of every tensor; `exact` needs each client's
        B·A, mixed ranks each slot's holders."""
        return not self.exact and not self.client_ranks

    def client_rank(self, client: int) -> int:
        return rank_of(self.client_ranks, self.rank, client)

    def train_payload(self, client: int, round_number: int) -> Payload:
        """The global tensors, cut to the client's rank; under `exact`, with the residual that
        makes that client start from the global model itself."""
        rank = self.client_rank(client)
        state = dict(self.global_state)
        for pair in self.pairs:
            a, b = state[pair.a], state[pair.b]
            if self.exact:
                state[pair.residual] = client_residual(state[pair.residual], a, b, rank, self.scale)
            if rank < self.rank:
                state[pair.a], state[pair.b] = truncate(a, b, rank)
        return Payload(state)

    def aggregate(self, ok: list[Reply], round_number: int) -> tuple[Tensors, dict[str, Any]]:
        if self.population is not None:  # client-level DP: the noised mean of the factors
            return super().aggregate(ok, round_number)
        weights = [float(r.payload.scalars["num_examples"]) for r in ok]
        ranks = [self.client_rank(r.client) for r in ok]
        out = weighted_mean(
            [{k: r.payload.tensors[k] for k in self.other_names} for r in ok], weights
        )
        gaps = []
        for pair in self.pairs:
            factors = [
                pad(r.payload.tensors[pair.a], r.payload.tensors[pair.b], self.rank) for r in ok
            ]
            a = slot_mean([f[0] for f in factors], weights, ranks, slot_dim=0)
            b = slot_mean([f[1] for f in factors], weights, ranks, slot_dim=1)
            out[pair.a], out[pair.b] = a, b
            # what each client started from beyond its factors, then the mean of where they ended
            g_a, g_b = self.global_state[pair.a], self.global_state[pair.b]
            if self.exact:
                g_r = self.global_state[pair.residual]
                starts = [client_residual(g_r, g_a, g_b, r, self.scale) for r in ranks]
            else:
                starts = [torch.zeros(b.shape[0], a.shape[1]) for _ in ranks]
            target = weighted_update(starts, factors, weights, self.scale)
            kept = product(a, b, self.scale)
            gaps.append(relative_gap(target, kept))
            if self.exact:
                out[pair.residual] = (target - kept).to(a.dtype)
        # the share of the clients' mean weight change that the averaged factors miss: dropped
        # under `mean`, carried by the residual under `exact`
        metrics = {"lora_factor_gap": sum(gaps) / len(gaps)} if gaps else {}
        return {k: out[k] for k in self.global_state}, metrics
