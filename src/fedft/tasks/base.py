"""The contract of a task: what a batch means to the model, the loss a method minimises, and how
a model is scored.

A method never branches on the task. It calls `model(batch)` (the task decides what the model
returns), `model.task.loss(output, batch)` to train, `model.task.example_losses(output, batch)`
where it needs one number per example (DP clipping of a forward-only scalar), `error_norms` to
rank examples (EL2N pruning), and `evaluate` to score a model on rows of a dataset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from fedft.data.encode import TensorData
    from fedft.data.sources import RawData


class Task:
    name: ClassVar[str] = ""
    # the metric a run is judged by (summary, progress bar, plot), and which way is better
    headline: str = "accuracy"
    higher_is_better: bool = True

    def logits(self, net: Any, inputs: dict[str, Any], batch: dict[str, torch.Tensor]) -> Any:
        """Run the Hugging Face model on `inputs` (the batch's model inputs after any input hooks)
        and return what the loss reads."""
        raise NotImplementedError

    def example_losses(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per example, shape [B]."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: the mean of the examples' losses (what DP-SGD's per-example
        gradients assume)."""
        return self.example_losses(output, batch).mean()

    def error_norms(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per example, ||softmax(output) - onehot(target)||_2 (EL2N), shape [B]."""
        raise NotImplementedError

    def encode_splits(self, raw: RawData) -> tuple[TensorData, TensorData]:
        """The train and test rows as model-ready tensors."""
        raise NotImplementedError

    def evaluate(
        self,
        model: torch.nn.Module,
        data: TensorData,
        rows: np.ndarray | None,
        batch_size: int,
        device: torch.device,
        generations: int | None = None,
    ) -> dict[str, float]:
        """Metrics of `model` on `rows` of `data` (None: every row); `num_examples` among them.
        `generations`: how many rows a generative task generates for (None: its default)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name
