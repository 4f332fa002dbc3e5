"""Proxy-tuning (Liu et al. 2024): steer a large model by how tuning moved a small one,

    logits = large(x) + α · (small_tuned(x) − small_untuned(x)),

for a classifier (over its labels) or a causal LM (over the next token, driving generation); and
distilling the steered model back into the small one (KL at temperature T).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedft.methods.fedpt.logits import CountingCache, OutputSpace, check_same_space
from fedft.models.backbone import TaskModel


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
class NextTokenSource(Protocol):
    space: OutputSpace

    def next_token_logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...


class LocalCausalLM:
    """A causal LM in this process, used only through its next-token logits."""

    def __init__(self, model: nn.Module, tokenizer):
        self._model = model.eval()
        size = int(model.config.vocab_size)
        known = tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))
        extra = [f"<unused {i}>" for i in range(len(known), size)]
        self.space = OutputSpace("tokens", tuple(known) + tuple(extra))

    @torch.inference_mode()
    def next_token_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._model(input_ids=input_ids).logits[:, -1, :].float()


@torch.inference_mode()
def proxy_generate(
    large: NextTokenSource,
    tuned: NextTokenSource,
    untuned: NextTokenSource,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    alpha: float = 1.0,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue `input_ids` token by token from the proxy-tuned next-token logits (greedy at
    temperature 0, else sampled). Refuses a pair whose vocabularies differ."""
    check_same_space(large.space, tuned.space)
    check_same_space(large.space, untuned.space)
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = proxy_logits(
            large.next_token_logits(ids),
            tuned.next_token_logits(ids),
            untuned.next_token_logits(ids),
            alpha,
        )
        if temperature == 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            probs = F.softmax(logits / temperature, -1)
            token = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, token.to(ids)], dim=1)
    return ids
