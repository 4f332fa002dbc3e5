"""The forward-only local update: seeded SPSA (MeZO) with an optional DP scalar (DPZero).

Each step draws a seed per direction, moves the parameters in place to theta + eps z, evaluates,
to theta - eps z, evaluates, and moves back, regenerating z from the seed each time. The
per-example projected gradients (l+ - l-) / (2 eps) are the only numbers that touch the data; with
DP they are clipped (jointly over the directions, to L2 norm C) and their sum gets one Gaussian
draw of standard deviation sigma * C before it is divided by the expected batch size. Everything
runs without autograd: no graph is built and no backward pass exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from fedft.data.encode import TensorData
from fedft.federation.training import step_batches, task_of
from fedft.methods.zo.directions import GAUSSIAN, Directions, decayed_mask
from fedft.methods.zo.head import ExactHead
from fedft.models.backbone import TaskModel
from fedft.privacy.noise import RandomSource, poisson_batches


@dataclass(frozen=True)
class ScalarPrivacy:
    clip: float
    noise_multiplier: float
    expected_batch: float
    sample_rate: float


@dataclass
class ZoSteps:
    """What a client did in one round: the wire values of its seeds and its scalars, step-major."""

    seeds: list[int] = field(default_factory=list)
    grads: list[float] = field(default_factory=list)
    steps: int = 0
    loss_sum: float = 0.0
    examples_seen: int = 0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.examples_seen if self.examples_seen else float("nan")


def per_example_loss(model: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return task_of(model).example_losses(model(batch), batch).to(torch.float64)


def privatize(per_example: torch.Tensor, dp: ScalarPrivacy, noise: RandomSource) -> torch.Tensor:
    """Clip each example's row of scalars to L2 norm C, sum, add N(0, (sigma C)^2), divide by the
    expected batch size: the sum's sensitivity is C, so this is the subsampled Gaussian mechanism
    the accountant counts."""
    n = per_example.shape[1]
    norms = per_example.norm(dim=1, keepdim=True)
    clipped = per_example * (dp.clip / norms.clamp_min(1e-12)).clamp(max=1.0)
    draw = noise.normal((n,), dp.noise_multiplier * dp.clip, torch.float64)
    return (clipped.sum(dim=0) + draw) / dp.expected_batch


@torch.no_grad()
def zo_step(
    model: TaskModel,
    params: Sequence[torch.Tensor],
    decayed: Sequence[bool],
    batch: dict[str, torch.Tensor] | None,
    seeds: Sequence[int],
    eps: float,
    lr: float,
    weight_decay: float,
    dp: ScalarPrivacy | None = None,
    noise: RandomSource | None = None,
    directions: Directions = GAUSSIAN,
    head: ExactHead | None = None,
) -> tuple[torch.Tensor, float]:
    """One ZO-SGD step in place. Returns the scalars sent (float32, one per direction) and the
    summed loss at the perturbed points. `batch` None is an empty Poisson sample (DP only).
    `head`: a head trained by exact gradients from the same forward passes (not under DP)."""
    n = len(seeds)
    width = len(params)
    fused = n == 1 and batch is not None  # restore and update in one pass over z
    columns, loss_sum = [], 0.0
    capture = head.capture if head is not None else nullcontext
    for seed in seeds if batch is not None else []:
        directions.add(params, seed, [eps] * width)
        with capture():
            plus = per_example_loss(model, batch)
        directions.add(params, seed, [-2 * eps] * width)
        with capture():
            minus = per_example_loss(model, batch)
        if not fused:
            directions.add(params, seed, [eps] * width)
        columns.append((plus - minus) / (2 * eps))
        loss_sum += float((plus + minus).sum()) / 2 / n
    if batch is None:
        per_example = torch.zeros(0, n, dtype=torch.float64)
    else:
        per_example = torch.stack(columns, dim=1)
    if dp is not None:
        assert noise is not None
        estimate = privatize(per_example, dp, noise)
    else:
        estimate = per_example.mean(dim=0)
    grads = estimate.to(torch.float32)  # what is sent is what is applied, here and on the server
    a = 1.0 - lr * weight_decay
    if a != 1.0:
        for param, dec in zip(params, decayed, strict=True):
            if dec:
                param.mul_(a)
    for seed, g in zip(seeds, grads.tolist(), strict=True):
        step = -lr * g / n
        if (
            fused
        ):  # params sit at theta - eps z: theta' = a theta - lr g z = a(.) + (a eps - lr g) z
            scales = [a * eps + step if dec else eps + step for dec in decayed]
        else:
            scales = [step] * width
        directions.add(params, seed, scales)
    if head is not None and batch is not None:
        head.step(batch)
    return grads, loss_sum


def run_zo(
    model: TaskModel,
    params: Sequence[torch.Tensor],
    data: TensorData,
    rows: np.ndarray,
    steps: int,
    batch_size: int,
    seeds_for: Callable[[int], tuple[list[int], list[int]]],
    eps: float,
    lr: float,
    weight_decay: float,
    device: torch.device,
    sampling: torch.Generator | RandomSource,
    dp: ScalarPrivacy | None = None,
    noise: RandomSource | None = None,
    lengths: np.ndarray | None = None,
    directions: Directions = GAUSSIAN,
    head: ExactHead | None = None,
) -> ZoSteps:
    """A client's round of ZO-SGD. `seeds_for(step)` gives (wire values, actual seeds).
    `sampling` shuffles the rows into batches (grouped by `lengths` when given), or under DP (a
    `RandomSource`) draws the Poisson samples."""
    if len(rows) == 0:
        raise ValueError("client has no training rows")
    decayed = decayed_mask(params)
    was_training = model.training
    model.eval()  # no dropout: both evaluations of a step must see the same function
    out = ZoSteps()
    if dp is not None:
        assert not isinstance(sampling, torch.Generator), "DP sampling needs a RandomSource"
        schedule = poisson_batches(rows, dp.sample_rate, steps, sampling)
    else:
        assert isinstance(sampling, torch.Generator)
        schedule = step_batches(rows, batch_size, steps, sampling, None, lengths)
    try:
        for step, index in enumerate(schedule):
            wire, actual = seeds_for(step)
            batch = {k: v.to(device) for k, v in data.batch(index).items()} if len(index) else None
            grads, loss_sum = zo_step(
                model, params, decayed, batch, actual, eps, lr, weight_decay, dp, noise,
                directions, head,
            )  # fmt: skip
            out.seeds.extend(wire)
            out.grads.extend(grads.tolist())
            out.steps += 1
            out.loss_sum += loss_sum
            out.examples_seen += len(index)
    finally:
        model.train(was_training)
    return out
