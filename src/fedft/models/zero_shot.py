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
    """encoder -> mean pooling -> cosine head; `forward(input_ids, attention_mask).logits`."""

    def __init__(self, encoder: nn.Module, head: CosineHead):
        super().__init__()
        self.encoder = encoder
        self.classifier = head  # "classifier": every method trains it as the task head
        self.config = encoder.config

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(
            logits=self.classifier(self.embed(input_ids, attention_mask))
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()


def keep_first_blocks(model: TaskModel, count: int) -> None:
    """The small model of a pair made from one checkpoint: its first `count` blocks."""
    blocks = model.blocks()
    if not 1 <= count <= len(blocks):
        raise ModelError(f"small_layers={count}, but {model.source} has {len(blocks)} blocks")
    del blocks[count:]
    if hasattr(model.net.config, "num_hidden_layers"):
        model.net.config.num_hidden_layers = count


@torch.no_grad()
def make_zero_shot(model: TaskModel, template: str, scale: float) -> None:
    """Replace the model's classifier by a cosine head over its label names' embeddings."""
    if model.kind != "text" or model.generative:
        raise ModelError(
            f"a zero-shot head scores a text encoder's sentence embedding; {model.source} is not "
            "a text encoder"
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
