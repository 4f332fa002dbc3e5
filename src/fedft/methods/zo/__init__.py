"""`zo`: forward-only federated fine-tuning (MeZO's seeded SPSA, FedKSeed's seed exchange, DPZero's
private scalar).

A client that can hold the model for inference can train it: every step is two forward passes
along a direction regenerated from a seed. In `seeds` mode only (seed, scalar) pairs go up, and
the server and catching-up clients rebuild the parameters by replaying them; `delta` mode uploads
the trained tensors like FedAvg, for comparison. The parameter set is any other method's (`lora`,
`bias`, `prompt`, `adapter`, `head`) or all weights.
"""

from __future__ import annotations

import atexit
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from fedft.config import RunConfig
from fedft.errors import ConfigError, ModelError
from fedft.federation.aggregation import Tensors
from fedft.federation.client import ClientContext, Handler
from fedft.federation.payload import Payload
from fedft.federation.server import FedAvgServer, Server
from fedft.federation.training import (
    derived_seed,
    local_steps,
    parameters_by_name,
    read_state,
    row_lengths,
    write_state,
)
from fedft.methods import get_method, register
from fedft.methods.base import Method
from fedft.methods.zo.directions import (
    Directions,
    checksum,
    decayed_mask,
    pool_seed,
    sparse_masks,
)
from fedft.methods.zo.head import LABEL_ROWS, ExactHead, attach_label_rows, head_module
from fedft.methods.zo.records import apply_record, unpack_records
from fedft.methods.zo.spsa import ScalarPrivacy, ZoSteps, run_zo
from fedft.models.backbone import TaskModel
from fedft.models.zero_shot import ZeroShotClassifier, make_zero_shot
from fedft.privacy import plan_client
from fedft.privacy.dp_sgd import dp_scalars
from fedft.privacy.noise import dp_random

PARAMETER_SETS = ("all", "head", "bias", "adapter", "prompt", "lora")
DEFAULT_LR = {  # all and lora: `benchmarks/run.py zo-sweep` (docs/benchmarks.md); the rest unswept
    "all": 3e-3,
    "head": 1e-3,
    "bias": 1e-4,
    "adapter": 1e-4,
    "prompt": 1e-3,
    "lora": 3e-3,
}
# All weights under a head that is already meaningful (zero-shot, or trained exactly): the body
# only refines, and 3e-3 (a fresh head's pick) throws the start away. `zo-learns-sweep`.
SETTLED_HEAD_LR_ALL = 1e-4
# The exact head's SGD lr: zo-learns-sweep's pick on MiniLM's zero-shot head; on a causal LM's
# label-word rows 1e-1 diverged (SmolLM2: training loss 22 in the first round, whatever the body
# lr) where 1e-2 held (zo-learns-smollm2's sweep)
DEFAULT_HEAD_LR = {"encoder": 1e-1, "causal": 1e-2}
AUTO_SPARSITY = 0.75  # a causal LM's exact label-word head: the zo-learns-smollm2 row that held
NOISE_TAG, SAMPLING_TAG = 0xD9, 0x5A
SYNCED = "synced."  # client-state prefix of the parameters it last synced
HEAD = "head."  # payload prefix of an exact head's tensors (they travel whole)


START_PREFIX = "fedft-zo-start-"  # + the pid of the process that keeps it


def remove_orphaned_starts() -> None:
    """Starting weights left by this user's processes that were killed before their exit hook
    ran (a stopped SuperNode, a timed-out job): the pid in the name is gone."""
    for path in Path(tempfile.gettempdir()).glob(f"{START_PREFIX}*-*.safetensors"):
        pid = path.name.removeprefix(START_PREFIX).split("-", 1)[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except OSError:  # alive under another user, or the file went meanwhile
            continue


@dataclass
class SyncedCopy:
    """The one copy a process keeps of a synced version, and the client states that refer to it
    (so that they can be let go of it when the process moves on to a newer version)."""

    version: int
    tensors: Tensors
    holders: list[dict[str, Any]] = field(default_factory=list)


class ZoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: Literal["all", "head", "bias", "adapter", "prompt", "lora"] = Field(
        "all", description="what trains: all weights, or the parameter set of that method"
    )
    params_options: dict[str, Any] = Field(
        default_factory=dict, description="options of that method (e.g. {r: 4} for lora)"
    )
    eps: float = Field(1e-3, gt=0, description="perturbation size epsilon of SPSA")
    directions: int = Field(1, ge=1, description="random directions averaged per step")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning rate over the rounds"
    )
    mode: Literal["seeds", "delta"] = Field(
        "seeds", description="'seeds': upload (seed, scalar) pairs; 'delta': the trained tensors"
    )
    seed_pool: int | None = Field(
        None, ge=1, description="draw seeds from a fixed pool of this many (FedKSeed); None: fresh"
    )
    distribution: Literal["gaussian", "rademacher"] = Field(
        "gaussian",
        description="entries of z: standard normal (MeZO) or +-1 (SPSA; cheaper to draw)",
    )
    sparsity: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Sparse-MeZO: share of each matrix's entries (the largest in magnitude) left "
        "unperturbed (0: perturb all); None: 0.75 where a causal LM's label-word rows train by "
        "the exact head (the variant that held on SmolLM2), else 0",
    )
    start: Literal["auto", "task", "zero_shot"] = Field(
        "auto",
        description="the head to start from: the task's (a fresh classifier; a causal LM's label "
        "words) or, for a text encoder, a zero-shot head over the label names' embeddings; auto: "
        "zero_shot for a text encoder, task otherwise",
    )
    label_template: str = Field("{}", description="start=zero_shot: text embedded for each label")
    zero_shot_scale: float = Field(20.0, gt=0, description="start=zero_shot: logit scale")
    head: Literal["auto", "zo", "exact"] = Field(
        "auto",
        description="the classifier head: by SPSA with the rest, or by exact gradients from the "
        "hidden state that reaches it (no backward pass through the body); auto: exact where "
        "the run allows it (no DP, a classification head or label words), else zo",
    )
    head_lr: float | None = Field(
        None, gt=0, description="head=exact: SGD learning rate of the head (None: swept default)"
    )


@register
class Zo(Method):
    name = "zo"
    summary = "forward-only: seeded SPSA on any parameter set; seeds + scalars on the wire"
    options_model = ZoOptions
    privacy_modes = ("sample",)
    zero_shot_head_under_dp = False  # a start, or a model, of its own

    def __init__(self, options: BaseModel | None = None):
        super().__init__(options)
        inner = get_method("full" if self.options.params == "all" else self.options.params)
        self.inner = inner(inner.options_model(**self.options.params_options))
        self._initial_file: Path | None = None
        self.shared_copy: SyncedCopy | None = None  # this process's clients' shared synced version
        self.head_names: list[str] = []  # head=exact: trained by exact gradients, sent whole
        # `start` and `head` as this run resolved them (auto decided by the model and privacy)
        self.start: str = self.options.start
        self.head: str = self.options.head
        self.sparsity: float | None = self.options.sparsity
        self.private = False
        self.generative = False
        self.body_names: list[str] = []  # the parameters SPSA perturbs (seeds and scalars)

    @classmethod
    def validate_options(cls, raw: dict[str, Any]) -> dict[str, Any]:
        out = super().validate_options(raw)
        inner = get_method("full" if out["params"] == "all" else out["params"])
        try:
            out["params_options"] = inner.validate_options(out["params_options"])
        except ConfigError as exc:
            raise ConfigError(
                str(exc).replace("method.", "method.params_options.", 1)
                + f" (the options of method '{inner.name}')"
            ) from None
        return out

    def check_run(self, cfg: RunConfig) -> None:
        o = self.options
        self.private = cfg.privacy.mode != "none"
        if o.head == "exact" and cfg.privacy.mode != "none":
            raise ConfigError(
                f"privacy.mode={cfg.privacy.mode}: zo's exact head gradients would need a "
                "mechanism and accountant of their own; use method.head=zo under DP"
            )
        if o.head == "exact" and o.params == "head":
            raise ConfigError(
                "method.head=exact with method.params=head trains the head alone by backprop: "
                "use method 'head', or another parameter set for SPSA"
            )
        if self.options.mode == "seeds" and cfg.federation.server_optimizer != "fedavg":
            raise ConfigError(
                f"federation.server_optimizer={cfg.federation.server_optimizer}: zo in seeds mode "
                "replays a weighted mean; use fedavg (server_lr still applies) or method.mode=delta"
            )

    # --- what trains -------------------------------------------------------------------------
    def attach(self, model: TaskModel) -> None:
        o = self.options
        self.generative = model.generative
        self.start = o.start
        if o.start == "auto":  # a causal LM's label words are its zero-shot answer already
            self.start = "zero_shot" if model.kind == "text" and not model.generative else "task"
        if isinstance(model.net, ZeroShotClassifier):  # model.head=zero_shot gave it one
            self.start = "zero_shot"
        if self.start == "zero_shot":
            make_zero_shot(model, o.label_template, o.zero_shot_scale)
        self.inner.attach(model)
        self.head = o.head if o.head != "auto" else self._auto_head(model)
        if self.head == "exact" and model.generative:
            self.lm_head = attach_label_rows(model)
        self.sparsity = o.sparsity
        if self.sparsity is None:
            # docs/benchmarks.md, zo-learns-smollm2: without it the label-word run diverged
            self.sparsity = AUTO_SPARSITY if self.head == "exact" and model.generative else 0.0

    def _auto_head(self, model: TaskModel) -> str:
        """Exact where it is offered: not under DP (it has no mechanism of its own), not when the
        head is all that trains, and only where there is a head to train (a classifier, or a
        causal LM's label words)."""
        if self.private or self.options.params == "head":
            return "zo"
        if model.generative:
            return "exact" if getattr(model.task, "mode", None) == "labels" else "zo"
        return "exact" if head_module(model.net) is not None else "zo"

    def choices(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "head": self.head,
            "head_lr": self.head_lr(),
            "sparsity": self.sparsity,
        }

    def head_lr(self) -> float | None:
        if self.head != "exact":
            return None
        if self.options.head_lr is not None:
            return self.options.head_lr
        return DEFAULT_HEAD_LR["causal" if self.generative else "encoder"]

    def select_trainable(self, model: TaskModel) -> list[str]:
        names = self.inner.select_trainable(model)
        if self.head == "exact" and model.generative:
            names = [*names, LABEL_ROWS]
        return names

    def prepare(self, model: TaskModel) -> list[str]:
        names = super().prepare(model)
        for param in model.parameters():  # nothing ever needs a gradient
            param.requires_grad_(False)
        self.head_names = []
        if self.head == "exact" and model.generative:
            self.head_names = [LABEL_ROWS]
        elif self.head == "exact":
            found = head_module(model.net)
            if found is None:
                raise ModelError(
                    f"method.head=exact: {model.source} has no classification head to train "
                    "by exact gradients; use method.head=zo"
                )
            prefix = f"net.{found[0]}."
            self.head_names = [n for n in names if n.startswith(prefix)]
        self.body_names = [n for n in names if n not in self.head_names]
        if self.options.mode == "seeds":
            self.keep_initial_state(read_state(model, names))
        return names

    def keep_initial_state(self, state: Tensors) -> None:
        """Every party holds the starting weights (version 0). A client keeps them on disk, as a
        device keeps its downloaded checkpoint: they are read only to replay from version 0, and
        a copy in memory would cost as much as the trainable weights themselves."""
        remove_orphaned_starts()
        if self._initial_file is not None:  # prepared again in this process
            self._initial_file.unlink(missing_ok=True)
        handle, name = tempfile.mkstemp(
            prefix=f"{START_PREFIX}{os.getpid()}-", suffix=".safetensors"
        )
        os.close(handle)
        self._initial_file = Path(name)
        save_file(state, str(self._initial_file))
        atexit.register(self._initial_file.unlink, missing_ok=True)

    def initial_state(self) -> Tensors:
        if self._initial_file is None:
            raise RuntimeError("zo: prepare() the model before asking for its starting weights")
        return load_file(str(self._initial_file))

    def lr(self, cfg: RunConfig) -> float:
        if cfg.train.lr is not None:
            return cfg.train.lr
        if self.options.params == "all" and (self.start == "zero_shot" or self.head == "exact"):
            return SETTLED_HEAD_LR_ALL
        return DEFAULT_LR[self.options.params]

    def round_lr(self, cfg: RunConfig, round_number: int) -> float:
        base = self.lr(cfg)
        progress = (round_number - 1) / cfg.federation.rounds
        if self.options.schedule == "linear":
            return base * (1.0 - progress)
        if self.options.schedule == "cosine":
            return base * 0.5 * (1.0 + math.cos(math.pi * progress))
        return base

    # --- client side ---------------------------------------------------------------------------
    def client_handlers(self) -> dict[str, Handler]:
        train = self.train_seeds if self.options.mode == "seeds" else self.train_delta
        return {"train": train, "evaluate": self.client_evaluate}

    def directions_for(self, params: list[torch.Tensor]) -> Directions:
        """How z is drawn over `params` as they stand (the sparse masks follow their values)."""
        masks = sparse_masks(params, self.sparsity) if self.sparsity else None
        return Directions(self.options.distribution, masks)

    def exact_head(self, model: TaskModel) -> ExactHead | None:
        if not self.head_names:
            return None
        if model.generative:  # the LM head, whose label-word logits the rows give
            module = model.net.get_output_embeddings()
        else:
            found = head_module(model.net)
            assert found is not None
            module = found[1]
        params = list(parameters_by_name(model, self.head_names).values())
        lr = self.head_lr()
        assert lr is not None
        return ExactHead(module, params, lr, model.task)

    def local_round(self, ctx: ClientContext) -> tuple[ZoSteps, dict[str, Any]]:
        """Run this round's ZO steps on the model as it stands; the steps and the DP scalars."""
        cfg, rows = ctx.cfg, ctx.train_rows
        params = list(parameters_by_name(ctx.model, self.body_names).values())
        n, pool = self.options.directions, self.options.seed_pool
        picker = np.random.default_rng(derived_seed(ctx.seed, 1))

        def seeds_for(step: int) -> tuple[list[int], list[int]]:
            if pool is None:
                fresh = [derived_seed(ctx.seed, step, j) for j in range(n)]
                return fresh, fresh
            index = [int(i) for i in picker.integers(pool, size=n)]
            return index, [pool_seed(cfg.seed, i) for i in index]

        dp, noise = None, None
        if cfg.privacy.mode == "sample":
            plan = plan_client(cfg, len(rows))
            dp = ScalarPrivacy(
                cfg.privacy.clip, plan.noise_multiplier, plan.expected_batch, plan.sample_rate
            )
            noise = dp_random(cfg.privacy, ctx.seed, NOISE_TAG)
            sampling = dp_random(cfg.privacy, ctx.seed, SAMPLING_TAG)
            steps = plan.steps_per_round
        else:
            sampling = torch.Generator().manual_seed(derived_seed(ctx.seed, SAMPLING_TAG))
            steps = local_steps(cfg.train, len(rows))
        result = run_zo(
            ctx.model,
            params,
            ctx.data.train,
            rows,
            steps,
            cfg.train.batch_size,
            seeds_for,
            self.options.eps,
            self.round_lr(cfg, ctx.round),
            cfg.train.weight_decay,
            ctx.device,
            sampling,
            dp,
            noise,
            row_lengths(ctx.data.train, cfg.train),
            self.directions_for(params),
            self.exact_head(ctx.model),
        )
        scalars: dict[str, Any] = {"num_examples": len(rows), "steps": result.steps}
        if dp is None:
            scalars["train_loss"] = result.mean_loss
        else:  # what the server's ledger counts; the loss stays home (it is not privatized)
            scalars.update(dp_scalars(plan, result.steps))
        return result, scalars

    def train_delta(self, ctx: ClientContext, payload: Payload) -> Payload:
        write_state(ctx.model, payload.tensors)
        _, scalars = self.local_round(ctx)
        return Payload(read_state(ctx.model, ctx.trainable), scalars)

    def train_seeds(self, ctx: ClientContext, payload: Payload) -> Payload:
        self.sync(ctx, payload)
        result, scalars = self.local_round(ctx)
        wire_dtype = torch.int32 if self.options.seed_pool is not None else torch.int64
        head = {f"{HEAD}{n}": t for n, t in read_state(ctx.model, self.head_names).items()}
        return Payload(
            {
                "seeds": torch.tensor(result.seeds, dtype=wire_dtype),
                "grads": torch.tensor(result.grads, dtype=torch.float32),
                **head,
            },
            scalars,
        )

    def sync(self, ctx: ClientContext, payload: Payload) -> None:
        """Bring the model to the server's version: load the whole state, or replay the records
        the client missed onto a copy of an older version; then keep the result for next time.

        A version's parameters are the same for every client that holds it, so the process keeps
        one copy, of the version it synced last (`SyncedCopy`), and a client's state refers to it
        rather than holding its own. Any client of this process holds that version or an older
        one, and the server sends every record since the client's version, so the copy plus the
        newest records rebuild any client's target: clients past it keep only their version
        number. A client's own copy (a fresh Flower ClientApp process reads it back from
        `context.state`, with no process copy) and the starting weights are the other starts."""
        s = payload.scalars
        target = int(s["version"])
        if s["sync"] == "full":
            write_state(ctx.model, payload.tensors)
        else:
            self._replay(ctx, payload, int(s["base"]), target, float(s["checksum"]))
            head = {k[len(HEAD) :]: v for k, v in payload.tensors.items() if k.startswith(HEAD)}
            write_state(
                ctx.model, head
            )  # the head travels whole (exact head); records move the rest
        self._keep_synced(ctx, target)

    def _replay(
        self, ctx: ClientContext, payload: Payload, base: int, target: int, want: float
    ) -> None:
        """Records base..target onto the newest start that holds version base or later."""
        held = int(ctx.state.get("version", 0))
        if base != 0 and held != base:
            raise RuntimeError(
                f"out of sync: the client holds version {held}, the server sent records from "
                f"version {base}; it will be sent a full catch-up next time"
            )
        records = unpack_records(payload)
        starts: list[tuple[int, Callable[[], Tensors]]] = []
        shared = self.shared_copy
        if shared is not None and base <= shared.version <= target:
            starts.append((shared.version, lambda: shared.tensors))
        if base != 0 and f"{SYNCED}{ctx.trainable[0]}" in ctx.state:
            starts.append((base, lambda: {n: ctx.state[SYNCED + n] for n in ctx.trainable}))
        if base == 0:
            starts.append((0, self.initial_state))
        if not starts:
            raise RuntimeError(
                f"out of sync: the client holds version {held} but no copy of it is here; it "
                "will be sent a full catch-up next time"
            )
        got = math.nan
        for version, start in starts:  # a copy from another run fails the checksum: next one
            write_state(ctx.model, start())
            params = list(parameters_by_name(ctx.model, self.body_names).values())
            mask = decayed_mask(params)
            for record in records[version - base :]:
                apply_record(
                    params, mask, record, ctx.cfg.seed, self.options.seed_pool,
                    self.directions_for(params),
                )  # fmt: skip
            got = checksum(params)
            if math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6):
                return
        raise RuntimeError(
            f"replayed parameters differ from the server's (checksum {got!r} on {ctx.device} != "
            f"{want!r} on {payload.scalars.get('device', '?')}): client and server must start "
            "from the same model and seed"
        )

    def _keep_synced(self, ctx: ClientContext, version: int) -> None:
        """Point the client's state at the process copy of `version`, making that copy first if
        the process holds another version: the clients that pointed at the old copy keep only
        their version number, so the old copy is freed."""
        shared = self.shared_copy
        if shared is None or shared.version != version:
            if shared is not None:
                for state in shared.holders:
                    for name in self.trainable_names:
                        state.pop(SYNCED + name, None)
            shared = SyncedCopy(version, read_state(ctx.model, ctx.trainable))
            self.shared_copy = shared
        ctx.state["version"] = version
        for name, tensor in shared.tensors.items():
            ctx.state[SYNCED + name] = tensor
        if not any(state is ctx.state for state in shared.holders):
            shared.holders.append(ctx.state)

    def client_states_loaded(self, states: dict[int, dict[str, Any]], model: TaskModel) -> None:
        """The states that hold the synced tensors (one set of objects, loaded once) share the
        process copy again, so that the clients past it replay onto it as they would have."""
        self.shared_copy = None
        first = SYNCED + self.trainable_names[0]
        holders = [state for state in states.values() if first in state]
        if not holders:
            return
        newest = max(holders, key=lambda state: int(state["version"]))
        tensors = {name: newest[SYNCED + name] for name in self.trainable_names}
        sharing = [state for state in holders if state[first] is newest[first]]
        self.shared_copy = SyncedCopy(int(newest["version"]), tensors, sharing)

    # --- server side ---------------------------------------------------------------------------
    def make_server(self, cfg: RunConfig, initial: Tensors) -> Server:
        if self.options.mode == "delta":
            return FedAvgServer(cfg, initial)
        from fedft.methods.zo.server import SeedReplayServer

        return SeedReplayServer(cfg, initial, self)
