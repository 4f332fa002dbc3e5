"""Client-level DP for FedAvg (DP-FedAvg, McMahan et al. 2018).

Each sampled client's update (its trained tensors minus the global ones) is clipped to L2 norm C
over all its tensors together; the server sums the clipped updates, adds N(0, (sigma C)^2) to every
coordinate, and divides by the expected number of clients per round, not by how many answered: a
fixed denominator keeps one client's influence on the mean at C / m, which is what the accountant
assumes. Clients count equally; weighting by example count would let a client with many rows move
the mean further than C / m.

The clipping runs on the server, which sees each update (no secure aggregation here): the
guarantee covers the models the server releases, every round's global state, and whatever is
computed from them.
"""

from __future__ import annotations

import math
import statistics

import torch

from fedft.federation.aggregation import Tensors
from fedft.privacy.accounting import MechanismPlan


def update_norm(update: Tensors) -> float:
    return math.sqrt(sum(float(t.to(torch.float64).square().sum()) for t in update.values()))


def noisy_mean_update(
    current: Tensors,
    states: list[Tensors],
    plan: MechanismPlan,
    clip: float,
    generator: torch.Generator,
) -> tuple[Tensors, dict[str, float]]:
    """The new global state current + (sum of clipped updates + noise) / m, and how the clipping
    went (norms of the raw updates: diagnostics for tuning C, not privatized)."""
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in current.items()}
    norms = []
    for state in states:
        update = {k: state[k].to(torch.float64) - current[k].to(torch.float64) for k in current}
        norm = update_norm(update)
        norms.append(norm)
        scale = min(1.0, clip / max(norm, 1e-12))
        for k, value in update.items():
            total[k] += value * scale
    sigma = plan.noise_multiplier * clip
    new: Tensors = {}
    for k, value in current.items():
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * sigma
        mean = (total[k] + noise) / plan.expected_batch
        new[k] = (value.to(torch.float64) + mean).to(value.dtype)
    metrics = {
        "dp_update_norm_median": statistics.median(norms) if norms else 0.0,
        "dp_clipped_fraction": sum(n > clip for n in norms) / len(norms) if norms else 0.0,
    }
    return new, metrics
