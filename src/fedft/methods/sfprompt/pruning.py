"""EL2N data pruning (Paul et al. 2021), scored on the client's own split model with the body
skipped, as SFPrompt does: the split phase then runs on the examples that still teach something."""

from __future__ import annotations

import math

import numpy as np
import torch

from fedft.data.encode import TensorData
from fedft.models.backbone import TaskModel


@torch.no_grad()
def el2n_scores(
    model: TaskModel, data: TensorData, rows: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """||softmax(f(x)) - onehot(y)||_2 per row, f = the model as it stands (eval mode); for
    generation, its mean over the row's response tokens."""
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(rows[start : start + batch_size]).items()}
        scores.append(model.task.error_norms(model(batch), batch).cpu())
    model.train(was_training)
    return torch.cat(scores).numpy() if scores else np.zeros(0)


def keep_highest(
    rows: np.ndarray, scores: np.ndarray, fraction: float, labels: np.ndarray | None = None
) -> np.ndarray:
    """The ceil(fraction * n) rows with the highest scores, highest first (ties: row order).

    With `labels` (one per row), the same share of each class instead: ceil(fraction * n_c) of
    class c's rows. Early in training the rows a model gets most wrong are mostly one class (on a
    binary task, the class its head leans away from), so a global cut can keep one class only."""
    if labels is None:
        keep = math.ceil(fraction * len(rows))
        return rows[np.argsort(-scores, kind="stable")[:keep]]
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep = math.ceil(fraction * len(members))
        chosen.append(members[np.argsort(-scores[members], kind="stable")[:keep]])
    picked = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return rows[picked[np.argsort(-scores[picked], kind="stable")]]
