"""Seeded random directions: z is regenerated from its seed whenever it is needed, never stored.

A direction is one standard-normal vector over all trainable parameters, drawn from a CPU
`torch.Generator` in parameter order and in chunks, so a client (on any device) and the server
draw the same z from the same seed, and no more than one chunk of it exists at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedft.federation.training import derived_seed

CHUNK = 1 << 20  # elements of z alive at once (4 MB in float32)
POOL_TAG = 0x5EED


@torch.no_grad()
def add_direction(params: Sequence[torch.Tensor], seed: int, scales: Sequence[float]) -> None:
    """params[i] += scales[i] * z_i, in place, where z = (z_0, z_1, ...) is drawn from `seed`."""
    generator = torch.Generator().manual_seed(int(seed))
    for param, scale in zip(params, scales, strict=True):
        flat = param.data.view(-1)
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start : start + CHUNK]
            z = torch.randn(part.numel(), generator=generator)  # drawn even at scale 0: same stream
            if scale != 0.0:
                part.add_(z.to(part.device, part.dtype), alpha=scale)


def decayed_mask(params: Sequence[torch.Tensor]) -> list[bool]:
    """Weight decay applies to matrices only: biases and norm scales (1-D) are left alone."""
    return [p.dim() >= 2 for p in params]


def pool_seed(run_seed: int, index: int) -> int:
    """The seed at `index` of the run's fixed pool (FedKSeed): every party derives it alike."""
    return derived_seed(run_seed, POOL_TAG, index)


@torch.no_grad()
def checksum(params: Sequence[torch.Tensor]) -> float:
    """A float64 sum of every value: cheap proof that two parties hold the same parameters."""
    return float(sum(p.detach().sum(dtype=torch.float64).cpu() for p in params))
