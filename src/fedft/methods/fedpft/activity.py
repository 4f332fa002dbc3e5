"""How much each feed-forward neuron of the sub-model is used on a client's data.

Two measures, both over real tokens: `mean_abs`, the mean |activation| (the input of the output
projection, after the nonlinearity and any gate); and `nonpositive`, the share of pre-activations
(the first input projection's output) at or below zero, reported as 1 − that share so that higher
means more used either way. Exact zeros are not counted: under GELU they almost never occur.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedft.data.encode import TensorData
from fedft.methods.fedpft.submodel import Ffn
from fedft.models.backbone import TaskModel

Measure = Literal["mean_abs", "nonpositive"]


@torch.no_grad()
def neuron_activity(
    model: TaskModel,
    ffns: list[Ffn],
    data: TensorData,
    rows: np.ndarray,
    batch_size: int,
    measure: Measure,
    device: torch.device,
) -> tuple[dict[int, torch.Tensor], int]:
    """Per compressed layer, each neuron's activity averaged over the real tokens of `rows`; and
    how many tokens that was (the server's weight for this client)."""
    sums: dict[int, torch.Tensor] = {}
    counted: dict[int, int] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(layer: int):
        def take(_module: nn.Module, args: Any, output: Any = None) -> None:
            values = args[0] if output is None else output  # pre-hook: activation; hook: pre-act
            mask = current["mask"]
            kept = (values[mask] if mask is not None else values.flatten(0, -2)).float()
            score = kept.abs() if measure == "mean_abs" else (kept > 0).float()
            sums[layer] = sums.get(layer, 0) + score.sum(0).cpu()
            counted[layer] = counted.get(layer, 0) + kept.shape[0]

        return take

    handles = []
    for ffn in ffns:
        if measure == "mean_abs":
            module = model.get_submodule(ffn.output)
            handles.append(module.register_forward_pre_hook(hook(ffn.layer)))
        else:
            module = model.get_submodule(ffn.inputs[0])
            handles.append(module.register_forward_hook(hook(ffn.layer)))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = {
                k: v.to(device) for k, v in data.batch(rows[start : start + batch_size]).items()
            }
            mask = batch.get("attention_mask")
            current["mask"] = mask.bool() if mask is not None else None
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tokens = counted[ffns[0].layer] if ffns else 0
    return {layer: sums[layer] / max(counted[layer], 1) for layer in sums}, tokens
