"""Seeded client sampling: the same (seed, round) always picks the same clients.

The default draws a fixed number of clients per round. Client-level DP draws each client
independently with probability q instead (Poisson sampling, from secret randomness: see
`fedft.privacy.client_level.round_participants`), because that is the sampling the accountant's
amplification bound assumes; the round's size then varies around q * clients.
"""

from __future__ import annotations

import math

import numpy as np

from fedft.config import FederationConfig


def clients_per_round(cfg: FederationConfig) -> int:
    k = (
        cfg.sample_count
        if cfg.sample_count is not None
        else math.ceil(cfg.sample_fraction * cfg.clients)
    )
    return max(1, min(cfg.clients, k))


def client_sample_rate(cfg: FederationConfig) -> float:
    """The chance that a given client takes part in a round."""
    return clients_per_round(cfg) / cfg.clients


def sample_clients(cfg: FederationConfig, seed: int, round_number: int) -> list[int]:
    rng = np.random.default_rng([seed, round_number, 0x5A])
    chosen = rng.choice(cfg.clients, size=clients_per_round(cfg), replace=False)
    return sorted(int(c) for c in chosen)
