"""`fedpft`: federated proxy fine-tuning on a compressed sub-model (after FedPFT, Peng et al. 2024).

The server (the model owner) keeps the full model. It builds a sub-model that keeps, in every
block but `keep_layers`, only the `keep` share of feed-forward neurons with the highest saliency,
distils it against the full model on public unlabeled inputs, and sends it to each client once.
Clients train `lora` (LoRA on attention + head) on the sub-model; the server averages it. Every
`realign_every` rounds clients also report how much they use each neuron, and the server re-distils
the least used ones against the full model carrying the current LoRA and sends only those slices.
Attention is never compressed, so the LoRA and head plug straight into the full model, which is
the model evaluated (the sub-model's accuracy is reported beside it).

`compression=layer_drop` is the baseline emulator of Offsite-Tuning: whole middle blocks dropped,
no distillation, no re-alignment.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, Field

from fedft.config import RunConfig
from fedft.data.public import PublicDataOptions
from fedft.errors import ConfigError
from fedft.federation.aggregation import Tensors
from fedft.federation.client import ClientContext
from fedft.federation.payload import Payload
from fedft.federation.server import Server
from fedft.methods import register
from fedft.methods.fedpft.activity import Measure, neuron_activity
from fedft.methods.fedpft.server import ACTIVITY, REALIGN, SUBMODEL, FedPftServer
from fedft.methods.fedpft.submodel import (
    Ffn,
    compress_ffns,
    drop_layers,
    find_ffns,
    layers_to_drop,
    resolve_layers,
    write_slices,
)
from fedft.methods.lora import LoraAdapters, LoraOptions
from fedft.models.backbone import TaskModel, load_like, resolve_device

HELD = "held."  # client state: the sub-model tensors this client was sent


class FedPftOptions(LoraOptions, PublicDataOptions):
    compression: Literal["ffn", "layer_drop"] = Field(
        "ffn", description="ffn: keep the most salient FFN neurons; layer_drop: drop whole blocks"
    )
    keep: float = Field(
        0.25,
        gt=0,
        le=1,
        description="ffn: share of FFN neurons kept per compressed block; layer_drop: share of "
        "the compressible blocks kept",
    )
    keep_layers: list[int] = Field(
        [0, -1], description="blocks never compressed (negative: from the end)"
    )
    distill_steps: int = Field(200, ge=0, description="layer-level distillation steps (0: none)")
    distill_lr: float = Field(1e-4, gt=0, description="Adam learning rate of distillation")
    distill_batch_size: int = Field(16, ge=1, description="distillation batch size")
    weight_product: float = Field(
        0.0, ge=0, description="weight of the FFN weight-product term in distillation (0: off)"
    )
    realign_every: int = Field(
        2, ge=0, description="re-align the least used neurons every this many rounds (0: never)"
    )
    realign_keep: float = Field(
        0.5, ge=0, lt=1, description="share of each layer's most used neurons re-alignment keeps"
    )
    realign_steps: int = Field(50, ge=1, description="distillation steps of one re-alignment")
    activity: Measure = Field(
        "mean_abs",
        description="neuron use: mean_abs (mean |activation|) or nonpositive (1 - share of "
        "pre-activations <= 0)",
    )
    activity_rows: int = Field(256, ge=1, description="client rows scored for neuron activity")


@register
class FedPft(LoraAdapters):
    name = "fedpft"
    summary = "proxy fine-tuning: LoRA on a distilled sub-model with fewer FFN neurons"
    options_model = FedPftOptions
    default_lr = 1e-3
    zero_shot_head_under_dp = False  # a start, or a model, of its own

    def __init__(self, options: BaseModel | None = None):
        super().__init__(options)
        self.ffns: list[Ffn] = []
        self.client_model: TaskModel | None = None  # what the server's full model copies

    def check_run(self, cfg: RunConfig) -> None:
        o = self.options
        if o.compression == "layer_drop" and (o.distill_steps or o.realign_every):
            raise ConfigError(
                "method 'fedpft': compression=layer_drop is the plain emulator, without "
                "distillation; set method.distill_steps=0 and method.realign_every=0"
            )
        if cfg.privacy.mode != "none" and o.realign_every:
            raise ConfigError(
                f"privacy.mode={cfg.privacy.mode}: fedpft's neuron activity reports are not "
                "privatised; set method.realign_every=0 to train under DP"
            )

    # --- the sub-model ------------------------------------------------------------------------
    def compressed_layers(self, model: TaskModel) -> list[int]:
        count = len(model.blocks())
        kept = resolve_layers(self.options.keep_layers, count, "method.keep_layers")
        return [layer for layer in range(count) if layer not in kept]

    def compress(self, model: TaskModel) -> list[Ffn]:
        """Turn a full model (LoRA attached) into the sub-model; the same on client and server."""
        layers = self.compressed_layers(model)
        if self.options.compression == "layer_drop":
            drop_layers(model, layers_to_drop(layers, self.options.keep))
            return []
        ffns = find_ffns(model, layers)
        compress_ffns(model, ffns, self.options.keep)
        return ffns

    def attach(self, model: TaskModel) -> None:
        LoraAdapters(LoraOptions.part_of(self.options)).attach(model)
        self.client_model = model
        self.ffns = self.compress(model)

    # --- client -------------------------------------------------------------------------------
    def receive_submodel(self, ctx: ClientContext, payload: Payload) -> Payload:
        """Install what the server sent (the whole sub-model, or re-aligned slices) on top of what
        the client holds; returns the rest of the payload.

        The client's held copy lives in its state as the model's own tensors: on the local engine
        every client shares the model, so that costs nothing; Flower keeps the state with the node
        and the next process puts it back into its fresh model."""
        params = dict(ctx.model.named_parameters())
        whole = {
            k[len(SUBMODEL) :]: v for k, v in payload.tensors.items() if k.startswith(SUBMODEL)
        }
        if whole:
            for key in [k for k in ctx.state if k.startswith(HELD)]:
                del ctx.state[key]
            for name, value in whole.items():
                ctx.state[HELD + name] = value
        elif "submodel_version" not in ctx.state:
            raise ValueError("this client holds no sub-model; the server sends it whole next time")
        for key in [k for k in ctx.state if k.startswith(HELD)]:
            name = key[len(HELD) :]
            if ctx.state[key] is not params[name]:
                params[name].data.copy_(ctx.state[key])
                ctx.state[key] = params[name]
        for ffn in self.ffns:
            prefix = f"{REALIGN}{ffn.layer}."
            if prefix + "index" in payload.tensors:
                slices = {
                    k[len(prefix) :]: v for k, v in payload.tensors.items() if k.startswith(prefix)
                }
                write_slices(ctx.model, ffn, slices.pop("index").long(), slices)
        ctx.state["submodel_version"] = int(payload.scalars["submodel_version"])
        rest = {k: v for k, v in payload.tensors.items() if not k.startswith((SUBMODEL, REALIGN))}
        return Payload(rest, payload.scalars)

    def client_states_loaded(self, states: dict[int, dict[str, Any]], model: TaskModel) -> None:
        """On the local engine every client's held copy is the model's own tensors: put the
        checkpointed copy back into the model and let the states refer to it again (one copy,
        as before the restart). A tensor held by clients that disagree stays in their states;
        `receive_submodel` installs it when that client is next asked."""
        params = dict(model.named_parameters())
        held: dict[str, list[dict[str, Any]]] = {}
        for state in states.values():
            for key in (k for k in state if k.startswith(HELD)):
                held.setdefault(key, []).append(state)
        for key, holders in held.items():
            value = holders[0][key]
            if any(state[key] is not value for state in holders):
                continue
            param = params[key[len(HELD) :]]
            param.data.copy_(value)
            for state in holders:
                state[key] = param

    def client_train(self, ctx: ClientContext, payload: Payload) -> Payload:
        reply = super().client_train(ctx, self.receive_submodel(ctx, payload))
        reply.scalars["submodel_version"] = ctx.state["submodel_version"]
        if payload.scalars.get("collect_activity"):
            rows = ctx.train_rows[: self.options.activity_rows]
            activity, tokens = neuron_activity(
                ctx.model, self.ffns, ctx.data.train, rows, ctx.cfg.train.batch_size * 4,
                self.options.activity, ctx.device,
            )  # fmt: skip
            reply.tensors.update({f"{ACTIVITY}{k}": v for k, v in activity.items()})
            reply.scalars["activity_tokens"] = tokens
        return reply

    def client_evaluate(self, ctx: ClientContext, payload: Payload) -> Payload:
        return super().client_evaluate(ctx, self.receive_submodel(ctx, payload))

    # --- server -------------------------------------------------------------------------------
    def make_server(self, cfg: RunConfig, initial: Tensors) -> Server:
        """The full model (with LoRA, so the learned LoRA plugs in) and a sub-model made from it
        the same way the clients' is; the public inputs if distillation is on."""
        assert self.client_model is not None, "prepare() the model first"
        full = load_like(self.client_model, cfg)
        LoraAdapters(LoraOptions.part_of(self.options)).attach(full)
        sub = copy.deepcopy(full)
        ffns = self.compress(sub)
        device = resolve_device(cfg.device)
        for model in (full, sub):
            for param in model.parameters():
                param.requires_grad_(False)
            model.to(device)
        o = self.options
        public = None
        if ffns and (o.distill_steps or o.realign_every):
            generation = cfg.task if full.generative else None
            public = o.load_public(full.preprocess, cfg.data, cfg.seed, generation)
        return FedPftServer(cfg, initial, full, sub, ffns, public, o, device)
