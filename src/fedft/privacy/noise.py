"""Where DP noise comes from.

By default the noise is seeded from the run seed and the place it is drawn (client, round), so a
run replays exactly and a resumed run equals an unbroken one. That makes the noise known to
whoever knows the seed: `privacy.secure_noise` seeds it from the OS's entropy instead, for runs
whose guarantee must hold against the operator too.
"""

from __future__ import annotations

import secrets

import torch

from fedft.config import PrivacyConfig
from fedft.federation.training import derived_seed


def noise_generator(
    cfg: PrivacyConfig, *where: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator on `device`: Opacus draws the noise where the gradients are."""
    seed = secrets.randbits(63) if cfg.secure_noise else derived_seed(*where)
    return torch.Generator(device=device).manual_seed(seed)
