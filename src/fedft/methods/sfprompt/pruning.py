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


def keep_highest(rows: np.ndarray, scores: np.ndarray, fraction: float) -> np.ndarray:
    """The ceil(fraction * n) rows with the highest scores, highest first (ties: row order)."""
    keep = math.ceil(fraction * len(rows))
    order = np.argsort(-scores, kind="stable")[:keep]
    return rows[order]
