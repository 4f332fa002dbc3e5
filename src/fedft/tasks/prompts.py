"""Turning generation rows into token ids: the prompt format, the response's end, truncation.

A row is a prompt (the user's content: an instruction and its input, or a classification text
inside `task.label_prompt`) and a response. The prompt is framed by the model's chat template
where its tokenizer has one (a system turn, the user turn, the assistant's opening), else by a
plain template:

    ### Instruction:
    {prompt}

    ### Response:
    {response}<eos>

The response ends with the token that closes an assistant turn (`<|im_end|>` for ChatML models;
the tokenizer's end-of-sequence token in the plain template), so a tuned model learns to stop.
Only response tokens (and that end token) carry loss: prompt positions get target -100.

The frame is tokenized once and the content of each row apart, so that a row longer than
`model.max_length` loses the end of its content, never the frame or, silently, its response: the
content keeps at least a quarter of what the frame leaves (or all of it, if shorter), the response
gets the rest, and only a response that still does not fit is cut (it then loses its end token).
Both counts are reported.

A plain-text row (language modelling) is the tokenizer's own encoding of the text plus the
end-of-sequence token, every token but the first a target; a longer text loses its end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedft.errors import ConfigError

IGNORE = -100
SENTINEL = "\x00fedft-content\x00"
PLAIN_PREFIX = "### Instruction:\n"
PLAIN_SUFFIX = "\n\n### Response:\n"


@dataclass(frozen=True)
class PromptFormat:
    prefix: list[int]  # token ids before the content
    suffix: list[int]  # after it, up to where the response starts
    end: list[int]  # what closes the response
    name: str  # "chat template" or "plain template"


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_format(tokenizer: Any, template: str, system: str | None) -> PromptFormat:
    """The frame around every prompt. `template`: 'auto' (the chat template where the tokenizer
    has one), 'chat' (refused without one) or 'plain'."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ConfigError(
            "task.template=chat: the model's tokenizer has no chat template; use task.template=plain"
        )
    if template == "plain" or not has_chat:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the model's tokenizer has no end-of-sequence token to end responses")
        # the prefix carries the tokenizer's own special tokens (a BOS where it adds one)
        return PromptFormat(
            _ids(tokenizer, PLAIN_PREFIX, special=True),
            _ids(tokenizer, PLAIN_SUFFIX),
            [int(eos)],
            "plain template",
        )
    turns = [{"role": "system", "content": system}] if system is not None else []
    turns.append({"role": "user", "content": SENTINEL})
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    prefix, _, suffix = text.partition(SENTINEL)
    answered = tokenizer.apply_chat_template(
        [*turns, {"role": "assistant", "content": SENTINEL}], tokenize=False
    )
    closing = answered.rpartition(SENTINEL)[2].rstrip()
    end = _ids(tokenizer, closing) if closing else [int(tokenizer.eos_token_id)]
    return PromptFormat(_ids(tokenizer, prefix), _ids(tokenizer, suffix), end, "chat template")


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [N, L], right-padded
    attention_mask: torch.Tensor  # [N, L]
    target_ids: torch.Tensor  # [N, L], IGNORE where no loss
    lengths: np.ndarray  # real tokens per row
    prompts_cut: int = 0
    responses_cut: int = 0


def _pack(rows: list[tuple[list[int], list[int]]], max_length: int, pad: int) -> Encoded:
    """(context, targets) token lists -> right-padded tensors; targets follow the context."""
    n = len(rows)
    ids = torch.full((n, max_length), pad, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    targets = torch.full((n, max_length), IGNORE, dtype=torch.long)
    lengths = np.zeros(n, dtype=np.int64)
    for i, (context, answer) in enumerate(rows):
        seq = context + answer
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
        if answer:
            targets[i, len(context) : len(seq)] = torch.tensor(answer, dtype=torch.long)
        lengths[i] = len(seq)
    return Encoded(ids, mask, targets, lengths)


def encode_pairs(
    tokenizer: Any,
    fmt: PromptFormat,
    prompts: list[str],
    responses: list[str],
    max_length: int,
) -> Encoded:
    """Prompt/response rows in the frame, truncated as the module's docstring says."""
    frame = len(fmt.prefix) + len(fmt.suffix)
    room = max_length - frame
    if room < 2:
        raise ConfigError(
            f"model.max_length={max_length} leaves no room: the {fmt.name} alone takes {frame} "
            f"tokens; raise model.max_length to at least {frame + 16}"
        )
    contents = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    answers = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    rows, prompts_cut, responses_cut = [], 0, 0
    for content, answer in zip(contents, answers, strict=True):
        answer = list(answer) + fmt.end
        content = list(content)
        if len(content) + len(answer) > room:
            keep = max(min(len(content), room // 4), room - len(answer))
            keep = max(1, min(keep, room - 1)) if content else 0
            if keep < len(content):
                content = content[:keep]
                prompts_cut += 1
            if len(content) + len(answer) > room:
                answer = answer[: room - len(content)]
                responses_cut += 1
        rows.append((fmt.prefix + content + fmt.suffix, answer))
    out = _pack(rows, max_length, _pad_id(tokenizer))
    out.prompts_cut, out.responses_cut = prompts_cut, responses_cut
    return out


def encode_texts(tokenizer: Any, texts: list[str], max_length: int) -> Encoded:
    """Plain texts for language modelling: every token after the first is a target."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    rows, cut = [], 0
    for ids in encoded:
        seq = list(ids) + ([int(eos)] if eos is not None else [])
        if len(seq) > max_length:
            seq = seq[:max_length]
            cut += 1
        rows.append((seq[:1], seq[1:]))
    out = _pack(rows, max_length, _pad_id(tokenizer))
    out.responses_cut = cut
    return out


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id or 0)


def prompt_lengths(target_ids: torch.Tensor) -> torch.Tensor:
    """Per row, the index of its first target: the prompt is everything before it."""
    has = target_ids != IGNORE
    first = torch.where(has.any(1), has.float().argmax(1), torch.full_like(has[:, 0], 0).long())
    return first.long()
