"""Seeded random directions: z is regenerated from its seed whenever it is needed, never stored.

A direction is one random vector over all trainable parameters, drawn from a CPU
`torch.Generator` in parameter order and in chunks, so a client (on any device: CUDA's own
generators give other numbers for a seed) and the server draw the same z from the same seed, and
no more than one chunk of it exists at a time.

Two distributions, each with E[z z^T] = I, so (L(θ+εz) − L(θ−εz)) / 2ε · z estimates the gradient:

- `gaussian`: standard normal entries (MeZO).
- `rademacher`: ±1 entries (Spall's SPSA), unpacked from random bytes. Drawing them costs about a
  tenth of drawing normals, which matters when z spans all of a model's weights: a step
  regenerates z three times (perturb, perturb back, update).

`sparsity` > 0 (Sparse-MeZO): in every matrix only the (1 − sparsity) share of entries smallest in
magnitude move; the rest of z is zero there. The masks come from the parameters every party holds
at the start of a round (the synced version), so the server and a replaying client rebuild the
same z; the estimate's expectation is the gradient restricted to the masked entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedft.federation.training import derived_seed

CHUNK = 1 << 20  # elements of z alive at once (4 MB in float32)
POOL_TAG = 0x5EED
_SHIFTS = torch.arange(8, dtype=torch.uint8)

Distribution = Literal["gaussian", "rademacher"]


def _draw(n: int, generator: torch.Generator, distribution: Distribution) -> torch.Tensor:
    if distribution == "gaussian":
        return torch.randn(n, generator=generator)
    raw = torch.randint(0, 256, ((n + 7) // 8,), generator=generator, dtype=torch.uint8)
    bits = (raw.unsqueeze(1) >> _SHIFTS) & 1
    return bits.view(-1)[:n].to(torch.float32).mul_(2).sub_(1)


@dataclass(frozen=True)
class Directions:
    """How z is drawn: its distribution, and (sparse perturbations) a mask per parameter."""

    distribution: Distribution = "gaussian"
    masks: tuple[torch.Tensor | None, ...] | None = None

    @torch.no_grad()
    def add(self, params: Sequence[torch.Tensor], seed: int, scales: Sequence[float]) -> None:
        """params[i] += scales[i] * z_i, in place, where z = (z_0, z_1, ...) is drawn from `seed`."""
        generator = torch.Generator().manual_seed(int(seed))
        masks = self.masks or (None,) * len(params)
        for param, scale, mask in zip(params, scales, masks, strict=True):
            flat = param.data.view(-1)
            keep = mask.view(-1) if mask is not None else None
            for start in range(0, flat.numel(), CHUNK):
                part = flat[start : start + CHUNK]
                z = _draw(part.numel(), generator, self.distribution)  # drawn even at scale 0
                if scale != 0.0:
                    z = z.to(part.device, part.dtype)
                    if keep is not None:
                        z.masked_fill_(~keep[start : start + CHUNK], 0.0)
                    part.add_(z, alpha=scale)


GAUSSIAN = Directions()


def add_direction(params: Sequence[torch.Tensor], seed: int, scales: Sequence[float]) -> None:
    """params[i] += scales[i] * z_i with Gaussian z drawn from `seed`."""
    GAUSSIAN.add(params, seed, scales)


@torch.no_grad()
def sparse_masks(
    params: Sequence[torch.Tensor], sparsity: float
) -> tuple[torch.Tensor | None, ...]:
    """Per parameter, where z may be nonzero: in a matrix, its ⌈(1 − sparsity)·n⌉ entries of
    smallest magnitude (ties at the threshold included); vectors (biases, norms) move whole."""
    out: list[torch.Tensor | None] = []
    for param in params:
        if sparsity <= 0 or param.dim() < 2:
            out.append(None)
            continue
        flat = param.detach().abs().view(-1)
        k = max(1, math.ceil((1.0 - sparsity) * flat.numel()))
        threshold = flat.float().cpu().kthvalue(k).values.to(flat.device, flat.dtype)
        out.append(param.detach().abs() <= threshold)  # bool: a byte an entry
    return tuple(out)


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
