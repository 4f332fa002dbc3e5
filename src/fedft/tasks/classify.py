"""`classify`: a model with a classification head; logits over the run's labels, cross-entropy,
accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from fedft.tasks.base import RowScores, Task

if TYPE_CHECKING:
    from fedft.data.encode import TensorData
    from fedft.data.sources import RawData
    from fedft.models.backbone import Preprocess


class Classify(Task):
    name = "classify"
    headline = "accuracy"
    higher_is_better = True

    def __init__(self, preprocess: Preprocess | None = None):
        self.preprocess = preprocess

    def logits(self, net: Any, inputs: dict[str, Any], batch: dict[str, torch.Tensor]) -> Any:
        return net(**inputs).logits

    def example_losses(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(output, batch["labels"], reduction="none")

    def loss(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(output, batch["labels"])

    def error_norms(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        probs = output.float().softmax(-1)
        target = F.one_hot(batch["labels"], probs.shape[-1]).float()
        return (probs - target).norm(dim=-1)

    def encode_splits(self, raw: RawData) -> tuple[TensorData, TensorData]:
        from fedft.data.encode import encode, pixel_scale_of

        assert self.preprocess is not None
        scale = pixel_scale_of(raw.train) if raw.kind == "image" else None
        return encode(raw.train, self.preprocess, scale), encode(raw.test, self.preprocess, scale)

    def score_rows(
        self,
        model: torch.nn.Module,
        data: TensorData,
        rows: np.ndarray,
        batch_size: int,
        device: torch.device,
        generate: np.ndarray | None = None,
    ) -> RowScores:
        """Each row's cross-entropy and whether its arg-max class is its label."""
        losses, correct = np.zeros(len(rows)), np.zeros(len(rows), dtype=bool)
        for at in data.length_batches(rows, batch_size):
            batch = {k: v.to(device) for k, v in data.batch(rows[at]).items()}
            logits = model(batch)
            losses[at] = F.cross_entropy(logits.float(), batch["labels"], reduction="none").cpu()
            correct[at] = (logits.argmax(-1) == batch["labels"]).cpu().numpy()
        return {"loss": losses, "correct": correct}

    def summarize(self, scores: RowScores) -> dict[str, float]:
        n = len(scores["loss"])
        if n == 0:
            return {"num_examples": 0, "loss": float("nan"), "accuracy": float("nan")}
        return {
            "num_examples": n,
            "loss": float(scores["loss"].sum() / n),
            "accuracy": float(scores["correct"].sum() / n),
        }
