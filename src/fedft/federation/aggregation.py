"""Server-side aggregation: the weighted mean of client states, and server optimizers that apply
it (FedAvg, FedAvgM, FedAdam after Reddi et al. 2021) with state that can be checkpointed."""

from __future__ import annotations

import torch

from fedft.config import FederationConfig

Tensors = dict[str, torch.Tensor]


def same_tensors(a: Tensors, b: Tensors) -> bool:
    """Whether two states hold the same names and values (the same objects, or equal)."""
    return a.keys() == b.keys() and all(a[k] is b[k] or torch.equal(a[k], b[k]) for k in a)


def weighted_mean(states: list[Tensors], weights: list[float]) -> Tensors:
    """sum_i w_i x_i / sum_i w_i per tensor, accumulated in float64 and cast back."""
    if not states:
        raise ValueError("no states to average")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out: Tensors = {}
    for name, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += state[name].to(torch.float64) * weight
        out[name] = (acc / total).to(first.dtype)
    return out


class ServerOptimizer:
    """Applies the aggregated model to the global one. `state` holds its tensors for checkpoints."""

    def __init__(self, cfg: FederationConfig):
        self.cfg = cfg
        self.state: Tensors = {}
        self.steps = 0

    def step(self, current: Tensors, aggregate: Tensors) -> Tensors:
        kind, lr = self.cfg.server_optimizer, self.cfg.server_lr
        self.steps += 1
        if kind == "fedavg" and lr == 1.0:
            return {k: v.clone() for k, v in aggregate.items()}
        new: Tensors = {}
        for name, value in current.items():
            delta = aggregate[name].to(torch.float32) - value.to(torch.float32)
            if kind == "fedavg":
                update = delta
            elif kind == "fedavgm":
                m = self.state.get(f"m.{name}", torch.zeros_like(delta))
                m = self.cfg.server_momentum * m + delta
                self.state[f"m.{name}"] = m
                update = m
            else:  # fedadam
                b1, b2, eps = self.cfg.server_momentum, self.cfg.server_beta2, self.cfg.server_eps
                m = b1 * self.state.get(f"m.{name}", torch.zeros_like(delta)) + (1 - b1) * delta
                v = (
                    b2 * self.state.get(f"v.{name}", torch.zeros_like(delta))
                    + (1 - b2) * delta * delta
                )
                self.state[f"m.{name}"], self.state[f"v.{name}"] = m, v
                update = m / (v.sqrt() + eps)
            new[name] = (value.to(torch.float32) + lr * update).to(value.dtype)
        return new
