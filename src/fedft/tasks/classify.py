"""`classify`: a model with a classification head; logits over the run's labels, cross-entropy,
accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from fedft.tasks.base import Task

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

    @torch.inference_mode()
    def evaluate(
        self,
        model: torch.nn.Module,
        data: TensorData,
        rows: np.ndarray | None,
        batch_size: int,
        device: torch.device,
        generations: int | None = None,
    ) -> dict[str, float]:
        rows = np.arange(len(data)) if rows is None else rows
        if len(rows) == 0:
            return {"num_examples": 0, "loss": float("nan"), "accuracy": float("nan")}
        was_training = model.training
        model.eval()
        total_loss, correct = 0.0, 0
        for start in range(0, len(rows), batch_size):
            index = rows[start : start + batch_size]
            batch = {k: v.to(device) for k, v in data.batch(index).items()}
            logits = model(batch)
            total_loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        model.train(was_training)
        n = len(rows)
        return {"num_examples": n, "loss": total_loss / n, "accuracy": correct / n}
