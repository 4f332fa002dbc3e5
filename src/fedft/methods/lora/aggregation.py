"""How the server combines clients' LoRA factors.

A LoRA module's update is ΔW = s·B·A (s = alpha / r, B: d_out × r, A: r × d_in). Averaging A and B
separately gives s·mean(B)·mean(A), which is not mean(s·B·A): the cross terms B_i·A_j of different
clients enter, and their own products are diluted. `exact` (after FedEx-LoRA, Singhal et al.
2024) keeps the factor means for the next round and moves what they miss into a dense residual on
the frozen weight, so the global model is the clients' weighted mean exactly.

Clients of different ranks (HetLoRA-style zero padding): the global factors have the largest
rank r; a client of rank r_i holds slots 0..r_i-1 (rows of A, columns of B) and the same scale
s = alpha / r, so a padded client is the same function as its small one. Each slot is averaged
over the clients that hold it.

All products are taken in float64 and cast back, as `weighted_mean` accumulates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

Tensors = dict[str, torch.Tensor]
RESIDUAL = "base_residual"  # the dense correction beside a LoRA module (not ".lora_": it is frozen)


@dataclass(frozen=True)
class LoraPair:
    """The names of one adapted module's factors and its residual."""

    a: str
    b: str
    residual: str


def lora_pairs(names: Iterable[str]) -> list[LoraPair]:
    """Each adapted module's (A, B) among `names`, in their order (peft names them
    `<module>.lora_A.<adapter>.weight` and `<module>.lora_B.<adapter>.weight`)."""
    names = list(names)
    present = set(names)
    pairs = []
    for name in names:
        if ".lora_A." not in name:
            continue
        b = name.replace(".lora_A.", ".lora_B.")
        if b not in present:
            raise ValueError(f"LoRA factor {name} has no {b} beside it")
        module = name.split(".lora_A.")[0]
        pairs.append(LoraPair(name, b, f"{module}.{RESIDUAL}"))
    return pairs


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `rank` slots: rows of A, columns of B."""
    return a[:rank].clone(), b[:, :rank].clone()


def pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero slots up to `rank` (a zero row of A with a zero column of B adds nothing, and their
    gradients stay zero: dL/dB[:, j] needs A[j], dL/dA[j] needs B[:, j])."""
    extra = rank - a.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {a.shape[0]} down to {rank}")
    return (
        torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0),
        torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1),
    )


def product(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """s·B·A in float64 (d_out × d_in, as F.linear reads a weight)."""
    return scale * (b.to(torch.float64) @ a.to(torch.float64))


def slot_mean(
    factors: list[torch.Tensor], weights: list[float], ranks: list[int], slot_dim: int
) -> torch.Tensor:
    """The weighted mean of padded factors, each slot over the clients whose rank holds it (a
    slot no client holds stays zero)."""
    rank = factors[0].shape[slot_dim]
    held = torch.zeros(rank, dtype=torch.float64)
    acc = torch.zeros(factors[0].shape, dtype=torch.float64)
    for factor, weight, r in zip(factors, weights, ranks, strict=True):
        acc += factor.to(torch.float64) * weight
        held[:r] += weight
    shape = [1, 1]
    shape[slot_dim] = rank
    return (acc / held.clamp_min(1e-300).reshape(shape)).to(factors[0].dtype)


def client_residual(
    residual: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int, scale: float
) -> torch.Tensor:
    """The residual that makes a rank-`rank` client start from the global model: the global one
    plus the global slots it does not hold, s·(B·A − B[:, :r]·A[:r])."""
    if rank >= a.shape[0]:
        return residual
    dropped = product(a[rank:], b[:, rank:], scale)
    return (residual.to(torch.float64) + dropped).to(residual.dtype)


def weighted_update(
    residuals: list[torch.Tensor],
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    weights: list[float],
    scale: float,
) -> torch.Tensor:
    """Σ_i w_i (R_i + s·B_i·A_i) / Σ_i w_i: the weighted mean of the clients' whole weight changes
    from the frozen weight (float64)."""
    total = float(sum(weights))
    acc = torch.zeros(residuals[0].shape, dtype=torch.float64)
    for residual, (a, b), weight in zip(residuals, factors, weights, strict=True):
        acc += weight * (residual.to(torch.float64) + product(a, b, scale))
    return acc / total


def relative_gap(target: torch.Tensor, approx: torch.Tensor) -> float:
    """‖target − approx‖_F / ‖target‖_F (0 when the target is zero)."""
    norm = float(target.norm())
    return float((target - approx).norm()) / norm if norm > 0 else 0.0
