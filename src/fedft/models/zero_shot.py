"""A classifier for a pretrained encoder that has none: the sentence embedding (mean of the last
hidden states over real tokens, as sentence-transformers pool) scored by cosine similarity against
one vector per label, first the embedding of the label's name. The label vectors are a trainable
head, so federated tuning starts from zero-shot rather than from a random layer (`fedpt`'s heads,
and `zo`'s `start: zero_shot`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from fedft.errors import ModelError
from fedft.models.backbone import TaskModel


class CosineHead(nn.Module):
    def __init__(self, label_vectors: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(label_vectors.clone())
        self.scale = scale

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(pooled, dim=-1) @ F.normalize(self.weight, dim=-1).T


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ZeroShotClassifier(nn.Module):
    """encoder -> mean pooling -> cosine head; `forward(input_ids, attention_mask).logits`, or
    `inputs_embeds` in place of the ids (prompt tuning's tokens, pooled with the text's)."""

    def __init__(self, encoder: nn.Module, head: CosineHead):
        super().__init__()
        self.encoder = encoder
        self.classifier = head  # "classifier": every method trains it as the task head
        self.config = encoder.config

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        hidden = self.encoder(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        ).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return SequenceClassifierOutput(logits=self.classifier(mean_pool(hidden, attention_mask)))

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()


def keep_first_blocks(model: TaskModel, count: int) -> None:
    """The small model of a pair made from one checkpoint: its first `count` blocks."""
    total = len(model.blocks())
    if not 1 <= count <= total:
        raise ModelError(f"small_layers={count}, but {model.source} has {total} blocks")
    keep_blocks(model, list(range(count)))


def keep_blocks(model: TaskModel, indices: list[int]) -> None:
    """Keep only the blocks at `indices` (in order), as layer-drop does: the first blocks and
    the last ones keep a causal LM's output far closer to the whole model's than the first
    blocks alone (their output is read by a head trained on the last block's). Blocks that
    number themselves for a key/value cache are renumbered."""
    blocks = model.blocks()
    if not indices or len(set(indices)) != len(indices) or sorted(indices) != list(indices):
        raise ModelError(f"small_layers={indices}: give distinct block indices in order")
    if indices[0] < 0 or indices[-1] >= len(blocks):
        raise ModelError(
            f"small_layers={indices}, but {model.source} has blocks 0 to {len(blocks) - 1}"
        )
    kept = [blocks[i] for i in indices]
    del blocks[:]
    for position, block in enumerate(kept):
        blocks.append(block)
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    config = model.net.config
    if hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) > max(indices):
        config.layer_types = [types[i] for i in indices]


ZERO_SHOT_TEMPLATE, ZERO_SHOT_SCALE = "{}", 20.0  # model.head=zero_shot: each label's own name


@torch.no_grad()
def make_zero_shot(model: TaskModel, template: str, scale: float) -> None:
    """Replace the model's classifier by a cosine head over its label names' embeddings (once:
    a model that has one already, from `model.head=zero_shot`, keeps it)."""
    if isinstance(model.net, ZeroShotClassifier):
        return
    if model.kind != "text" or model.generative:
        raise ModelError(
            f"a zero-shot head scores a text encoder's sentence embedding; {model.source} is not "
            "a text encoder (a causal LM on classification rows scores its label words already)"
        )
    encoder = model.net.base_model
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = (
            None  # mean pooling replaces it; an unused pooler would be trained and sent
        )
    tokenizer = model.preprocess.tokenizer
    texts = [template.format(name) for name in model.label_names]
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    was = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    hidden = encoder(
        input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
    ).last_hidden_state
    encoder.train(was)
    vectors = mean_pool(hidden, enc["attention_mask"].to(device))
    model.net = ZeroShotClassifier(encoder, CosineHead(vectors, scale))
