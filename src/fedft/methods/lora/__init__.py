"""`lora`: low-rank adapters on the attention projections (through peft), plus the head; the
server combines the factors by `method.aggregation` (see `aggregation`), for clients of one rank
or of several."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from fedft.config import RunConfig
from fedft.errors import ConfigError, ModelError
from fedft.federation.aggregation import Tensors
from fedft.federation.client import ClientContext
from fedft.federation.payload import Payload
from fedft.federation.server import Server
from fedft.methods import register
from fedft.methods.base import Method
from fedft.methods.lora.aggregation import RESIDUAL, lora_pairs, pad, truncate
from fedft.methods.lora.server import LoraServer, rank_of
from fedft.models.backbone import HEAD_MODULE_NAMES, TaskModel

# Query/value projection names per model family, tried in order when target_modules is not given.
DEFAULT_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("c_attn",))


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="module names to adapt (None: the model's query/value projections; "
        "'all-linear': every linear layer but the output head)",
    )

    @classmethod
    def part_of(cls, options: BaseModel) -> LoraOptions:
        """The LoRA options inside a method's larger options (methods that reuse `lora`)."""
        return cls(**{k: getattr(options, k) for k in cls.model_fields})


def _leaf_names(net: nn.Module) -> set[str]:
    return {
        name.split(".")[-1]
        for name, module in net.named_modules()
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    }


def _module_names(net: nn.Module) -> set[str]:
    return {name.split(".")[-1] for name, _ in net.named_modules()}


class LoraAggregationOptions(LoraOptions):
    aggregation: Literal["mean", "exact"] = Field(
        "mean",
        description="how the server combines the factors: 'mean' averages A and B apart (FedAvg; "
        "inexact: mean(B)·mean(A) is not mean(B·A)); 'exact' keeps the means and moves what they "
        "miss into a dense residual on each adapted weight, so the global model is the clients' "
        "weighted mean (FedEx-LoRA; the residual goes down to every client, d_out x d_in floats "
        "per adapted module)",
    )
    client_ranks: list[int] | None = Field(
        None,
        description="LoRA ranks by client id, cyclically (client c trains rank "
        "client_ranks[c mod len]); each at most method.r, the global rank. None: every client "
        "trains method.r",
    )

    @model_validator(mode="after")
    def _ranks_fit(self) -> LoraAggregationOptions:
        ranks = self.client_ranks
        if ranks is not None and (not ranks or min(ranks) < 1 or max(ranks) > self.r):
            raise ValueError(
                f"client_ranks={ranks}: give ranks from 1 to method.r={self.r} (the global "
                "adapter has the largest rank; raise method.r for larger ones)"
            )
        return self


class LoraAdapters(Method):
    """LoRA modules on a model, for the methods that train them (`lora`, `fedpt`, `fedpft`)."""

    options_model = LoraOptions
    default_lr = 1e-3

    def attach(self, model: TaskModel) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        leaves = _leaf_names(model.net)
        targets = self.options.target_modules
        if targets == "all-linear":
            pass  # peft finds them (and leaves the output layer alone)
        elif targets is None:
            targets = next((list(t) for t in DEFAULT_TARGETS if set(t) <= leaves), None)
            if targets is None:
                raise ModelError(
                    f"method 'lora': no query/value projections found in {model.source}; set method.target_modules"
                )
        missing = [t for t in targets if t not in leaves] if targets != "all-linear" else []
        if missing:
            raise ModelError(
                f"method 'lora': {model.source} has no linear modules named {missing}; its linear layers are {sorted(leaves)[:12]}"
            )
        config = LoraConfig(
            r=self.options.r,
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            target_modules=targets,
            # the task head trains whole; a causal LM has none (peft keeps its LM head out)
            exclude_modules=[n for n in HEAD_MODULE_NAMES if n in _module_names(model.net)] or None,
        )
        inject_adapter_in_model(config, model.net)

    def select_trainable(self, model: TaskModel) -> list[str]:
        return self.plus_head(model, lambda n: ".lora_" in n)


def _add_residual(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + F.linear(args[0], getattr(module, RESIDUAL))


def attach_residuals(net: nn.Module) -> None:
    """A frozen dense residual R (d_out x d_in, zero) beside each LoRA module, added to its output
    (x·Rᵀ), so the module computes W0 + R + s·B·A. A parameter, so that it moves, saves and loads
    by name like the factors; never trained."""
    for module in net.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or not lora_a:
            continue
        weight = next(iter(lora_a.values())).weight
        residual = torch.zeros(module.out_features, module.in_features, dtype=weight.dtype)
        module.register_parameter(RESIDUAL, nn.Parameter(residual, requires_grad=False))
        module.register_forward_hook(_add_residual)


@register
class Lora(LoraAdapters):
    name = "lora"
    summary = "PEFT: LoRA on attention (peft) + head"
    options_model = LoraAggregationOptions

    def check_run(self, cfg: RunConfig) -> None:
        o = self.options
        if o.client_ranks and cfg.privacy.mode != "none":
            raise ConfigError(
                f"method.client_ranks with privacy.mode={cfg.privacy.mode}: DP noise would fill a "
                "small client's empty slots, and client-level DP's clipped mean has no "
                "per-slot form; use one rank under DP"
            )
        if o.aggregation == "exact" and cfg.privacy.mode == "client":
            raise ConfigError(
                "method.aggregation=exact with privacy.mode=client: the residual is computed "
                "from each client's own factors, outside the mechanism that noises their mean; "
                "use method.aggregation=mean (under sample-level DP, exact is post-processing "
                "of what the clients released, and is allowed)"
            )
        fed = cfg.federation
        if o.aggregation == "exact" and (fed.server_optimizer != "fedavg" or fed.server_lr != 1):
            raise ConfigError(
                "method.aggregation=exact makes the global model the clients' weighted mean; "
                "it needs federation.server_optimizer=fedavg with federation.server_lr=1"
            )

    def attach(self, model: TaskModel) -> None:
        super().attach(model)
        if self.options.aggregation == "exact":
            attach_residuals(model.net)

    def client_rank(self, client: int) -> int:
        return rank_of(self.options.client_ranks, self.options.r, client)

    def client_start(self, ctx: ClientContext, tensors: Tensors) -> Tensors:
        """A client of a smaller rank is sent its slots only; the model's other slots are zero."""
        if not self.options.client_ranks:
            return tensors
        out = dict(tensors)
        for pair in lora_pairs(tensors):
            out[pair.a], out[pair.b] = pad(tensors[pair.a], tensors[pair.b], self.options.r)
        return out

    def client_result(self, ctx: ClientContext, tensors: Tensors) -> Tensors:
        """Only the client's own slots go back (the others stayed zero)."""
        if not self.options.client_ranks:
            return tensors
        rank, out = self.client_rank(ctx.client), dict(tensors)
        for pair in lora_pairs(tensors):
            out[pair.a], out[pair.b] = truncate(tensors[pair.a], tensors[pair.b], rank)
        return out

    def client_train_batch(
        self, ctxs: list[ClientContext], payloads: list[Payload]
    ) -> list[Payload] | None:
        if self.options.aggregation == "exact" or self.options.client_ranks:
            return None  # a residual, or a rank, per client: they train one after another
        return super().client_train_batch(ctxs, payloads)

    def make_server(self, cfg: RunConfig, initial: Tensors) -> Server:
        o = self.options
        return LoraServer(
            cfg,
            initial,
            rank=o.r,
            scale=o.alpha / o.r,
            exact=o.aggregation == "exact",
            client_ranks=o.client_ranks,
        )
