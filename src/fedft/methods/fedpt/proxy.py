"""Proxy-tuning (Liu et al. 2024): steer a large model by how tuning moved a small one,

    logits = large(x) + α · (small_tuned(x) − small_untuned(x)),

for a classifier (over its labels) or a causal LM (over the next token, driving generation); and
distilling the steered model back into the small one (KL at temperature T).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedft.methods.fedpt.logits import (
    CountingCache,
    LocalCausalLM,
    check_same_space,
    next_token_logits,
)
from fedft.models.backbone import TaskModel
from fedft.tasks.base import Task
from fedft.tasks.generate import Generate


def proxy_logits(
    large: torch.Tensor, tuned: torch.Tensor, untuned: torch.Tensor, alpha: float
) -> torch.Tensor:
    if alpha == 0:
        return large
    return large + alpha * (tuned - untuned)


def batch_texts(model: TaskModel, batch: dict[str, torch.Tensor]) -> list[str]:
    """The texts the large model is asked about: the batch's tokens decoded by the small model's
    tokenizer (the large model may tokenize differently)."""
    ids = batch["input_ids"].cpu()
    return model.preprocess.tokenizer.batch_decode(ids, skip_special_tokens=True)


class LargeAlone(nn.Module):
    """The large model by itself, scored like any model: forward(batch) -> logits."""

    def __init__(self, large: CountingCache, reader: TaskModel):
        super().__init__()
        self.large = large
        self.reader = reader  # only its tokenizer, to decode the batch

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.large.logits(batch_texts(self.reader, batch)).to(batch["input_ids"].device)


class ProxyTuned(nn.Module):
    """The large model steered by the small one's tuning."""

    def __init__(self, large: CountingCache, tuned: TaskModel, untuned: TaskModel, alpha: float):
        super().__init__()
        self.large, self.tuned, self.untuned, self.alpha = large, tuned, untuned, alpha

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        large = self.large.logits(batch_texts(self.tuned, batch)).to(batch["input_ids"].device)
        if self.alpha == 0:
            return large
        return proxy_logits(large, self.tuned(batch), self.untuned(batch), self.alpha)


def distillation_kl(
    teacher: torch.Tensor, student: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over examples."""
    return (
        F.kl_div(
            F.log_softmax(student / temperature, -1),
            F.log_softmax(teacher / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )


# --- causal language models ----------------------------------------------------------------------
@torch.inference_mode()
def proxy_generate(
    large: Any,
    tuned: Any,
    untuned: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    alpha: float = 1.0,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    stop_ids: list[int] | None = None,
    pad_id: int = 0,
) -> torch.Tensor:
    """Continue `input_ids` (left-padded where `attention_mask` says so) token by token from the
    proxy-tuned next-token logits, greedy at temperature 0, else sampled; the prompt and the new
    tokens. A row that emits a stop id is done: it gets `pad_id` after it, and decoding ends when
    every row is. Refuses a pair whose vocabularies differ."""
    check_same_space(large.space, tuned.space)
    check_same_space(large.space, untuned.space)
    ids = input_ids
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    stops = torch.tensor(stop_ids or [], dtype=torch.long, device=ids.device)
    sources = (large, tuned) if alpha == 0 else (large, tuned, untuned)
    for source in sources:
        getattr(source, "begin_decoding", lambda: None)()
    try:
        for _ in range(max_new_tokens):
            large_next = next_token_logits(large, ids, mask).to(ids.device)
            if alpha == 0:
                logits = large_next
            else:
                logits = proxy_logits(
                    large_next,
                    next_token_logits(tuned, ids, mask).to(ids.device),
                    next_token_logits(untuned, ids, mask).to(ids.device),
                    alpha,
                )
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                probs = F.softmax(logits / temperature, -1)
                token = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(ids.device)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            ids = torch.cat([ids, token[:, None].to(ids)], dim=1)
            mask = torch.cat([mask, (~done).long()[:, None].to(mask)], dim=1)
            done |= torch.isin(token, stops)
            if bool(done.all()):
                break
    finally:
        for source in sources:
            getattr(source, "end_decoding", lambda: None)()
    return ids


class CausalProxy(nn.Module):
    """The proxy-tuned causal LM, `large + α·(tuned − untuned)` over the vocabulary, scored and
    decoded where a `TaskModel` would be: `forward(batch)` gives next-token logits at the
    positions the generation task scores, `generate` decodes greedily. Without a tuned pair it
    is the large model alone. The small models are read through their logits too, so one code
    path serves a local or a served large model."""

    def __init__(
        self,
        task: Task,
        large: Any,
        tuned: TaskModel | None = None,
        untuned: TaskModel | None = None,
        alpha: float = 1.0,
    ):
        super().__init__()
        self.task = task  # what scores it (a generation task)
        self.large = large
        self.small = (
            None
            if tuned is None or untuned is None
            else (
                LocalCausalLM(tuned.net, tuned.preprocess.tokenizer),
                LocalCausalLM(untuned.net, untuned.preprocess.tokenizer),
            )
        )
        self.alpha = alpha
        self._models = nn.ModuleList([m for m in (tuned, untuned) if m is not None])

    def parts(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The large model's logits and, with a pair, the tuned and untuned small models', at the
        positions the generation task scores."""
        keep = Generate.kept_positions(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        sources = (self.large,) if self.small is None else (self.large, *self.small)
        return tuple(s.sequence_logits(ids, mask, keep).to(ids.device) for s in sources)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = self.parts(batch)
        return parts[0] if len(parts) == 1 else proxy_logits(*parts, self.alpha)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        stop_ids: list[int],
        pad_id: int,
    ) -> torch.Tensor:
        """Greedy continuations of left-padded prompts; only the new tokens."""
        tuned, untuned = self.small if self.small is not None else (self.large, self.large)
        out = proxy_generate(
            self.large, tuned, untuned, input_ids, max_new_tokens,
            alpha=self.alpha if self.small is not None else 0.0,
            attention_mask=attention_mask, stop_ids=stop_ids, pad_id=pad_id,
        )  # fmt: skip
        return out[:, input_ids.shape[1] :]
