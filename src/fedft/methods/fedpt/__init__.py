"""`fedpt`: federated proxy-tuning of a black-box large model (proxy-tuning: Liu et al. 2024;
FedPT's server-side distillation).

Clients tune a small model (`lora`: LoRA on attention, plus the head of a classifier) that shares
the large model's output space; the server averages it and serves the large model steered by it,
`large + α·(small tuned − small untuned)`, and may distil that back into the small model before
the next round. The large model answers only with logits (a local model, or `method.large_url`);
its weights never move and clients never see it. α is chosen each round on the server's
validation rows (`data.server_rows`, held by no client) unless given.

Two kinds of pair:
- classifiers score over the run's labels. An encoder without a trained head gets a zero-shot
  head (cosine similarity of the mean-pooled embedding to each label name's embedding), on the
  small model too.
- causal LMs (`task.kind=generate`) score over one shared vocabulary: the proxy decodes token by
  token (greedy, or sampled with `proxy_generate`) and scores label words, response loss and
  Rouge-L like any generative model.
By default the small model is the first blocks of the same checkpoint (`small_layers`).
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import BaseModel, Field

from fedft.config import RunConfig
from fedft.data.public import PublicDataOptions
from fedft.errors import ConfigError, ModelError
from fedft.federation.aggregation import Tensors
from fedft.federation.server import Server
from fedft.methods import register
from fedft.methods.fedpt.logits import (
    CountingCache,
    HttpLogitsSource,
    LocalCausalLM,
    LocalModelSource,
    LogitsSource,
    OutputSpace,
    QueryCounter,
    SequenceLogitsSource,
    check_same_space,
    vocabulary_space,
)
from fedft.methods.fedpt.server import CausalFedPtServer, FedPtServer
from fedft.methods.lora import LoraAdapters, LoraOptions
from fedft.models.backbone import TaskModel, load_task_model, resolve_device
from fedft.models.causal import load_causal_lm
from fedft.models.zero_shot import keep_blocks, keep_first_blocks, make_zero_shot
from fedft.tasks.base import Task


class FedPtOptions(LoraOptions, PublicDataOptions):
    large: str | None = Field(
        None, description="the large model (like model.name; None: model.name, all its blocks)"
    )
    large_url: str | None = Field(
        None, description="a served large model (GET /info, POST /logits) instead of `large`"
    )
    large_head: Literal["zero_shot", "own"] = Field(
        "zero_shot",
        description="zero_shot: label-name similarity; own: the large model's trained classifier",
    )
    small_layers: int | list[int] | Literal["auto"] | None = Field(
        "auto",
        description="the small model: the first this many blocks of model.name, or the blocks "
        "at these indices (auto: a third of the blocks; a causal LM's first ones and its last "
        "three, which keep its output closest to the whole model's; None: all)",
    )
    label_template: str = Field("{}", description="text embedded for each label name ({} = name)")
    zero_shot_scale: float = Field(20.0, gt=0, description="cosine-similarity logit scale")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = it / r)")
    alpha: float | Literal["auto"] = Field(  # type: ignore[assignment]  (LoRA's: lora_alpha)
        "auto",
        description="steering strength α (auto: the best of alpha_grid on the server's "
        "validation rows, chosen each round)",
    )
    alpha_grid: list[float] = Field(
        [0.0, 0.25, 0.5, 1.0, 1.5, 2.0], min_length=1, description="the α tried by alpha=auto"
    )
    distill_steps: int | None = Field(
        None,
        ge=0,
        description="server-side distillation steps per round (0: none; None: 100 for a "
        "classifier, none for a causal LM, where it did not help: docs/benchmarks.md)",
    )
    distill_lr: float = Field(1e-3, gt=0, description="Adam learning rate of distillation")
    distill_batch_size: int = Field(32, ge=1, description="distillation batch size")
    temperature: float = Field(2.0, gt=0, description="distillation temperature T")


@register
class FedPt(LoraAdapters):
    name = "fedpt"
    summary = "proxy-tuning: a small LoRA model steers a black-box large model's logits"
    options_model = FedPtOptions
    default_lr = 1e-3
    # Client-level DP covers what clients send; sample-level DP-SGD the clients' steps (the
    # zero-shot head has its per-example rule in privacy.dp_sgd). The server's alpha and its
    # distillation read only its own validation rows and public data.
    privacy_modes = ("sample", "client")
    zero_shot_head_under_dp = False  # a start, or a model, of its own

    # rows of the training split the server keeps to choose α (data.server_rows overrides)
    validation_rows = 200

    def __init__(self, options: BaseModel | None = None):
        super().__init__(options)
        self.label_names: list[str] = []
        self.task: Task | None = None  # the run's task, for the server's copies of the model

    @property
    def distill_steps(self) -> int:
        steps = self.options.distill_steps
        if steps is None:
            return 0 if self.task is not None and self.task.name == "generate" else 100
        return steps

    def server_rows_wanted(self) -> int:
        return self.validation_rows if self.options.alpha == "auto" else 0

    def check_run(self, cfg: RunConfig) -> None:
        if self.options.alpha == "auto" and cfg.data.server_rows == 0:
            raise ConfigError(
                "method.alpha=auto chooses α on the server's validation rows, but "
                "data.server_rows=0; set data.server_rows (e.g. 200) or give method.alpha a number"
            )

    def small_model(self, model: TaskModel) -> None:
        """Make `model` the small model: its first blocks, then (a classifier) the head, then
        LoRA."""
        o = self.options
        if isinstance(o.small_layers, list):
            keep_blocks(model, o.small_layers)
        elif o.small_layers == "auto":
            total = len(model.blocks())
            count = max(1, round(total / 3))
            if model.generative and count > 3:
                keep_blocks(model, [*range(count - 3), *range(total - 3, total)])
            else:
                keep_first_blocks(model, count)
        elif o.small_layers is not None:
            keep_first_blocks(model, o.small_layers)
        if not model.generative and o.large_head == "zero_shot":
            make_zero_shot(model, o.label_template, o.zero_shot_scale)
        lora = LoraOptions(
            r=o.r, alpha=o.lora_alpha, dropout=o.dropout, target_modules=o.target_modules
        )
        LoraAdapters(lora).attach(model)

    def attach(self, model: TaskModel) -> None:
        if model.kind != "text":
            raise ModelError("method 'fedpt' serves text models (the large model answers text)")
        self.label_names = list(model.label_names)
        self.task = model.task
        self.small_model(model)

    # --- server -------------------------------------------------------------------------------
    def large_source(self, cfg: RunConfig) -> LogitsSource:
        o = self.options
        if o.large_url:
            return HttpLogitsSource(o.large_url)
        name = o.large or cfg.model.name
        if o.large_head == "own":
            large = load_task_model(name, None, cfg.model.max_length, cfg.seed)
            labels = large.net.config.id2label
            large.label_names = [str(labels[i]) for i in range(len(labels))]
        else:
            large = load_task_model(name, len(self.label_names), cfg.model.max_length, cfg.seed)
            large.label_names = list(self.label_names)
            make_zero_shot(large, o.label_template, o.zero_shot_scale)
        device = resolve_device(cfg.device)
        return LocalModelSource(large.to(device), device)

    def causal_large_source(self, cfg: RunConfig) -> SequenceLogitsSource:
        o = self.options
        if o.large_url:
            source = HttpLogitsSource(o.large_url)
            if source.space.kind != "tokens":
                raise ModelError(
                    f"method.large_url: {o.large_url} answers over {source.space.describe()}; a "
                    "causal LM pair needs a served causal LM (POST /sequence_logits)"
                )
            return source
        net, tokenizer = load_causal_lm(o.large or cfg.model.name, cfg.model.max_length)
        for param in net.parameters():
            param.requires_grad_(False)
        return LocalCausalLM(net.eval().to(resolve_device(cfg.device)), tokenizer)

    def server_small_model(self, cfg: RunConfig) -> TaskModel:
        """A copy of the clients' small model for the server (frozen: only distillation, when
        on, trains it)."""
        small = load_task_model(
            cfg.model.name, len(self.label_names), cfg.model.max_length, cfg.seed, task=self.task
        )
        small.label_names = list(self.label_names)
        self.small_model(small)
        small.to(resolve_device(cfg.device))
        for param in small.parameters():
            param.requires_grad_(False)
        return small

    def make_server(self, cfg: RunConfig, initial: Tensors) -> Server:
        """The large model behind a counter (a classifier: a counting cache), refused unless it
        shares the small model's output space; a server copy of the small model (to score and
        distil) and an untuned one."""
        o = self.options
        small = self.server_small_model(cfg)
        untuned = copy.deepcopy(small)
        device = resolve_device(cfg.device)
        steps = self.distill_steps
        if small.generative:
            large = QueryCounter(self.causal_large_source(cfg))
            check_same_space(
                large.space,
                vocabulary_space(small.preprocess.tokenizer, int(small.net.config.vocab_size)),
            )
            texts = o.load_public_texts(cfg.data, cfg.seed, cfg.task) if steps > 0 else None
            return CausalFedPtServer(
                cfg, initial, large, small, untuned, texts, o, device, self.validation, steps
            )
        large = CountingCache(self.large_source(cfg))
        check_same_space(large.space, OutputSpace("labels", tuple(self.label_names)))
        public = o.load_public(small.preprocess, cfg.data, cfg.seed) if steps > 0 else None
        return FedPtServer(
            cfg, initial, large, small, untuned, public, o, device, self.validation, steps
        )
