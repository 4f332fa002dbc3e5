"""The server side of the message interface: owns the global state and runs rounds over a Grid.

`FedAvgServer` is the default round (broadcast the trainable tensors, local training, weighted
mean through a server optimizer). Methods with other rounds subclass `Server`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedft.config import RunConfig
from fedft.errors import BudgetSpent, RunStopped
from fedft.federation.aggregation import ServerOptimizer, Tensors, weighted_mean
from fedft.federation.grid import Grid
from fedft.federation.payload import Message, Payload, Reply
from fedft.federation.training import write_state
from fedft.models.backbone import TaskModel
from fedft.privacy.accounting import POPULATION, PrivacyLedger, plan_population
from fedft.privacy.client_level import noised_mean, noisy_mean_update
from fedft.privacy.noise import dp_random

log = logging.getLogger("fedft")
SERVER_NOISE_TAG = 0x5E


@dataclass
class RoundOutcome:
    replies: list[Reply]
    metrics: dict[str, Any] = field(default_factory=dict)


def mean_train_loss(replies: list[Reply]) -> float | None:
    """The clients' reported training losses, weighted by their example counts; None when a client
    kept its loss to itself (DP clients do) or nobody answered."""
    if not replies or any("train_loss" not in r.payload.scalars for r in replies):
        return None
    weights = [float(r.payload.scalars["num_examples"]) for r in replies]
    losses = [float(r.payload.scalars["train_loss"]) for r in replies]
    return sum(x * w for x, w in zip(losses, weights, strict=True)) / sum(weights)


def non_finite_parts(payload: Payload) -> list[str]:
    """Names of a payload's tensors (and its training loss) that hold NaN or infinity."""
    bad = [
        name
        for name, t in payload.tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    loss = payload.scalars.get("train_loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        bad.append("train_loss")
    return bad


class Server:
    """Base class: a method's server logic. State must round-trip through `state_dict`."""

    def __init__(self, cfg: RunConfig, initial: Tensors):
        self.cfg = cfg
        self.global_state: Tensors = {k: v.detach().cpu().clone() for k, v in initial.items()}
        self.privacy = PrivacyLedger(cfg.privacy) if cfg.privacy.mode != "none" else None
        self.population = plan_population(cfg) if cfg.privacy.mode == "client" else None

    def run_round(self, round_number: int, grid: Grid, clients: list[int]) -> RoundOutcome:
        raise NotImplementedError

    def aggregates_a_sum(self) -> bool:
        """Whether a round needs no more of the clients than the weighted sum of their tensors
        (what secure aggregation reveals). Default: no."""
        return False

    def evaluation_models(self, task_model: TaskModel) -> dict[str, nn.Module]:
        """The models that score the global state, by metric prefix (`test` is the run's
        accuracy), each already carrying it. Default: the process's own model; a server that
        holds parts the clients do not (split learning, a full model behind a sub-model, a
        black-box large model) names its own."""
        write_state(task_model, self.model_state())
        return {"test": task_model}

    def evaluation_costs(self) -> dict[str, Any]:
        """What scoring the global model cost beyond the clients (e.g. queries to a large model),
        for the round's line. Default: nothing."""
        return {}

    def model_state(self) -> Tensors:
        """The global tensors a model needs to score the global model."""
        return self.global_state

    def evaluation_payload(self, client: int) -> Payload:
        """What a client needs to score the global model on its own test rows."""
        return Payload(dict(self.model_state()))

    def summary(self) -> dict[str, Any]:
        """Method-specific figures for the run's summary. Default: none."""
        return {}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        meta = {"privacy": self.privacy.state_dict()} if self.privacy else {}
        return {f"global.{k}": v for k, v in self.global_state.items()}, meta

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        # keep the model's parameter order (a checkpoint file lists names alphabetically)
        self.global_state = {k: tensors[f"global.{k}"] for k in self.global_state}
        if self.privacy is not None:
            self.privacy.load_state_dict(meta.get("privacy", {}))

    def forget_client_state(self) -> None:
        """On resume, when the clients' own lasting state did not come back with the server's:
        on Flower the nodes keep theirs, but a server started anew cannot know whether a node
        restarted since; a checkpoint may hold none. A server that sends a client less because
        of what it holds (records since its version, slices of a sub-model) must then treat
        every client as new. Default: the server assumes nothing about its clients."""

    # --- privacy budget: every server that trains on client data calls these two ----------------
    def admit(self, round_number: int, clients: list[int]) -> tuple[list[int], list[int]]:
        """Split the sampled clients into those whose budget allows this round and those spent."""
        if self.privacy is None:
            return clients, []
        if self.population is not None:  # one budget for all: the run goes on or ends
            if not self.privacy.can_afford(POPULATION):
                raise BudgetSpent(
                    f"round {round_number}: another round would take client-level DP past "
                    f"privacy.epsilon={self.cfg.privacy.epsilon}; the run ends at round "
                    f"{round_number - 1}"
                )
            return clients, []
        admitted = [c for c in clients if self.privacy.can_afford(c)]
        spent = [c for c in clients if c not in admitted]
        if spent:
            log.warning(
                "round %d: clients %s have spent their privacy budget and no longer take part",
                round_number,
                spent,
            )
        if not admitted:
            raise BudgetSpent(
                f"round {round_number}: every sampled client has spent its privacy budget "
                f"(privacy.epsilon={self.cfg.privacy.epsilon}); the run ends at round {round_number - 1}"
            )
        return admitted, spent

    def account(self, replies: list[Reply], spent: list[int]) -> dict[str, Any]:
        """Record this round's DP steps; the metrics of what has been spent so far.

        Sample-level: the steps each client reports. Client-level: one step of the population's
        mechanism, taken whoever was drawn (sampling is what amplifies it), so every client has
        spent the same."""
        if self.privacy is None:
            return {}
        if self.population is not None:  # one figure: a list of it per client grows with them
            plan = self.population
            self.privacy.record(POPULATION, plan.noise_multiplier, plan.sample_rate, 1)
            spent_now = self.privacy.epsilon(POPULATION)
            return {"epsilon_max": spent_now, "epsilon_all_clients": spent_now}
        for reply in replies:
            s = reply.payload.scalars
            self.privacy.record(
                reply.client,
                float(s["dp_noise_multiplier"]),
                float(s["dp_sample_rate"]),
                int(s["dp_steps"]),
            )
        per_client = self.privacy.spent()
        return {
            "epsilon_max": max(per_client.values(), default=0.0),
            "epsilon_per_client": {str(c): e for c, e in per_client.items()},
            "budget_spent_clients": spent,
        }

    def require_replies(self, replies: list[Reply], round_number: int) -> list[Reply]:
        """The replies to use. A reply with non-finite tensors (or a non-finite training loss)
        is that client's failure this round: recorded, left out of the aggregate."""
        for reply in replies:
            bad = non_finite_parts(reply.payload) if reply.ok and reply.payload else []
            if bad:
                reply.error = (
                    f"non-finite values in {', '.join(bad[:3])} (the client diverged; lower "
                    "train.lr)"
                )
                log.warning("round %d: a client's update is non-finite; left out", round_number)
        ok = [r for r in replies if r.ok]
        need = min(self.cfg.federation.min_replies, len(replies))  # Poisson rounds may be small
        if len(ok) < need:
            raise RunStopped(
                f"round {round_number}: only {len(ok)} of {len(replies)} clients answered, fewer than "
                f"federation.min_replies={need}; the last checkpoint is kept, fix the clients and --resume"
            )
        return ok


class FedAvgServer(Server):
    def __init__(self, cfg: RunConfig, initial: Tensors):
        super().__init__(cfg, initial)
        self.optimizer = ServerOptimizer(cfg.federation)

    def aggregates_a_sum(self) -> bool:
        """The plain round: a weighted mean (or client-level DP's noised mean of clipped
        updates), unless a subclass aggregates or follows up its own way."""
        own = (FedAvgServer.run_round, FedAvgServer.aggregate, FedAvgServer.after_round)
        return (type(self).run_round, type(self).aggregate, type(self).after_round) == own

    def run_round(self, round_number: int, grid: Grid, clients: list[int]) -> RoundOutcome:
        clients, spent = self.admit(round_number, clients)
        messages = [
            Message(c, "train", self.train_payload(c, round_number), round_number) for c in clients
        ]
        if self.cfg.federation.secure_aggregation:
            aggregate, replies = self.secure_aggregate(grid, messages, round_number)
            ok = self.require_replies(replies, round_number)
            metrics: dict[str, Any] = {}
        else:
            replies = grid.exchange(messages) if messages else []
            ok = self.require_replies(replies, round_number)
            aggregate, metrics = self.aggregate(ok, round_number)
        self.global_state = self.optimizer.step(self.global_state, aggregate)
        metrics["train_loss"] = mean_train_loss(ok)
        metrics.update(self.after_round(round_number, messages, replies, ok))
        return RoundOutcome(replies, {**metrics, **self.account(ok, spent)})

    def secure_aggregate(
        self, grid: Grid, messages: list[Message], round_number: int
    ) -> tuple[Tensors, list[Reply]]:
        """The round's aggregate when the grid reveals only the mean update (SecAgg+). Under
        client-level DP the clients clip their updates to C and count equally, and the server
        noises the sum; a round with fewer than 2 participants (Poisson sampling) sends nothing,
        since a sum of one is that client's update, and releases the noise alone."""
        current = self.global_state
        if self.population is None:
            mean, replies = grid.secure_mean(messages, self.cfg.federation)
            return {
                k: (v.to(torch.float64) + mean[k].to(torch.float64)).to(v.dtype)
                for k, v in current.items()
            }, replies
        clip = self.cfg.privacy.clip
        if len(messages) >= 2:
            mean, replies = grid.secure_mean(messages, self.cfg.federation, clip=clip)
            answered = sum(r.ok for r in replies)
            total = {k: mean[k].to(torch.float64) * answered for k in current}
        else:
            total, replies = (
                {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in current.items()},
                [],
            )
        noise = dp_random(self.cfg.privacy, self.cfg.seed, round_number, SERVER_NOISE_TAG)
        return noised_mean(current, total, self.population, clip, noise), replies

    def train_payload(self, client: int, round_number: int) -> Payload:
        """What a client is sent to train: the global tensors (a method may add its own)."""
        return Payload(dict(self.global_state))

    def after_round(
        self, round_number: int, messages: list[Message], replies: list[Reply], ok: list[Reply]
    ) -> dict[str, Any]:
        """Server work after the new global state, with the round's traffic; its metrics."""
        return {}

    def aggregate(self, ok: list[Reply], round_number: int) -> tuple[Tensors, dict[str, Any]]:
        """The example-weighted mean; under client-level DP, the noised mean of clipped updates.
        Only the global tensors are averaged: a reply may carry more (e.g. statistics)."""
        states = [{k: r.payload.tensors[k] for k in self.global_state} for r in ok]
        if self.population is None:
            weights = [float(r.payload.scalars["num_examples"]) for r in ok]
            return weighted_mean(states, weights), {}
        noise = dp_random(self.cfg.privacy, self.cfg.seed, round_number, SERVER_NOISE_TAG)
        aggregate, metrics = noisy_mean_update(
            self.global_state, states, self.population, self.cfg.privacy.clip, noise
        )
        return aggregate, dict(metrics)

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors, meta = super().state_dict()
        tensors.update({f"opt.{k}": v for k, v in self.optimizer.state.items()})
        meta["optimizer_steps"] = self.optimizer.steps
        return tensors, meta

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.optimizer.state = {
            k.removeprefix("opt."): v for k, v in tensors.items() if k.startswith("opt.")
        }
        self.optimizer.steps = int(meta.get("optimizer_steps", 0))
