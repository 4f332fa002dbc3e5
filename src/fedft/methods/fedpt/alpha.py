"""Choosing α, the steering strength of proxy-tuning, on the server's validation rows.

α scales how far the small model's tuning moves the large model; the best value depends on the
pair and on how far the round's tuning went, so a fixed α is a guess. Each α of a small grid is
scored on rows that no client holds and that are not the test split (`data.server_rows`), and
the best is used until the next choice. The three models' logits are computed once a batch and
mixed for every α, so a grid of any size costs one pass of each model.

The score is the task's: classification and label words by accuracy (then loss, to break ties),
generation by the response loss (a greedy decode for every α would cost the grid's size in
decoding passes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedft.data.encode import TensorData
from fedft.methods.fedpt.proxy import proxy_logits
from fedft.tasks.base import Task
from fedft.tasks.generate import Generate, token_nll

Parts = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def alpha_curve(
    parts: Parts,
    task: Task,
    data: TensorData,
    grid: list[float],
    batch_size: int,
    device: torch.device,
) -> list[dict[str, float]]:
    """Each α of `grid` with its validation loss (and accuracy where the task has one);
    `parts(batch)` gives the large, tuned and untuned logits."""
    rows = np.arange(len(data))
    if isinstance(task, Generate):
        return _generate_curve(parts, task, data, rows, grid, batch_size, device)
    loss = np.zeros(len(grid))
    correct = np.zeros(len(grid))
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(rows[start : start + batch_size]).items()}
        large, tuned, untuned = parts(batch)
        for i, alpha in enumerate(grid):
            logits = proxy_logits(large, tuned, untuned, alpha)
            loss[i] += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct[i] += int((logits.argmax(-1) == batch["labels"]).sum())
    n = max(len(rows), 1)
    return [
        {"alpha": a, "loss": loss[i] / n, "accuracy": correct[i] / n} for i, a in enumerate(grid)
    ]


def _generate_curve(
    parts: Parts,
    task: Generate,
    data: TensorData,
    rows: np.ndarray,
    grid: list[float],
    batch_size: int,
    device: torch.device,
) -> list[dict[str, float]]:
    nll_sum, tokens = np.zeros(len(grid)), 0
    for batch in task.scoring_batches(data, rows, batch_size, device):
        large, tuned, untuned = parts(batch)
        for i, alpha in enumerate(grid):
            nll, mask = token_nll(proxy_logits(large, tuned, untuned, alpha), batch["target_ids"])
            nll_sum[i] += float((nll * mask).sum())
        tokens += int(mask.sum())
    curve = [{"alpha": a, "loss": nll_sum[i] / max(tokens, 1)} for i, a in enumerate(grid)]
    if task.mode == "labels":
        correct = np.zeros(len(grid))
        for batch in task.scoring_batches(data, rows, task.label_batch_size(batch_size)):
            scored = task.label_candidates(batch, device)
            large, tuned, untuned = parts(scored)
            for i, alpha in enumerate(grid):
                words = task.word_log_likelihoods(
                    proxy_logits(large, tuned, untuned, alpha), scored
                )
                correct[i] += int((words.argmax(1).cpu() == batch["labels"]).sum())
        for i, point in enumerate(curve):
            point["accuracy"] = correct[i] / max(len(rows), 1)
    return curve


def best_alpha(curve: list[dict[str, Any]]) -> float:
    """The α with the best accuracy (ties: the lower loss), or the lowest loss where there is
    no accuracy; among equals, the first in the grid."""
    if "accuracy" in curve[0]:
        return max(curve, key=lambda p: (p["accuracy"], -p["loss"]))["alpha"]
    return min(curve, key=lambda p: p["loss"])["alpha"]
