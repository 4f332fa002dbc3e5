"""`fedpt`: federated proxy-tuning of a black-box large model (proxy-tuning: Liu et al. 2024;
FedPT's server-side distillation).

Clients tune a small model (`lora`: LoRA on attention + the head) that shares the large model's
output space; the server averages it and serves the large model steered by it,
`large + α·(small tuned − small untuned)`, and may distil that back into the small model before
the next round. The large model answers only with logits (a local model, or `method.large_url`);
its weights never move and clients never see it.

Classification pairs score over the run's labels. An encoder without a trained head gets a
zero-shot head (cosine similarity of the mean-pooled embedding to each label name's embedding),
on the small model too; by default the small model is the first `small_layers` blocks of the same
checkpoint. Causal LMs proxy-tune generation through `proxy.proxy_generate`.
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import BaseModel, Field

from fedft.config import RunConfig
from fedft.data.public import PublicDataOptions
from fedft.errors import ModelError
from fedft.federation.aggregation import Tensors
from fedft.federation.server import Server
from fedft.methods import register
from fedft.methods.fedpt.logits import (
    CountingCache,
    HttpLogitsSource,
    LocalModelSource,
    LogitsSource,
    OutputSpace,
    check_same_space,
)
from fedft.methods.fedpt.server import FedPtServer
from fedft.methods.lora import Lora, LoraOptions
from fedft.models.backbone import TaskModel, load_task_model, resolve_device
from fedft.models.zero_shot import keep_first_blocks, make_zero_shot


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
    small_layers: int | None = Field(
        2, ge=1, description="the small model: the first this many blocks of model.name (None: all)"
    )
    label_template: str = Field("{}", description="text embedded for each label name ({} = name)")
    zero_shot_scale: float = Field(20.0, gt=0, description="cosine-similarity logit scale")
    alpha: float = Field(1.0, ge=0, description="steering strength α")
    distill_steps: int = Field(
        100, ge=0, description="server-side distillation steps per round (0: none)"
    )
    distill_lr: float = Field(1e-3, gt=0, description="Adam learning rate of distillation")
    distill_batch_size: int = Field(32, ge=1, description="distillation batch size")
    temperature: float = Field(2.0, gt=0, description="distillation temperature T")


@register
class FedPt(Lora):
    name = "fedpt"
    summary = "proxy-tuning: a small LoRA model steers a black-box large model's logits"
    options_model = FedPtOptions
    default_lr = 1e-3
    # Client-level DP covers what clients send; the server's distillation reads only public data.
    # Sample-level DP-SGD is not offered: Opacus has no per-example rule for the zero-shot head.
    privacy_modes = ("client",)

    def __init__(self, options: BaseModel | None = None):
        super().__init__(options)
        self.label_names: list[str] = []

    def small_model(self, model: TaskModel) -> None:
        """Make `model` the small model: its first blocks, then the head, then LoRA."""
        o = self.options
        if o.small_layers is not None:
            keep_first_blocks(model, o.small_layers)
        if o.large_head == "zero_shot":
            make_zero_shot(model, o.label_template, o.zero_shot_scale)
        Lora(LoraOptions.part_of(o)).attach(model)

    def attach(self, model: TaskModel) -> None:
        if model.kind != "text":
            raise ModelError("method 'fedpt' serves text models (the large model answers text)")
        if model.generative:
            raise ModelError(
                "method 'fedpt': federated rounds proxy-tune classification; a causal LM is "
                "proxy-tuned for generation with fedft.methods.fedpt.proxy.proxy_generate "
                "(give task.kind=classify to tune a causal LM's classification head instead)"
            )
        self.label_names = list(model.label_names)
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

    def make_server(self, cfg: RunConfig, initial: Tensors) -> Server:
        """The large model behind a counting cache, refused unless it shares the small model's
        labels; a server copy of the small model (to score and distil) and an untuned one."""
        large = CountingCache(self.large_source(cfg))
        check_same_space(large.space, OutputSpace("labels", tuple(self.label_names)))
        small = load_task_model(
            cfg.model.name, len(self.label_names), cfg.model.max_length, cfg.seed
        )
        small.label_names = list(self.label_names)
        self.small_model(small)
        device = resolve_device(cfg.device)
        small.to(device)
        for param in small.parameters():
            param.requires_grad_(False)
        untuned = copy.deepcopy(small)
        o = self.options
        public = None
        if o.distill_steps > 0:
            public = o.load_public(small.preprocess, cfg.data, cfg.seed)
        return FedPtServer(cfg, initial, large, small, untuned, public, o, device)
