"""The `fedpt` server: averages the small model's LoRA and head like FedAvg, then (optionally)
distils the proxy-tuned large model into the small one on public unlabeled inputs, and scores the
large model alone, the small tuned model alone and the proxy-tuned large model.

What is deployed is the proxy-tuned large model steered by the clients' aggregate, so that is
what `test` scores (and `small_test` the aggregate alone): the server keeps the aggregate aside
before distillation overwrites the small model. The distilled small model, which the next round's
clients start from, and its proxy are scored beside them as `distilled_small_test` and
`distilled_test`.

The large model is only ever asked for logits, through a cache: it is frozen, so each input is
asked once. Its queries (count and bytes) are reported apart from the clients' bytes.
"""

from __future__ import annotations

import copy
import time
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fedft.config import RunConfig
from fedft.data.encode import TensorData
from fedft.data.public import PublicInputs, PublicTexts
from fedft.federation.aggregation import Tensors
from fedft.federation.payload import Message, Reply
from fedft.federation.server import FedAvgServer
from fedft.federation.training import parameters_by_name, read_state, step_batches, write_state
from fedft.methods.fedpt.alpha import Parts, alpha_curve, best_alpha
from fedft.methods.fedpt.logits import CountingCache, QueryCounter
from fedft.methods.fedpt.proxy import (
    CausalProxy,
    LargeAlone,
    ProxyTuned,
    batch_texts,
    distillation_kl,
    proxy_logits,
)
from fedft.models.backbone import TaskModel
from fedft.tasks.generate import continuation_batch, pad_id
from fedft.tasks.prompts import IGNORE

LARGE = "large_cache."  # checkpoint prefix of the large model's answers


class FedPtServer(FedAvgServer):
    def __init__(
        self,
        cfg: RunConfig,
        initial: Tensors,
        large: CountingCache,
        small: TaskModel,
        untuned: TaskModel,
        public: PublicInputs | None,
        options: Any,
        device: torch.device,
        validation: TensorData | None = None,
        distill_steps: int = 0,
    ):
        super().__init__(cfg, initial)
        self.large, self.small, self.untuned, self.public = large, small, untuned, public
        self.options = options
        self.device = device
        self.validation = validation
        self.distill_steps = distill_steps if public is not None else 0
        self.reported = (0, 0)  # large-model queries and bytes already reported
        self.reports: list[dict[str, float]] = []
        # α: given, or chosen each round on the validation rows (1 until the first choice; before
        # any round the small model is untuned and α changes nothing)
        self.alpha: float = 1.0 if options.alpha == "auto" else float(options.alpha)
        self.alpha_curves: list[dict[str, Any]] = []
        # The clients' aggregate of the last round, kept before distillation replaces the global
        # state; None until a round has distilled (then it is the global state itself).
        self.clients_aggregate: Tensors | None = None
        self.deployed: TaskModel | None = None  # a second small model, to score the aggregate
        if self.distill_steps > 0:
            self.deployed = copy.deepcopy(small)
        for model in (small, untuned):
            write_state(model, initial)
        untuned.eval()  # frozen for good: never trained, so never in train mode

    def query_costs(self, when: str) -> dict[str, int]:
        """Large-model queries (and their bytes) since the last report: in the round's training
        and distillation (`when` = "round") or in scoring the global model ("eval")."""
        done = (self.large.queries, self.large.query_bytes)
        delta = {
            f"large_queries_{when}": done[0] - self.reported[0],
            f"large_query_bytes_{when}": done[1] - self.reported[1],
        }
        self.reported = done
        return delta

    def after_round(
        self, round_number: int, messages: list[Message], replies: list[Reply], ok: list[Reply]
    ) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.options.alpha == "auto" and self.validation is not None:
            metrics.update(self.choose_alpha(round_number))
        if self.distill_steps > 0:
            # what is deployed, kept before distillation replaces it
            self.clients_aggregate = dict(self.global_state)
            metrics.update(self.distil(round_number))
        return {**metrics, **self.query_costs("round")}

    # --- α --------------------------------------------------------------------------------------
    def parts(self, tuned: TaskModel) -> Parts:
        """The large model's, `tuned`'s and the untuned small model's logits of a batch."""
        large = LargeAlone(self.large, tuned).eval()

        def parts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            return large(batch), tuned(batch), self.untuned(batch)

        return parts

    @torch.no_grad()
    def choose_alpha(self, round_number: int) -> dict[str, float]:
        """The best α of the grid for the clients' aggregate, on the validation rows only."""
        assert self.validation is not None
        write_state(self.small, self.global_state)
        self.small.eval()
        curve = alpha_curve(
            self.parts(self.small),
            self.small.task,
            self.validation,
            list(self.options.alpha_grid),
            self.cfg.train.batch_size * 4,
            self.device,
        )
        self.alpha = best_alpha(curve)
        self.alpha_curves.append({"round": round_number, "alpha": self.alpha, "curve": curve})
        chosen = next(p for p in curve if p["alpha"] == self.alpha)
        metrics = {"alpha": self.alpha}
        metrics.update({f"alpha_validation_{k}": v for k, v in chosen.items() if k != "alpha"})
        return metrics

    # --- distillation -------------------------------------------------------------------------
    def _student(self) -> tuple[list[str], list[nn.Parameter], torch.optim.Optimizer]:
        """The small model's trained tensors made trainable for distillation, and their Adam."""
        names = list(self.global_state)
        params = list(parameters_by_name(self.small, names).values())
        for param in params:
            param.requires_grad_(True)
        return names, params, torch.optim.Adam(params, lr=self.options.distill_lr)

    def _inputs(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        assert self.public is not None
        return {k: v.to(self.device) for k, v in self.public.data.batch(rows).items()}

    @torch.no_grad()
    def _teacher(self, rows: torch.Tensor) -> torch.Tensor:
        """The proxy-tuned large model's logits on public rows, with the small model as it is."""
        out = []
        self.small.eval()
        self.untuned.eval()  # dropout off in both: the steering is their exact difference
        for start in range(0, len(rows), 64):
            batch = self._inputs(rows[start : start + 64].numpy())
            large = self.large.logits(batch_texts(self.small, batch)).to(self.device)
            out.append(proxy_logits(large, self.small(batch), self.untuned(batch), self.alpha))
        return torch.cat(out)

    @torch.no_grad()
    def _heldout_kl(self, rows: torch.Tensor, teacher: torch.Tensor) -> float:
        self.small.eval()
        student = torch.cat(
            [self.small(self._inputs(rows[s : s + 64].numpy())) for s in range(0, len(rows), 64)]
        )
        return float(distillation_kl(teacher, student, self.options.temperature))

    def distil(self, round_number: int) -> dict[str, float]:
        """Train the small model's LoRA and head to match the proxy-tuned large model (targets
        fixed before the first step) on the public rows; the result is the new global state."""
        assert self.public is not None
        o, p = self.options, self.public
        started = time.perf_counter()
        write_state(self.small, self.global_state)
        rows = torch.cat([p.train, p.heldout])
        targets = self._teacher(rows)
        by_row = dict(zip(rows.tolist(), targets, strict=True))
        held_targets = torch.stack([by_row[r] for r in p.heldout.tolist()])
        before = self._heldout_kl(p.heldout, held_targets)
        names, params, optimizer = self._student()
        generator = torch.Generator().manual_seed(self.cfg.seed + round_number)
        self.small.train()
        torch.manual_seed(self.cfg.seed + round_number)  # dropout
        bar = tqdm(
            total=self.distill_steps, desc="distilling", unit="step", leave=False, disable=None
        )
        with bar:
            for index in step_batches(
                p.train.numpy(), o.distill_batch_size, self.distill_steps, generator, None
            ):
                teacher = torch.stack([by_row[int(r)] for r in index])
                loss = distillation_kl(teacher, self.small(self._inputs(index)), o.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
        for param in params:
            param.requires_grad_(False)
            param.grad = None
        after = self._heldout_kl(p.heldout, held_targets)
        self.global_state = read_state(self.small, names)
        report = {"distill_kl_before": before, "distill_kl_after": after}
        self.reports.append(report)
        return {**report, "distill_seconds": time.perf_counter() - started}

    # --- evaluation, checkpoint, summary ------------------------------------------------------
    def model_state(self) -> Tensors:
        """The deployed small model: the clients' aggregate (before any distillation)."""
        return self.global_state if self.clients_aggregate is None else self.clients_aggregate

    def evaluation_models(self, task_model: TaskModel) -> dict[str, nn.Module]:
        """`test`: the proxy-tuned large model steered by the clients' aggregate (what is
        deployed); `small_test`: that aggregate alone; `large_test`: the large model alone. After
        a distillation, `distilled_test` and `distilled_small_test` score the distilled small
        model (the next round's start) and its proxy."""
        alpha = self.alpha
        write_state(self.small, self.global_state)
        if self.clients_aggregate is None or self.deployed is None:
            deployed = self.small
        else:
            deployed = self.deployed
            write_state(deployed, self.clients_aggregate)
        models: dict[str, nn.Module] = {  # made in eval mode, which scoring restores them to
            "test": ProxyTuned(self.large, deployed, self.untuned, alpha).eval(),
            "small_test": deployed,
            "large_test": LargeAlone(self.large, self.small).eval(),
        }
        if deployed is not self.small:
            models["distilled_test"] = ProxyTuned(
                self.large, self.small, self.untuned, alpha
            ).eval()
            models["distilled_small_test"] = self.small
        return models

    def evaluation_costs(self) -> dict[str, Any]:
        return self.query_costs("eval")

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors, meta = super().state_dict()
        if self.clients_aggregate is not None:
            tensors.update({f"aggregate.{k}": v for k, v in self.clients_aggregate.items()})
        cache, counts = self.large.state_dict()
        tensors.update({f"{LARGE}{k}": v for k, v in cache.items()})
        meta["fedpt"] = {
            "reports": self.reports,
            "large": counts,
            "reported": list(self.reported),
            "alpha": self.alpha,
            "alpha_curves": self.alpha_curves,
        }
        return tensors, meta

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        """The global state, the clients' aggregate, and the large model's answers and counters
        (a resumed run neither asks again nor counts from zero)."""
        super().load_state_dict(tensors, meta)
        state = meta.get("fedpt", {})
        self.reports = list(state.get("reports", []))
        self.alpha = float(state.get("alpha", self.alpha))
        self.alpha_curves = list(state.get("alpha_curves", []))
        if "large" in state:
            cache = {k[len(LARGE) :]: v for k, v in tensors.items() if k.startswith(LARGE)}
            self.large.load_state_dict(cache, state["large"])
            self.reported = (int(state["reported"][0]), int(state["reported"][1]))
        if all(f"aggregate.{k}" in tensors for k in self.global_state):
            self.clients_aggregate = {k: tensors[f"aggregate.{k}"] for k in self.global_state}

    def summary(self) -> dict[str, Any]:
        return {
            "fedpt": {
                "alpha": self.alpha,
                "alpha_chosen": self.options.alpha == "auto",
                "alpha_curves": self.alpha_curves,
                "large_output_space": self.large.space.describe(),
                "large_queries": self.large.queries,
                "large_query_bytes": self.large.query_bytes,
                "distillations": self.reports,
            }
        }


class CausalFedPtServer(FedPtServer):
    """`fedpt` over a vocabulary: the large model is a causal LM asked for next-token logits
    (`QueryCounter`: nothing cached, every sequence asked is counted); the proxy decodes and
    scores as a generative model does (`CausalProxy`).

    Distillation (off by default) is sequence-level: the proxy steered by the clients' aggregate
    writes greedy continuations of the public prompts (framed as the task frames its rows), and
    the small model learns its next-token distributions along them (KL at temperature T on the
    continuation's positions)."""

    large: QueryCounter  # type: ignore[assignment]
    public: PublicTexts | None  # type: ignore[assignment]

    @cached_property
    def large_alone(self) -> CausalProxy:
        """The large model by itself: frozen, so scored once (`frozen`) for the whole run."""
        alone = CausalProxy(self.small.task, self.large).eval()
        alone.frozen = True
        return alone

    def parts(self, tuned: TaskModel) -> Parts:
        proxy = CausalProxy(self.small.task, self.large, tuned, self.untuned, 1.0)
        return proxy.parts  # type: ignore[return-value]

    def evaluation_models(self, task_model: TaskModel) -> dict[str, nn.Module]:
        write_state(self.small, self.global_state)
        if self.clients_aggregate is None or self.deployed is None:
            deployed = self.small
        else:
            deployed = self.deployed
            write_state(deployed, self.clients_aggregate)
        models: dict[str, nn.Module] = {
            "test": CausalProxy(
                self.small.task, self.large, deployed, self.untuned, self.alpha
            ).eval(),
            "small_test": deployed,
            "large_test": self.large_alone,
        }
        if deployed is not self.small:
            models["distilled_test"] = CausalProxy(
                self.small.task, self.large, self.small, self.untuned, self.alpha
            ).eval()
            models["distilled_small_test"] = self.small
        return models

    # --- distillation -------------------------------------------------------------------------
    def _continuations(self, teacher: CausalProxy, texts: list[str]) -> list[dict]:
        """Each public prompt with the teacher's greedy continuation as its targets."""
        task = self.small.task
        pad = pad_id(task.tokenizer)
        size = self.options.distill_batch_size
        out = []
        for start in range(0, len(texts), size):
            prompts = [task.frame(t) for t in texts[start : start + size]]
            answers = task.continue_ids(teacher, prompts, self.device)
            pairs = [(p, a) for p, a in zip(prompts, answers, strict=True) if a]
            if pairs:
                out.append(continuation_batch(pairs, pad, self.device))
        return out

    def _kl(self, teacher: torch.Tensor, student: torch.Tensor, batch: dict) -> torch.Tensor:
        """KL at the positions that predict a continuation token."""
        targets = batch["target_ids"]
        kept = student.shape[1]
        mask = targets[:, targets.shape[1] - kept + 1 :] != IGNORE
        return distillation_kl(
            teacher[:, :-1][mask], student[:, :-1][mask], self.options.temperature
        )

    @torch.no_grad()
    def _heldout_kl(self, teacher: CausalProxy, batches: list[dict]) -> float:
        self.small.eval()
        values = [float(self._kl(teacher(b), self.small(b), b)) for b in batches]
        return float(np.mean(values)) if values else float("nan")

    def distil(self, round_number: int) -> dict[str, float]:
        assert self.public is not None and self.deployed is not None
        started = time.perf_counter()
        write_state(self.deployed, self.global_state)  # the teacher's small model: the aggregate
        teacher = CausalProxy(
            self.small.task, self.large, self.deployed, self.untuned, self.alpha
        ).eval()
        train = self._continuations(teacher, self.public.train)
        held = self._continuations(teacher, self.public.heldout)
        write_state(self.small, self.global_state)
        before = self._heldout_kl(teacher, held)
        names, params, optimizer = self._student()
        order = torch.Generator().manual_seed(self.cfg.seed + round_number)
        self.small.train()
        bar = tqdm(
            total=self.distill_steps, desc="distilling", unit="step", leave=False, disable=None
        )
        with bar:
            for step in range(self.distill_steps):
                if step % max(len(train), 1) == 0:
                    perm = torch.randperm(len(train), generator=order).tolist()
                batch = train[perm[step % len(train)]]
                with torch.no_grad():
                    target = teacher(batch)
                loss = self._kl(target, self.small(batch), batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
        for param in params:
            param.requires_grad_(False)
            param.grad = None
        after = self._heldout_kl(teacher, held)
        self.global_state = read_state(self.small, names)
        report = {"distill_kl_before": before, "distill_kl_after": after}
        self.reports.append(report)
        return {**report, "distill_seconds": time.perf_counter() - started}
