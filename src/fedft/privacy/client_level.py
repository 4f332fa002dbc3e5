"""Client-level DP for FedAvg (DP-FedAvg, McMahan et al. 2018).

Each sampled client's update (its trained tensors minus the global ones) is clipped to L2 norm C
over all its tensors together; the server sums the clipped updates, adds N(0, (sigma C)^2) to every
coordinate, and divides by the expected number of clients per round, not by how many answered: a
fixed denominator keeps one client's influence on the mean at C / m, which is what the accountant
assumes. Clients count equally; weighting by example count would let a client with many rows move
the mean further than C / m.

The clipping runs on the server, which sees each update: the guarantee covers the models the
server releases, every round's global state, and whatever is computed from them. Under secure
aggregation (`federation.secure_aggregation`, Flower) each client clips its own update, SecAgg+
gives the server only the sum of the clipped updates, and the server adds the noise to that sum
(`noised_mean`): the server is still trusted to add it (it sees the sum before the noise, never
one client's update), as in central DP.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from fedft.config import PrivacyConfig, RunConfig
from fedft.federation.aggregation import Tensors
from fedft.federation.sampling import client_sample_rate, sample_clients
from fedft.privacy.accounting import MechanismPlan
from fedft.privacy.noise import NOT_PRIVATE, RandomSource, dp_random, poisson_clients

PARTICIPATION_TAG = 0x5A


def update_norm(update: Tensors) -> float:
    return math.sqrt(sum(float(t.to(torch.float64).square().sum()) for t in update.values()))


def noised_mean(
    current: Tensors, total: Tensors, plan: MechanismPlan, clip: float, noise: RandomSource
) -> Tensors:
    """current + (sum of clipped updates + N(0, (sigma C)^2)) / m, per tensor. Under secure
    aggregation the clients clip and the server sees only `total`, then adds the noise here."""
    sigma = plan.noise_multiplier * clip
    new: Tensors = {}
    for k, value in current.items():
        draw = noise.normal(value.shape, sigma, torch.float64)
        mean = (total[k].to(torch.float64) + draw) / plan.expected_batch
        new[k] = (value.to(torch.float64) + mean).to(value.dtype)
    return new


def noisy_mean_update(
    current: Tensors,
    states: list[Tensors],
    plan: MechanismPlan,
    clip: float,
    noise: RandomSource,
) -> tuple[Tensors, dict[str, float]]:
    """The new global state current + (sum of clipped updates + noise) / m, and how the clipping
    went: norms of the raw updates, diagnostics for tuning C that are NOT privatized, so they may
    be logged only when the noise is not private (`redact_round_line` drops them otherwise)."""
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in current.items()}
    norms = []
    for state in states:
        update = {k: state[k].to(torch.float64) - current[k].to(torch.float64) for k in current}
        norm = update_norm(update)
        norms.append(norm)
        scale = min(1.0, clip / max(norm, 1e-12))
        for k, value in update.items():
            total[k] += value * scale
    new = noised_mean(current, total, plan, clip, noise)
    metrics = {
        "dp_update_norm_median": statistics.median(norms) if norms else 0.0,
        "dp_clipped_fraction": sum(n > clip for n in norms) / len(norms) if norms else 0.0,
    }
    return new, metrics


def round_participants(cfg: RunConfig, round_number: int) -> list[int]:
    """Who takes part in a round. Client-level DP draws each client independently with the
    accountant's rate, from secret randomness (the amplification by subsampling holds only while
    nobody outside the server learns who was drawn); otherwise the seeded fixed-size sample."""
    if cfg.privacy.mode != "client":
        return sample_clients(cfg.federation, cfg.seed, round_number)
    source = dp_random(cfg.privacy, cfg.seed, round_number, PARTICIPATION_TAG)
    return poisson_clients(cfg.federation.clients, client_sample_rate(cfg.federation), source)


# What a round line may not say under client-level DP: who took part and anything the
# participants computed from their data that no mechanism noised.
WITHHELD = "withheld under client-level DP"
_CLIENT_DP_DROPPED = (
    "clients",
    "per_client",
    "dp_update_norm_median",
    "dp_clipped_fraction",
    "client_seconds_mean",
    "client_seconds_max",
)


def privacy_view(cfg: PrivacyConfig, line: dict[str, Any]) -> dict[str, Any]:
    """The round line as it may be published. Every DP line says whether its noise is private;
    under client-level DP, participant ids, failure details, training loss, raw update norms and
    per-client timings are dropped, and only counts remain. A not-private run (reproducible
    noise, for tests and for tuning C on trial data) keeps them all: it guarantees nothing."""
    if cfg.mode == "none":
        return line
    out = dict(line)
    out["private"] = not cfg.reproducible_noise_not_private
    if cfg.reproducible_noise_not_private:
        out["privacy_note"] = NOT_PRIVATE
    out["participants"] = len(line.get("clients", []))
    if cfg.mode == "client" and not cfg.reproducible_noise_not_private:
        for key in _CLIENT_DP_DROPPED:
            out.pop(key, None)
        out["failed"] = [{"client": WITHHELD, "error": WITHHELD} for _ in line.get("failed", [])]
        out["train_loss"] = None
    return out
