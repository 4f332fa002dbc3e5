"""`generate`: supervised fine-tuning of a causal language model.

Three kinds of rows (the data decides, `fedft.data.sources`):

- `sft`: a prompt and a response (Alpaca/Dolly `instruction` + `input` -> `output`). Loss on the
  response tokens; scored by the response loss, its perplexity, and Rouge-L of greedy
  generations on a fixed, seeded subset of the rows.
- `labels`: classification rows run as generation (the MeZO / LM-BFF way). The prompt is
  `task.label_prompt` around the text, the response the label word; scored also by accuracy from
  the label words' likelihoods: each label word's summed log-probability given the prompt, the
  best one is the answer.
- `lm`: plain text; loss on every token; scored by loss and perplexity.

The training loss of a batch is the mean over its examples of each example's mean target-token
loss (so DP's per-example clipping and forward-only scalars see one number per example); the
reported `loss` is the mean over every target token of the rows scored, and `perplexity` its
exponential.

The model computes next-token logits only at the positions that predict a target (transformers'
`logits_to_keep`): a vocabulary of 49k makes the LM head as costly as the whole body otherwise.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from fedft.errors import ConfigError
from fedft.tasks.base import RowScores, Task
from fedft.tasks.prompts import (
    IGNORE,
    Encoded,
    PromptFormat,
    encode_pairs,
    encode_texts,
    prompt_format,
    prompt_lengths,
)

if TYPE_CHECKING:
    from fedft.config import TaskConfig
    from fedft.data.encode import TensorData
    from fedft.data.sources import RawData

Mode = Literal["sft", "labels", "lm"]
log = logging.getLogger("fedft")


def token_nll(output: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood [B, k-1] and its target mask, for logits kept at the
    last k positions of the sequence (`output` [B, k, V], `targets` [B, T])."""
    kept = output.shape[1]
    shifted = targets[:, targets.shape[1] - kept + 1 :]
    logits = output[:, :-1]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        shifted.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(shifted.shape)
    return nll, shifted != IGNORE


class Generate(Task):
    name = "generate"

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        options: TaskConfig,
        mode: Mode,
        label_words: list[str],
        seed: int,
    ):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.options = options
        self.mode = mode
        self.seed = seed
        self.label_words = label_words
        self.format: PromptFormat | None = None
        if mode != "lm":
            self.format = prompt_format(tokenizer, options.template, options.system_prompt)
        self.headline, self.higher_is_better = {
            "sft": ("rouge_l", True) if options.eval_generations > 0 else ("perplexity", False),
            "labels": ("accuracy", True),
            "lm": ("perplexity", False),
        }[mode]
        self.word_ids = [
            list(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in label_words
        ]
        if mode == "labels" and any(not ids for ids in self.word_ids):
            raise ConfigError("task.label_words: a label word is empty; give each class a word")
        self.cut: dict[str, int] = {}
        self._accepts_keep: dict[type, bool] = {}

    def describe(self) -> str:
        what = {"sft": "prompt -> response", "labels": "label words", "lm": "language modelling"}
        frame = f", {self.format.name}" if self.format else ""
        return f"generate ({what[self.mode]}{frame})"

    # --- inputs ----------------------------------------------------------------------------------
    def prompt_text(self, raw_prompt: str) -> str:
        """The user's content for a row: the prompt as it is, or a labelled text in the label
        prompt."""
        if self.mode != "labels":
            return raw_prompt
        return self.options.label_prompt.format(text=raw_prompt, labels=", ".join(self.label_words))

    def _encode(self, ds: Any, split: str) -> Encoded:
        if self.mode == "lm":
            out = encode_texts(self.tokenizer, list(ds["text"]), self.max_length)
        else:
            assert self.format is not None
            if self.mode == "labels":
                prompts = [self.prompt_text(t) for t in ds["text"]]
                responses = [self.label_words[y] for y in ds["label"]]
            else:
                prompts, responses = list(ds["prompt"]), list(ds["response"])
            out = encode_pairs(self.tokenizer, self.format, prompts, responses, self.max_length)
        if out.prompts_cut or out.responses_cut:
            log.warning(
                "%s split: %d of %d rows are longer than model.max_length=%d: %d prompts lost "
                "their end, %d responses were cut (raise model.max_length to keep them whole)",
                split,
                max(out.prompts_cut, out.responses_cut),
                len(ds),
                self.max_length,
                out.prompts_cut,
                out.responses_cut,
            )
        self.cut[f"{split}_prompts_cut"] = out.prompts_cut
        self.cut[f"{split}_responses_cut"] = out.responses_cut
        return out

    def encode_splits(self, raw: RawData) -> tuple[TensorData, TensorData]:
        from fedft.data.encode import TensorData

        out = []
        for split, ds in (("train", raw.train), ("test", raw.test)):
            enc = self._encode(ds, split)
            labels = torch.tensor(ds["label"], dtype=torch.long)
            features = {
                "input_ids": enc.input_ids,
                "attention_mask": enc.attention_mask,
                "target_ids": enc.target_ids,
            }
            out.append(TensorData(features, labels, lengths=enc.lengths, trim=True))
        return out[0], out[1]

    # --- the model's output and the loss ---------------------------------------------------------
    def logits(self, net: Any, inputs: dict[str, Any], batch: dict[str, torch.Tensor]) -> Any:
        """Next-token logits at the last k positions (`kept_positions`)."""
        keep = self.kept_positions(batch)
        kind = type(net)
        if kind not in self._accepts_keep:
            self._accepts_keep[kind] = "logits_to_keep" in inspect.signature(net.forward).parameters
        if self._accepts_keep[kind]:
            return net(**inputs, logits_to_keep=keep).logits
        return net(**inputs).logits[:, -keep:]

    @staticmethod
    def kept_positions(batch: dict[str, torch.Tensor]) -> int:
        """k, the last positions whose next-token logits predict every target of the batch (1
        without targets: a caller that only wants the last position)."""
        targets = batch.get("target_ids")
        if targets is None:
            return 1
        first = int(prompt_lengths(targets).min())
        return targets.shape[1] - max(first, 1) + 1

    def example_losses(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nll, mask = token_nll(output, batch["target_ids"])
        return (nll * mask).sum(1) / mask.sum(1).clamp_min(1)

    def error_norms(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """EL2N per example: the mean over its target tokens of ||softmax - onehot||_2."""
        targets = batch["target_ids"]
        kept = output.shape[1]
        shifted = targets[:, targets.shape[1] - kept + 1 :]
        probs = output[:, :-1].float().softmax(-1)
        mask = shifted != IGNORE
        onehot = F.one_hot(shifted.clamp_min(0), probs.shape[-1]).float()
        norms = (probs - onehot).norm(dim=-1)
        return (norms * mask).sum(1) / mask.sum(1).clamp_min(1)

    # --- scoring ---------------------------------------------------------------------------------
    def score_rows(
        self,
        model: torch.nn.Module,
        data: TensorData,
        rows: np.ndarray,
        batch_size: int,
        device: torch.device,
        generate: np.ndarray | None = None,
    ) -> RowScores:
        """Each row's summed target-token loss and its target tokens; under `labels`, whether its
        own label word is the likeliest; Rouge-L of its greedy generation where `generate` marks
        it (NaN elsewhere)."""
        nll_sum, tokens = np.zeros(len(rows)), np.zeros(len(rows), dtype=np.int64)
        for at, batch in self.scoring_positions(data, rows, batch_size, device):
            nll, mask = token_nll(model(batch), batch["target_ids"])
            nll_sum[at] = (nll * mask).sum(1).cpu().numpy()
            tokens[at] = mask.sum(1).cpu().numpy()
        out: RowScores = {"nll_sum": nll_sum, "tokens": tokens}
        if self.mode == "labels":
            out["correct"] = np.zeros(len(rows), dtype=bool)
            for at, batch in self.scoring_positions(data, rows, self.label_batch_size(batch_size)):
                scores = self.label_scores(model, batch, device)
                out["correct"][at] = (scores.argmax(1).cpu() == batch["labels"]).numpy()
        if generate is not None:
            out["rouge_l"] = np.full(len(rows), np.nan)
            picked = np.flatnonzero(generate)
            for at, batch in self.scoring_positions(data, rows[picked], batch_size):
                out["rouge_l"][picked[at]] = self.rouge_scores(model, batch, device)
        return out

    def summarize(self, scores: RowScores) -> dict[str, float]:
        n = len(scores["nll_sum"])
        if n == 0:
            return {"num_examples": 0, "loss": float("nan")}
        loss = float(scores["nll_sum"].sum() / max(int(scores["tokens"].sum()), 1))
        out: dict[str, float] = {
            "num_examples": n,
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
        }
        if "correct" in scores:
            out["accuracy"] = float(scores["correct"].sum() / n)
        if "rouge_l" in scores:
            scored = scores["rouge_l"][~np.isnan(scores["rouge_l"])]
            out["rouge_l"] = float(scored.mean()) if len(scored) else float("nan")
            out["generated"] = len(scored)
        return out

    def generation_mask(self, rows: np.ndarray, generations: int | None) -> np.ndarray | None:
        count = self.options.eval_generations if generations is None else generations
        if self.mode != "sft" or count <= 0:
            return None
        return np.isin(rows, self.generation_rows(rows, count))

    def generation_rows(self, rows: np.ndarray, count: int) -> np.ndarray:
        """A fixed, seeded subset of `rows`: the same rows every time the model is scored."""
        order = np.random.default_rng(self.seed).permutation(len(rows))[:count]
        return np.sort(rows[order])

    def scoring_batches(
        self,
        data: TensorData,
        rows: np.ndarray,
        batch_size: int,
        device: torch.device | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The rows in batches of similar length (less padding), in a fixed order; on `device`
        where one is given."""
        for _, batch in self.scoring_positions(data, rows, batch_size, device):
            yield batch

    def scoring_positions(
        self,
        data: TensorData,
        rows: np.ndarray,
        batch_size: int,
        device: torch.device | None = None,
    ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """`scoring_batches`, each with the positions in `rows` of its rows."""
        for at in data.length_batches(rows, batch_size):
            batch = data.batch(rows[at])
            yield at, batch if device is None else {k: v.to(device) for k, v in batch.items()}

    def label_batch_size(self, batch_size: int) -> int:
        """Rows a batch when each row is scored with every label word."""
        return max(1, batch_size // max(len(self.word_ids), 1))

    def label_candidates(
        self, batch: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Each row's prompt followed by each label word, targets on the word: K rows per row."""
        candidates = [(p, w) for p in _prompts(batch) for w in self.word_ids]
        return continuation_batch(candidates, pad_id(self.tokenizer), device)

    def label_scores(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        """[B, K]: log p(label word k | the row's prompt), summed over the word's tokens."""
        scored = self.label_candidates(batch, device)
        return self.word_log_likelihoods(model(scored), scored)

    def word_log_likelihoods(
        self, output: torch.Tensor, scored: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """[B, K] from the logits of `label_candidates`' rows."""
        nll, mask = token_nll(output, scored["target_ids"])
        return -(nll * mask).sum(1).view(-1, len(self.word_ids))

    def rouge_scores(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> list[float]:
        """Rouge-L F-measure (stemmed) of each row's greedy generation against its response."""
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = []
        for i, answer in enumerate(self.generate(model, _prompts(batch), device)):
            targets = batch["target_ids"][i]
            reference = self.tokenizer.decode(
                targets[targets != IGNORE], skip_special_tokens=True
            ).strip()
            scores.append(scorer.score(reference, answer)["rougeL"].fmeasure)
        return scores

    def generate(
        self, model: torch.nn.Module, prompts: list[list[int]], device: torch.device
    ) -> list[str]:
        """Greedy answers to prompts (token ids, each already in the frame), as text."""
        return [
            self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            for ids in self.continue_ids(model, prompts, device)
        ]

    def continue_ids(
        self, model: torch.nn.Module, prompts: list[list[int]], device: torch.device
    ) -> list[list[int]]:
        """Greedy continuations of prompts (token ids, each already in the frame), each up to
        and with its first stop token (the frame's end of turn, or end of text)."""
        if not prompts:
            return []
        pad = pad_id(self.tokenizer)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        stops = sorted({*([self.format.end[0]] if self.format else []), _eos(self.tokenizer)})
        new = model.generate(
            ids.to(device), mask.to(device), self.options.max_new_tokens, stops, pad
        )
        out = []
        for row in new.cpu().tolist():
            ends = [i for i, token in enumerate(row) if token in stops]
            out.append(row[: ends[0] + 1] if ends else row)
        return out

    def frame(self, prompt: str) -> list[int]:
        """A user's prompt as the token ids the model was tuned on (for `fedft generate`)."""
        content = self.tokenizer(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]
        if self.format is None:
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return self.format.prefix + list(content) + self.format.suffix


def _eos(tokenizer: Any) -> int:
    return int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else _eos(tokenizer))


def _prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's prompt tokens (everything before its first target)."""
    firsts = prompt_lengths(batch["target_ids"])
    return [batch["input_ids"][i, : int(f)].tolist() for i, f in enumerate(firsts)]


def continuation_batch(
    pairs: list[tuple[list[int], list[int]]], pad: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A right-padded batch of context + continuation, targets on the continuation; `pad`: the
    tokenizer's (`pad_id`)."""
    width = max(len(c) + len(t) for c, t in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, IGNORE)
    for i, (context, cont) in enumerate(pairs):
        seq = context + cont
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        targets[i, len(context) : len(seq)] = torch.tensor(cont)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "target_ids": targets.to(device),
    }
