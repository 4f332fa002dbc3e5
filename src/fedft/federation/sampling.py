"""Seeded client sampling: the same (seed, round) always picks the same clients."""

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


def sample_clients(cfg: FederationConfig, seed: int, round_number: int) -> list[int]:
    rng = np.random.default_rng([seed, round_number, 0x5A])
    chosen = rng.choice(cfg.clients, size=clients_per_round(cfg), replace=False)
    return sorted(int(c) for c in chosen)
