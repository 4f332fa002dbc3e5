"""Where DP randomness comes from: the Gaussian noise and the subsampling draws.

A DP guarantee holds only while the noise and the sampling are unknown to the party it guards
against. Anyone who knows the run seed (it is in `config.yaml`) could recompute seeded noise and
subtract it, so under DP every draw comes from `SecretRandom` unless the run asks for
`privacy.reproducible_noise_not_private`, which tests use and which marks the run "not private".

Why not a torch generator seeded from `os.urandom` for each draw: torch's CPU generator is a
Mersenne Twister, whose state can be recovered from its outputs and which takes a 64-bit seed, and
any Gaussian sampler that maps one uniform float to one normal float leaks through the gaps of
floating-point numbers (Mironov 2012; Holohan & Braghin 2021 show the attack on Opacus). So
`SecretRandom` takes its bits from the operating system's CSPRNG (`os.urandom`: the kernel's
ChaCha20 generator on Linux) for every draw, turns 52 of each 64 bits into a uniform in (0, 1],
makes normals by Box-Muller in float64, and returns the sum of four normals halved, the defence
against floating-point attacks that Opacus's own `secure_mode` uses (Holohan & Braghin's 2n with
n = 2). Opacus's `secure_mode` itself needs `torchcsprng`, which no longer builds for current
torch. The cost is about half a microsecond per noised coordinate per step on one CPU core:
negligible for the PEFT methods' tensors, seconds per step for full fine-tuning of a 22M-weight
model (where per-example gradients cost more).
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
import torch

from fedft.config import PrivacyConfig
from fedft.federation.training import derived_seed

_MANTISSA = (1 << 52) - 1
_ONE = 0x3FF0000000000000  # the bits of float64 1.0
NOT_PRIVATE = "NOT PRIVATE: privacy.reproducible_noise_not_private=true (noise from the run seed)"


class RandomSource(Protocol):
    """What a DP mechanism draws from."""

    private: bool

    def uniform(self, n: int) -> torch.Tensor:
        """n float64 uniforms in (0, 1], on the CPU."""
        ...

    def normal(
        self,
        shape: torch.Size | tuple[int, ...],
        std: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Zero-mean Gaussian noise of standard deviation `std`."""
        ...


class SecretRandom:
    """Draws from the OS's CSPRNG; nothing about a draw can be recomputed from the run."""

    private = True
    CHUNK = 1 << 20  # coordinates per batch of bytes: bounds the float64 work buffers (~40 MB)

    def uniform(self, n: int) -> torch.Tensor:
        if n == 0:
            return torch.empty(0, dtype=torch.float64)
        raw = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64)
        # 52 random mantissa bits under the exponent of 1.0: a float64 uniform in [1, 2) ...
        ones = raw.bitwise_and_(_MANTISSA).bitwise_or_(_ONE).view(torch.float64)
        return ones.neg_().add_(2.0)  # ... mapped to (0, 1], where log never sees 0

    def _standard_normal(self, n: int) -> torch.Tensor:
        """n standard normals, each the halved sum of four Box-Muller draws."""
        pairs = (4 * n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = u[:pairs].log_().mul_(-2.0).sqrt_()
        angle = u[pairs:].mul_(2.0 * math.pi)
        draws = torch.view_as_real(torch.polar(radius, angle)).flatten()[: 4 * n]
        return draws.view(4, n).sum(dim=0).mul_(0.5)

    def normal(self, shape, std, dtype=torch.float32, device="cpu") -> torch.Tensor:
        numel = math.prod(shape)
        out = torch.empty(numel, dtype=torch.float64)
        for start in range(0, numel, self.CHUNK):
            stop = min(numel, start + self.CHUNK)
            out[start:stop] = self._standard_normal(stop - start)
        return out.mul_(std).view(tuple(shape)).to(dtype=dtype, device=device)


class SeededRandom:
    """Reproducible draws from a seed: for tests only; a run that uses it is not private."""

    private = False

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def normal(self, shape, std, dtype=torch.float32, device="cpu") -> torch.Tensor:
        draw = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float64)
        return draw.mul_(std).to(dtype=dtype, device=device)


def dp_random(cfg: PrivacyConfig, *where: int) -> RandomSource:
    """The source for one DP draw site. `where` (run seed, round, client, a tag) only matters with
    reproducible noise, where it makes each site's stream distinct and replayable."""
    if cfg.reproducible_noise_not_private:
        return SeededRandom(derived_seed(*where))
    return SecretRandom()


def poisson_batches(rows: np.ndarray, rate: float, steps: int, source: RandomSource):
    """`steps` Poisson samples of `rows` at `rate`, as the accountant's amplification assumes.
    The masks come from `source` and never leave the client."""
    for _ in range(steps):
        yield rows[(source.uniform(len(rows)) < rate).numpy()]


def poisson_clients(clients: int, rate: float, source: RandomSource) -> list[int]:
    """Client-level DP's participation: each client independently with probability `rate`."""
    return [int(c) for c in np.flatnonzero((source.uniform(clients) < rate).numpy())]
