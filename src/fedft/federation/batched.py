"""Many clients in one forward pass: k clients that share a frozen backbone and differ only in
small tensors (LoRA factors, a head, prompt tokens) train together, each example through its own
client's tensors.

Each trained `nn.Linear` is swapped, for the block's steps, for a `RoutedLinear` that holds the k
clients' copies of its trainable tensors stacked, and sends each example's rows through its own
client's copy; a module of a method's own (prompt tokens) takes part by offering `routed(stacked,
route)`, a stand-in that does the same for its tensors. For a Linear, each example goes through its
own client's copy (one matmul per client on exactly that client's rows, so each client's part is the
matmul its sequential step would do). The loss is the sum of the clients' own mean losses, so each
client's gradient is its own; AdamW is elementwise, so one optimizer over the stacked tensors is k
optimizers; gradient clipping is per client. Every client draws its batches from its own seeded
generator, as `train_locally` does. What differs from k sequential rounds is the frozen layers'
matmuls over the joined batch (float rounding) and dropout, which one forward pass cannot draw as
k separate ones would: equal to sequential training up to float tolerance where dropout is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedft.config import TrainConfig
from fedft.data.encode import TensorData
from fedft.federation.training import (
    TrainStats,
    checkpointing,
    local_steps,
    make_optimizer,
    row_lengths,
    step_batches,
    task_of,
)


@dataclass
class Route:
    """Which client each row of the current batch belongs to (set before each forward)."""

    rows_of: list[torch.Tensor]  # per client: the row positions in the joined batch

    def client_of_row(self) -> torch.Tensor:
        """Each row's client, for modules that gather per row instead of per client."""
        out = torch.empty(sum(len(r) for r in self.rows_of), dtype=torch.long)
        for client, rows in enumerate(self.rows_of):
            out[rows.cpu()] = client
        return out.to(self.rows_of[0].device) if self.rows_of else out


class RoutedLinear(nn.Module):
    """k clients' copies of a Linear's trainable tensors; frozen tensors stay shared."""

    def __init__(self, base: nn.Linear, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 route: Route):  # fmt: skip
        super().__init__()
        self.base, self.route = base, route
        self.weight = nn.Parameter(weight) if weight is not None else None
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(*x.shape[:-1], self.base.out_features)
        for client, rows in enumerate(self.route.rows_of):
            w = self.weight[client] if self.weight is not None else self.base.weight
            b = self.bias[client] if self.bias is not None else self.base.bias
            out[rows] = F.linear(x[rows], w, b)
        return out


def _routable(module: nn.Module | None, leaf: str) -> bool:
    if isinstance(module, nn.Linear):
        return leaf in ("weight", "bias")
    return callable(getattr(module, "routed", None))


def batchable(model: nn.Module, names: list[str]) -> bool:
    """Whether every trained tensor is a Linear's weight or bias (LoRA factors, a head) or a
    tensor of a module that offers `routed` (prompt tokens)."""
    modules = dict(model.named_modules())
    return all(_routable(modules.get(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in names)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def train_batched(
    model: nn.Module,
    names: list[str],
    data: TensorData,
    rows: list[np.ndarray],
    starts: list[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    lr: float,
    seeds: list[int],
    device: torch.device,
) -> tuple[list[dict[str, torch.Tensor]], list[TrainStats]]:
    """Train k clients at once from their own `starts`; each one's trained tensors and stats, as
    k calls of `train_locally` would give them. The clients must take the same number of steps."""
    counts = {local_steps(cfg, len(r)) for r in rows}
    if len(counts) != 1:
        raise ValueError(f"batched clients must take the same number of steps, not {counts}")
    steps = counts.pop()
    k = len(rows)
    modules = dict(model.named_modules())
    owners: dict[str, dict[str, str]] = {}
    for name in names:
        owner, leaf = name.rsplit(".", 1)
        owners.setdefault(owner, {})[leaf] = name
    route = Route([])
    swapped: dict[str, nn.Module] = {}
    stacked: dict[str, nn.Parameter] = {}
    for owner, leaves in owners.items():
        base = modules[owner]
        copies = {
            leaf: torch.stack([s[name].to(device) for s in starts]).clone()
            for leaf, name in leaves.items()
        }
        if isinstance(base, nn.Linear):
            routed = RoutedLinear(base, copies.get("weight"), copies.get("bias"), route)
        else:
            routed = base.routed(copies, route)
        for leaf, name in leaves.items():
            stacked[name] = getattr(routed, leaf)
        swapped[owner] = base
        _set_module(model, owner, routed)
    params = [stacked[n] for n in names]
    optimizer = make_optimizer(params, cfg, lr)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    torch.manual_seed(seeds[0])  # dropout: one draw for the joined batch
    model.train()
    task = task_of(model)
    lengths = row_lengths(data, cfg)
    plans = [
        step_batches(r, cfg.batch_size, steps, g, None, lengths)
        for r, g in zip(rows, generators, strict=True)
    ]
    totals, seen = [0.0] * k, [0] * k
    bf16 = cfg.precision == "bf16"
    try:
        with checkpointing(model, cfg):
            for step, indices in enumerate(zip(*plans, strict=True)):
                joined = np.concatenate(indices)
                bounds = np.cumsum([0, *(len(i) for i in indices)])
                route.rows_of = [
                    torch.arange(int(bounds[c]), int(bounds[c + 1]), device=device)
                    for c in range(k)
                ]
                batch = {key: v.to(device) for key, v in data.batch(joined).items()}
                with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    losses = task.example_losses(model(batch), batch).float()
                means = torch.stack([losses[r].mean() for r in route.rows_of])
                if not bool(torch.isfinite(means).all()):
                    raise FloatingPointError(f"non-finite training loss at local step {step + 1}")
                optimizer.zero_grad(set_to_none=True)
                means.sum().backward()
                if cfg.max_grad_norm is not None:
                    _clip_per_client(params, k, cfg.max_grad_norm)
                optimizer.step()
                for c in range(k):
                    totals[c] += float(means[c].detach()) * len(indices[c])
                    seen[c] += len(indices[c])
    finally:
        for owner, base in swapped.items():
            _set_module(model, owner, base)
    trained = [{n: stacked[n].detach()[c].clone() for n in names} for c in range(k)]
    stats = [TrainStats(len(rows[c]), steps, totals[c] / seen[c]) for c in range(k)]
    return trained, stats


@torch.no_grad()
def _clip_per_client(params: list[nn.Parameter], k: int, max_norm: float) -> None:
    """`clip_grad_norm_` of each client's own tensors (its slice of every stacked tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.reshape(k, -1).norm(dim=1) for g in grads]).norm(dim=0)  # [k]
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(k, *([1] * (g.dim() - 1))))
