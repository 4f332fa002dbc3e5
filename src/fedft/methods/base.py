"""The method plug-in contract.

A method decides what trains (`attach` adds modules, `select_trainable` names the parameters),
what a client does for each request kind (`client_handlers`), and what the server does each round
(`make_server`). The defaults give the common FedPEFT shape: local backprop on the trainable
tensors and a weighted mean on the server. Method code never imports an engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fedft.config import RunConfig
from fedft.data.encode import TensorData
from fedft.errors import ConfigError, ModelError
from fedft.federation.aggregation import Tensors, same_tensors
from fedft.federation.batched import batchable, train_batched
from fedft.federation.client import ClientContext, Handler
from fedft.federation.payload import Payload
from fedft.federation.server import FedAvgServer, Server
from fedft.federation.training import (
    evaluate,
    local_steps,
    read_state,
    task_of,
    train_locally,
    write_state,
)
from fedft.models.backbone import TaskModel
from fedft.privacy.dp_sgd import dp_scalars, train_privately


def _floats(tree: Any, prefix: str = "") -> list[tuple[str, float]]:
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in _floats(v, f"{prefix}{k}.")]
    if isinstance(tree, list | tuple):
        return [x for i, v in enumerate(tree) for x in _floats(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), tree)] if isinstance(tree, float) else []


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options_model: ClassVar[type[BaseModel]] = NoOptions
    default_lr: ClassVar[float] = 1e-3
    # the default lr where the head starts from the label names (`model.head=zero_shot`), for a
    # method whose default is sized to learn a random head and moves a cosine head too far
    zero_shot_lr: ClassVar[float | None] = None
    # `model.head=auto` takes the zero-shot head under sample-level DP for a text encoder (the
    # DP recipe); a method with a start of its own (zo, fedpt) or its own model split keeps it
    zero_shot_head_under_dp: ClassVar[bool] = True
    # under sample-level DP-SGD with AdamW and no train.lr, the default lr times this (the DP recipe:
    # AdamW's step is about lr a coordinate whatever the gradient, and DP's noise leaves the
    # signal a fraction of it); `full` keeps 1 (its noise is over every weight)
    dp_lr_scale: ClassVar[float] = 5.0
    # the `privacy.mode`s the method implements; the default client and server give both
    privacy_modes: ClassVar[tuple[str, ...]] = ("sample", "client")

    def __init__(self, options: BaseModel | None = None):
        self.options = options if options is not None else self.options_model()
        self.trainable_names: list[str] = []

    @classmethod
    def validate_options(cls, raw: dict[str, Any]) -> dict[str, Any]:
        try:
            options = cls.options_model(**raw).model_dump()
        except ValidationError as exc:
            problems = []
            allowed = ", ".join(cls.options_model.model_fields) or "none"
            for item in exc.errors():
                where = "method." + ".".join(str(p) for p in item["loc"])
                if item["type"] == "extra_forbidden":
                    problems.append(
                        f"{where}: not an option of method '{cls.name}' (its options: {allowed})"
                    )
                else:
                    problems.append(f"{where}: {item['msg']} (got {item.get('input')!r})")
            raise ConfigError("; ".join(problems)) from None
        bad = [k for k, v in _floats(options) if not math.isfinite(v)]
        if bad:
            raise ConfigError(f"method.{bad[0]}: must be a finite number")
        return options

    # the server's validation rows (`data.server_rows`), set when the run's data is built
    validation: TensorData | None = None

    def server_rows_wanted(self) -> int:
        """Training rows the method's server needs as a validation split when `data.server_rows`
        is not given. Default: none."""
        return 0

    def check_run(self, cfg: RunConfig) -> None:
        """Refuse, before anything runs, a run config the method cannot serve. Default: any."""

    # --- what trains -------------------------------------------------------------------------
    def attach(self, model: TaskModel) -> None:
        """Add the method's own modules to the model (adapters, prompts, LoRA). Default: none."""

    def select_trainable(self, model: TaskModel) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def plus_head(model: TaskModel, own: Callable[[str], bool]) -> list[str]:
        """The method's own parameters (those `own` accepts) and the task head, in model order."""
        head = set(model.head_parameter_names())
        return [n for n, _ in model.named_parameters() if own(n) or n in head]

    def prepare(self, model: TaskModel) -> list[str]:
        """Attach, then freeze everything but the method's parameters; returns their names."""
        self.attach(model)
        names = self.select_trainable(model)
        if not names:
            raise ModelError(
                f"method '{self.name}' found nothing to train in model '{model.source}'"
            )
        wanted = set(names)
        for pname, param in model.named_parameters():
            param.requires_grad_(pname in wanted)
        self.trainable_names = [n for n, _ in model.named_parameters() if n in wanted]
        return self.trainable_names

    def lr(self, cfg: RunConfig) -> float:
        if cfg.train.lr is not None:
            return cfg.train.lr
        zero_shot = cfg.model.head == "zero_shot" and self.zero_shot_lr is not None
        base = self.zero_shot_lr if zero_shot else self.default_lr
        recipe = cfg.privacy.mode == "sample" and cfg.train.optimizer == "adamw"
        return base * (self.dp_lr_scale if recipe else 1.0)

    def choices(self) -> dict[str, Any]:
        """What the method's `auto` options resolved to for this run's model and privacy, once
        prepared (summary.json keeps them beside the config, which says only `auto`)."""
        return {}

    # --- client side ---------------------------------------------------------------------------
    def client_handlers(self) -> dict[str, Handler]:
        return {"train": self.client_train, "evaluate": self.client_evaluate}

    def client_start(self, ctx: ClientContext, tensors: Tensors) -> Tensors:
        """The tensors a client writes into its model from a train request. Default: as sent."""
        return tensors

    def client_result(self, ctx: ClientContext, tensors: Tensors) -> Tensors:
        """What a client sends back of its trained tensors. Default: all of them."""
        return tensors

    def client_train(self, ctx: ClientContext, payload: Payload) -> Payload:
        """Local backprop on the trainable tensors; DP-SGD under `privacy.mode=sample`."""
        write_state(ctx.model, self.client_start(ctx, payload.tensors))
        args = (ctx.model, ctx.trainable, ctx.data.train, ctx.train_rows)
        if ctx.cfg.privacy.mode == "sample":
            stats, plan = train_privately(*args, ctx.cfg, self.lr(ctx.cfg), ctx.seed, ctx.device)
            scalars = {"num_examples": stats.num_examples, "steps": stats.steps}
            scalars.update(dp_scalars(plan, stats.steps))
        else:
            stats = train_locally(*args, ctx.cfg.train, self.lr(ctx.cfg), ctx.seed, ctx.device)
            scalars = {"num_examples": stats.num_examples, "steps": stats.steps}
            # under DP the loss stays home: no mechanism noises it
            if ctx.cfg.privacy.mode == "none":
                scalars["train_loss"] = stats.mean_loss
        return Payload(self.client_result(ctx, read_state(ctx.model, ctx.trainable)), scalars)

    def client_train_batch(
        self, ctxs: list[ClientContext], payloads: list[Payload]
    ) -> list[Payload] | None:
        """`client_train` of several clients in one forward pass a step
        (`federation.batch_clients`), each example through its own client's tensors; None where
        that does not apply (DP, a method with its own client round, a trained tensor outside a
        Linear), and the clients then train one after another. Clients that take different
        numbers of steps train in separate groups."""
        first = ctxs[0]
        own_round = type(self).client_train is not Method.client_train
        if own_round or first.cfg.privacy.mode != "none":
            return None
        if not batchable(first.model, first.trainable):
            return None
        out: list[Payload | None] = [None] * len(ctxs)
        groups: dict[int, list[int]] = {}
        for i, ctx in enumerate(ctxs):
            groups.setdefault(local_steps(ctx.cfg.train, len(ctx.train_rows)), []).append(i)
        for members in groups.values():
            trained, stats = train_batched(
                first.model,
                first.trainable,
                first.data.train,
                [ctxs[i].train_rows for i in members],
                [payloads[i].tensors for i in members],
                first.cfg.train,
                self.lr(first.cfg),
                [ctxs[i].seed for i in members],
                first.device,
            )
            for i, tensors, s in zip(members, trained, stats, strict=True):
                scalars = {
                    "num_examples": s.num_examples,
                    "steps": s.steps,
                    "train_loss": s.mean_loss,
                }
                out[i] = Payload(tensors, scalars)
        return [p for p in out if p is not None]

    def client_evaluate(self, ctx: ClientContext, payload: Payload) -> Payload:
        write_state(ctx.model, payload.tensors)
        stats = evaluate(
            ctx.model,
            ctx.data.train,
            ctx.test_rows,
            ctx.cfg.train.batch_size * 4,
            ctx.device,
            generations=ctx.cfg.task.client_eval_generations,
        )
        return Payload({}, {"num_examples": stats.num_examples, **stats.metrics})

    def client_evaluate_batch(
        self, ctxs: list[ClientContext], payloads: list[Payload]
    ) -> list[Payload] | None:
        """`client_evaluate` of several clients with one pass over all their test rows, where
        they score the same tensors (the global model) the default way; None otherwise, and they
        score one after another."""
        if type(self).client_evaluate is not Method.client_evaluate:
            return None
        tensors = payloads[0].tensors
        if not all(same_tensors(p.tensors, tensors) for p in payloads[1:]):
            return None
        first = ctxs[0]
        write_state(first.model, tensors)
        results = task_of(first.model).evaluate_groups(
            first.model,
            first.data.train,
            [ctx.test_rows for ctx in ctxs],
            first.cfg.train.batch_size * 4,
            first.device,
            generations=first.cfg.task.client_eval_generations,
        )
        return [Payload({}, metrics) for metrics in results]

    def client_states_loaded(self, states: dict[int, dict[str, Any]], model: TaskModel) -> None:
        """The local engine put its clients' lasting states back from a checkpoint (a resumed
        run, in a new process): relink whatever this process keeps beside them (a copy shared by
        many states, tensors that are the model's own), so that the clients go on exactly as
        they would have. Default: the states are all there is."""

    # --- server side ---------------------------------------------------------------------------
    def make_server(self, cfg: RunConfig, initial: Tensors) -> Server:
        return FedAvgServer(cfg, initial)
