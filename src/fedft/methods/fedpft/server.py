"""The `fedpft` server: the model owner. It holds the full model and the sub-model it built from it
(both carrying the global LoRA and head), distils the sub-model before round 1, ships it to each
client once, averages LoRA + head like FedAvg, and every `realign_every` rounds re-distils the
neurons clients use least and ships only those slices.

Versions: the sub-model is version 1 after the first distillation and goes up by one with each
re-alignment; `changed_at[layer][j]` is the version at which neuron j last changed, so a client
holding version v is sent exactly the neurons changed after v.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Any

import torch

from fedft.config import RunConfig
from fedft.data.public import PublicInputs
from fedft.federation.aggregation import Tensors
from fedft.federation.grid import Grid
from fedft.federation.payload import Message, Payload, Reply
from fedft.federation.server import FedAvgServer, RoundOutcome
from fedft.federation.training import write_state
from fedft.methods.fedpft.distill import Distiller, DistillReport
from fedft.methods.fedpft.submodel import Ffn, ffn_parameters, slice_tensors, width_of
from fedft.models.backbone import TaskModel

log = logging.getLogger("fedft")
SUBMODEL, REALIGN, ACTIVITY = "submodel.", "realign.", "activity."


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class FedPftServer(FedAvgServer):
    def __init__(
        self,
        cfg: RunConfig,
        initial: Tensors,
        full: TaskModel,
        sub: TaskModel,
        ffns: list[Ffn],
        public: PublicInputs | None,
        options: Any,
        device: torch.device,
    ):
        super().__init__(cfg, initial)
        self.full, self.sub, self.ffns, self.public = full, sub, ffns, public
        self.options = options
        self.distiller = Distiller(sub, full, ffns, device)
        self.version = 0
        self.changed_at = {f.layer: torch.ones(width_of(sub, f), dtype=torch.long) for f in ffns}
        self.client_versions: dict[int, int] = {}
        self.reports: dict[str, Any] = {}
        for model in (full, sub):
            write_state(model, initial)

    # --- what a client is sent ----------------------------------------------------------------
    def frozen_state(self) -> Tensors:
        """The sub-model a client does not train: everything but the global LoRA and head."""
        return {
            n: p.detach().cpu()
            for n, p in self.sub.named_parameters()
            if n not in self.global_state
        }

    def submodel_tensors(self, client: int) -> Tensors:
        held = self.client_versions.get(client)
        if held is None:
            return {SUBMODEL + n: t for n, t in self.frozen_state().items()}
        out: Tensors = {}
        for ffn in self.ffns:
            index = (self.changed_at[ffn.layer] > held).nonzero().flatten()
            if len(index) == 0:
                continue
            out[f"{REALIGN}{ffn.layer}.index"] = index.to(torch.int32)
            for key, value in slice_tensors(self.sub, ffn, index).items():
                out[f"{REALIGN}{ffn.layer}.{key}"] = value.cpu()
        return out

    def payload_for(self, client: int, collect_activity: bool) -> Payload:
        tensors = {**self.global_state, **self.submodel_tensors(client)}
        scalars = {"submodel_version": self.version, "collect_activity": collect_activity}
        return Payload(tensors, scalars)

    def train_payload(self, client: int, round_number: int) -> Payload:
        return self.payload_for(client, self.realigns(round_number))

    def evaluation_payload(self, client: int) -> Payload:
        return self.payload_for(client, collect_activity=False)

    def realigns(self, round_number: int) -> bool:
        every = self.options.realign_every
        return every > 0 and round_number % every == 0

    # --- a round: FedAvg's, after the first distillation and before a re-alignment ------------
    def run_round(self, round_number: int, grid: Grid, clients: list[int]) -> RoundOutcome:
        distilled = self.distil() if self.version == 0 else {}
        outcome = super().run_round(round_number, grid, clients)
        outcome.metrics.update(distilled)
        return outcome

    def after_round(
        self, round_number: int, messages: list[Message], replies: list[Reply], ok: list[Reply]
    ) -> dict[str, Any]:
        for reply in replies:  # a client that failed may hold anything: it gets the whole again
            version = reply.payload.scalars.get("submodel_version") if reply.ok else None
            if version is None:
                self.client_versions.pop(reply.client, None)
            else:
                self.client_versions[reply.client] = int(version)
        metrics: dict[str, Any] = byte_split(messages, replies)
        if self.realigns(round_number) and ok:
            metrics.update(self.realign(ok))
        return metrics

    # --- distillation -------------------------------------------------------------------------
    def _distil(
        self, params: list, steps: int, seed: int, desc: str, after_step=None
    ) -> DistillReport:
        assert self.public is not None
        o, p = self.options, self.public
        started = time.perf_counter()
        before = self.distiller.heldout_loss(p.data, p.heldout, o.distill_batch_size)
        self.distiller.train(
            params, p.data, p.train, steps, o.distill_batch_size, o.distill_lr,
            o.weight_product, seed, after_step, desc,
        )  # fmt: skip
        after = self.distiller.heldout_loss(p.data, p.heldout, o.distill_batch_size)
        return DistillReport(before, after, steps, time.perf_counter() - started)

    def distil(self) -> dict[str, Any]:
        """Layer-level distillation of every compressed feed-forward network, before round 1."""
        self.version = 1
        if self.public is None or self.options.distill_steps == 0:
            return {}
        params = list(ffn_parameters(self.sub, self.ffns).values())
        report = self._distil(
            params, self.options.distill_steps, self.cfg.seed, "distilling the sub-model"
        )
        self.reports["distill"] = asdict(report)
        log.info(
            "fedpft: sub-model distilled, held-out hidden-state loss %.4f -> %.4f (%d steps)",
            report.heldout_before, report.heldout_after, report.steps,
        )  # fmt: skip
        return {
            "distill_loss_before": report.heldout_before,
            "distill_loss_after": report.heldout_after,
            "distill_seconds": report.seconds,
        }

    def realign(self, ok: list[Reply]) -> dict[str, Any]:
        """Keep each compressed layer's most used `realign_keep` share of neurons fixed and
        re-distil the others against the full model carrying the current LoRA and head."""
        weights = [float(r.payload.scalars.get("activity_tokens", 0)) for r in ok]
        if self.public is None or sum(weights) == 0:
            return {}
        for model in (self.full, self.sub):
            write_state(model, self.global_state)
        free: dict[int, torch.Tensor] = {}
        for ffn in self.ffns:
            activity = sum(
                w * r.payload.tensors[f"{ACTIVITY}{ffn.layer}"].float()
                for w, r in zip(weights, ok, strict=True)
            ) / sum(weights)
            order = torch.argsort(activity, descending=True, stable=True)
            fixed = math.ceil(self.options.realign_keep * len(order))
            free[ffn.layer] = order[fixed:].sort().values
        restore = _keep_fixed(self.sub, self.ffns, free)
        params = list(ffn_parameters(self.sub, self.ffns).values())
        report = self._distil(
            params, self.options.realign_steps, self.cfg.seed + self.version, "re-aligning",
            restore,
        )  # fmt: skip
        self.version += 1
        for layer, index in free.items():
            self.changed_at[layer][index] = self.version
        self.reports.setdefault("realign", []).append(asdict(report))
        return {
            "realign_loss_before": report.heldout_before,
            "realign_loss_after": report.heldout_after,
            "realigned_neurons": int(sum(len(i) for i in free.values())),
            "submodel_version": self.version,
        }

    # --- evaluation, checkpoint, summary ------------------------------------------------------
    def evaluation_models(self, task_model: TaskModel) -> dict[str, TaskModel]:
        """The full model with the learned LoRA and head plugged in is what the user gets; the
        sub-model the clients trained on is scored beside it."""
        for model in (self.full, self.sub):
            write_state(model, self.global_state)
        return {"test": self.full, "submodel_test": self.sub}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors, meta = super().state_dict()
        for name, param in ffn_parameters(self.sub, self.ffns).items():
            tensors[f"sub.{name}"] = param.detach().cpu()
        for layer, versions in self.changed_at.items():
            tensors[f"changed_at.{layer}"] = versions
        meta["fedpft"] = {
            "version": self.version,
            "reports": self.reports,
            "client_versions": {str(c): v for c, v in self.client_versions.items()},
        }
        return tensors, meta

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        """The sub-model and which version each client holds: on the local engine the clients'
        copies come back with the checkpoint, so no client is sent what it already holds."""
        super().load_state_dict(tensors, meta)
        write_state(self.sub, {k[4:]: v for k, v in tensors.items() if k.startswith("sub.")})
        self.changed_at = {f.layer: tensors[f"changed_at.{f.layer}"] for f in self.ffns}
        state = meta["fedpft"]
        self.version = int(state["version"])
        self.reports = dict(state["reports"])
        self.client_versions = {int(c): int(v) for c, v in state.get("client_versions", {}).items()}

    def forget_client_state(self) -> None:
        """Clients whose copies did not come back are sent the whole sub-model again."""
        self.client_versions = {}

    def summary(self) -> dict[str, Any]:
        frozen = sum(t.numel() * t.element_size() for t in self.frozen_state().values())
        return {
            "fedpft": {
                "submodel_download_bytes": frozen,
                "submodel_bytes": model_bytes(self.sub),
                "full_model_bytes": model_bytes(self.full),
                "submodel_params": sum(p.numel() for p in self.sub.parameters()),
                "full_params": sum(p.numel() for p in self.full.parameters()),
                "compressed_layers": [f.layer for f in self.ffns],
                **self.reports,
            }
        }


def _keep_fixed(model: TaskModel, ffns: list[Ffn], free: dict[int, torch.Tensor]):
    """A callback that puts every neuron outside `free` (and the output bias) back as it was."""
    saved = {n: p.detach().clone() for n, p in ffn_parameters(model, ffns).items()}
    params = ffn_parameters(model, ffns)
    masks = {}
    for ffn in ffns:
        keep = torch.ones(width_of(model, ffn), dtype=torch.bool)
        keep[free[ffn.layer]] = False
        for path in ffn.inputs:
            masks[f"{path}.weight"] = (keep, 0)
            masks[f"{path}.bias"] = (keep, 0)
        masks[f"{ffn.output}.weight"] = (keep, 1)
        masks[f"{ffn.output}.bias"] = (None, 0)

    @torch.no_grad()
    def restore() -> None:
        for name, param in params.items():
            keep, dim = masks[name]
            if keep is None:
                param.copy_(saved[name])
            elif dim == 0:
                param[keep.to(param.device)] = saved[name][keep]
            else:
                param[:, keep.to(param.device)] = saved[name][:, keep]

    return restore


def byte_split(messages: list[Message], replies: list[Reply]) -> dict[str, int]:
    """This round's bytes by what they carried: the one-time sub-model downloads, re-alignment
    (slices down, activity statistics up), and LoRA + head (both ways)."""

    def size(tensors: Tensors, prefix: str | None) -> int:
        return sum(
            t.numel() * t.element_size()
            for k, t in tensors.items()
            if (k.startswith(prefix) if prefix else not k.startswith((SUBMODEL, REALIGN, ACTIVITY)))
        )

    ups = [r.payload.tensors for r in replies if r.payload is not None]
    downs = [m.payload.tensors for m in messages]
    return {
        "submodel_bytes": sum(size(t, SUBMODEL) for t in downs),
        "realign_bytes": sum(size(t, REALIGN) for t in downs) + sum(size(t, ACTIVITY) for t in ups),
        "parameter_bytes": sum(size(t, None) for t in downs + ups),
    }
