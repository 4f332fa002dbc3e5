"""Turn rows into model-ready tensors once, up front, so that a batch is an index lookup."""

from __future__ import annotations

import math
from dataclasses import dataclass

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from fedft.errors import DataError
from fedft.models.backbone import Preprocess


@dataclass
class TensorData:
    """Rows as tensors. `labels` are class ids (for generation without classes, zeros).
    Text rows are right-padded to `model.max_length`; with `trim`, a batch drops the padding
    columns no row of it uses (the attention mask already hid them: the same result, up to float
    rounding, for less compute), and `lengths` (real tokens per row) lets batches group rows of
    similar length (`length_batches`)."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    lengths: np.ndarray | None = None
    trim: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(index, dtype=torch.long)
        out = {k: v[idx] for k, v in self.features.items()}
        if self.trim and len(idx):
            width = max(1, int(out["attention_mask"].sum(1).max()))
            out = {k: v[:, :width] if v.dim() == 2 else v for k, v in out.items()}
        out["labels"] = self.labels[idx]
        return out

    def length_batches(self, rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Batches of `rows` of similar length (less padding to compute), in a fixed order, as
        positions in `rows`."""
        lengths = self.lengths[rows] if self.lengths is not None else np.zeros(len(rows))
        order = np.argsort(lengths, kind="stable")
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def encode(ds: datasets.Dataset, pre: Preprocess, pixel_scale: float | None = None) -> TensorData:
    labels = torch.tensor(ds["label"], dtype=torch.long)
    if pre.kind == "text":
        enc = pre.tokenizer(
            list(ds["text"]),
            padding="max_length",
            truncation=True,
            max_length=pre.max_length,
            return_tensors="pt",
        )
        mask = enc["attention_mask"]
        return TensorData(
            {"input_ids": enc["input_ids"], "attention_mask": mask},
            labels,
            lengths=mask.sum(1).numpy(),
            trim=pre.tokenizer.padding_side == "right",
        )
    return TensorData({"pixel_values": _pixels(ds, pre, pixel_scale)}, labels)


def pixel_scale_of(ds: datasets.Dataset) -> float:
    return float(max(1.0, np.asarray(ds["pixels"], dtype=np.float32).max()))


def _pixels(ds: datasets.Dataset, pre: Preprocess, scale: float | None) -> torch.Tensor:
    flat = torch.tensor(np.asarray(ds["pixels"], dtype=np.float32))
    side = int(math.isqrt(flat.shape[1]))
    if side * side != flat.shape[1]:
        raise DataError(
            f"image rows have {flat.shape[1]} pixel columns, which is not a square image"
        )
    images = (flat / (scale or max(1.0, float(flat.max())))).view(-1, 1, side, side)
    if pre.image_size != side:
        images = F.interpolate(
            images, size=(pre.image_size, pre.image_size), mode="bilinear", align_corners=False
        )
    if pre.channels != 1:
        images = images.expand(-1, pre.channels, -1, -1).contiguous()
    return (images - 0.5) / 0.5
