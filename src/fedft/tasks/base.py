"""The contract of a task: what a batch means to the model, the loss a method minimises, and how
a model is scored.

A method never branches on the task. It calls `model(batch)` (the task decides what the model
returns), `model.task.loss(output, batch)` to train, `model.task.example_losses(output, batch)`
where it needs one number per example (DP clipping of a forward-only scalar), `error_norms` to
rank examples (EL2N pruning), and `evaluate` to score a model on rows of a dataset (or
`evaluate_groups` for several row sets at once: `score_rows` gives figures per row, `summarize`
the metrics of any subset).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from fedft.data.encode import TensorData
    from fedft.data.sources import RawData


RowScores = dict[str, np.ndarray]  # per row: a task's figures, aligned with the rows scored


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

    def score_rows(
        self,
        model: torch.nn.Module,
        data: TensorData,
        rows: np.ndarray,
        batch_size: int,
        device: torch.device,
        generate: np.ndarray | None = None,
    ) -> RowScores:
        """Figures per row, aligned with `rows` (the model already in eval mode): what
        `summarize` turns into the task's metrics for any subset of the rows. `generate`: a mask
        of the rows whose generations are scored too (generative tasks)."""
        raise NotImplementedError

    def summarize(self, scores: RowScores) -> dict[str, float]:
        """The task's metrics of some rows from their `score_rows` figures; `num_examples` among
        them."""
        raise NotImplementedError

    def generation_mask(self, rows: np.ndarray, generations: int | None) -> np.ndarray | None:
        """Which of `rows` a model's generations are scored on when these rows are scored as one
        set (None: the task does not generate)."""
        return None

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
        rows = np.arange(len(data)) if rows is None else np.asarray(rows)
        return self.evaluate_groups(model, data, [rows], batch_size, device, generations)[0]

    @torch.inference_mode()
    def evaluate_groups(
        self,
        model: torch.nn.Module,
        data: TensorData,
        groups: list[np.ndarray],
        batch_size: int,
        device: torch.device,
        generations: int | None = None,
    ) -> list[dict[str, float]]:
        """`evaluate` of each group of rows, from one pass over all of them: many clients'
        few test rows fill whole batches instead of a batch each. Each group's metrics are what
        it would score alone (its generation rows picked from its own rows), up to float
        rounding of batches padded differently."""
        groups = [np.asarray(g, dtype=np.int64) for g in groups]
        rows = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
        masks = [self.generation_mask(g, generations) for g in groups]
        generate = None if any(m is None for m in masks) else np.concatenate(masks)
        was_training = model.training
        model.eval()
        try:
            scores = self.score_rows(model, data, rows, batch_size, device, generate)
        finally:
            model.train(was_training)
        bounds = np.cumsum([0] + [len(g) for g in groups])
        return [
            self.summarize({k: v[a:b] for k, v in scores.items()})
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def describe(self) -> str:
        return self.name
