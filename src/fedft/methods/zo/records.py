"""Round records: what the server applies to the global parameters each round in `seeds` mode, and
what a client that missed rounds replays to catch up.

FedAvg of the clients' ZO-SGD trajectories is itself a seeded update. A client that took S steps
from theta with directions z_s and scalars g_s ends at  a^S theta - lr * sum_s a^(S-1-s) g_s z_s
(a = 1 - lr * weight_decay on decayed tensors, a = 1 on the rest), so the weighted mean over
clients is one decay factor plus one coefficient per seed (two where decay splits the tensors).
The server and every client apply the same record with the same code, in the same order, so a
client that replays the records it missed holds exactly the server's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedft.federation.payload import Payload
from fedft.methods.zo.directions import GAUSSIAN, Directions, pool_seed


@dataclass
class RoundRecord:
    seeds: torch.Tensor  # int64 [m]: seeds, or indices into the seed pool
    coefs: torch.Tensor  # float32 [m, 1] or [m, 2]: column 0 for decayed tensors, 1 for the rest
    decay: float  # factor on decayed tensors before the seeded terms

    @property
    def size(self) -> int:
        return int(self.seeds.numel())


@dataclass
class ClientSteps:
    """One client's upload, unpacked: its seeds (or pool indices) and scalars, step-major."""

    seeds: torch.Tensor  # int64 [S * n]
    grads: torch.Tensor  # float32 [S * n]
    weight: float


def build_record(
    clients: Sequence[ClientSteps],
    lr: float,
    directions: int,
    weight_decay: float,
    server_lr: float = 1.0,
    pool_size: int | None = None,
) -> RoundRecord:
    """The weighted mean of the clients' trajectories as one record (see the module docstring)."""
    total = sum(c.weight for c in clients)
    a = 1.0 - lr * weight_decay
    seeds, decayed, rest = [], [], []
    decay = 0.0
    for client in clients:
        w = client.weight / total
        count = client.seeds.numel()
        steps = count // directions
        step_of = torch.arange(count, dtype=torch.float64) // directions
        c_rest = -w * lr / directions * client.grads.to(torch.float64)
        seeds.append(client.seeds.to(torch.int64))
        rest.append(c_rest)
        decayed.append(c_rest * a ** (steps - 1 - step_of))
        decay += w * a**steps
    seed_all = torch.cat(seeds) if seeds else torch.zeros(0, dtype=torch.int64)
    columns = [torch.cat(decayed), torch.cat(rest)] if weight_decay > 0 else [torch.cat(rest)]
    coefs = torch.stack(columns, dim=1) * server_lr
    decay = 1.0 + server_lr * (decay - 1.0)
    if pool_size is not None:  # FedKSeed: one coefficient per pool seed that was used
        summed = torch.zeros(pool_size, coefs.shape[1], dtype=torch.float64)
        summed.index_add_(0, seed_all, coefs)
        used = torch.unique(seed_all)
        seed_all, coefs = used, summed[used]
    return RoundRecord(seed_all, coefs.to(torch.float32), float(decay))


@torch.no_grad()
def apply_record(
    params: Sequence[torch.Tensor],
    decayed: Sequence[bool],
    record: RoundRecord,
    run_seed: int,
    pool_size: int | None,
    directions: Directions = GAUSSIAN,
) -> None:
    """Apply one round's record; `directions` as the clients drew them in that round (their
    masks are those of the parameters before the record)."""
    if record.decay != 1.0:
        for param, dec in zip(params, decayed, strict=True):
            if dec:
                param.mul_(record.decay)
    two = record.coefs.shape[1] == 2
    for seed, coef in zip(record.seeds.tolist(), record.coefs.tolist(), strict=True):
        scales = [coef[0] if (dec or not two) else coef[1] for dec in decayed]
        actual = pool_seed(run_seed, seed) if pool_size is not None else seed
        directions.add(params, actual, scales)


def pack_records(
    records: Sequence[RoundRecord], base: int, version: int, check: float, device: str = "cpu"
) -> Payload:
    """Records base+1..version as one payload (what a catching-up client receives), with the
    checksum of the parameters they lead to and the device the server computed it on."""
    width = records[0].coefs.shape[1] if records else 1
    return Payload(
        {
            "seeds": torch.cat([r.seeds for r in records])
            if records
            else torch.zeros(0, dtype=torch.int64),
            "coefs": torch.cat([r.coefs for r in records])
            if records
            else torch.zeros(0, width, dtype=torch.float32),
            "counts": torch.tensor([r.size for r in records], dtype=torch.int64),
            "decays": torch.tensor([r.decay for r in records], dtype=torch.float64),
        },
        {"sync": "records", "base": base, "version": version, "checksum": check, "device": device},
    )


def unpack_records(payload: Payload) -> list[RoundRecord]:
    t = payload.tensors
    out, start = [], 0
    for count, decay in zip(t["counts"].tolist(), t["decays"].tolist(), strict=True):
        out.append(
            RoundRecord(t["seeds"][start : start + count], t["coefs"][start : start + count], decay)
        )
        start += count
    return out
