"""The client side of `sfprompt`: pruning, the local-loss phase, and its half of each split step.

A round is a chain of requests; the client keeps what it needs between them in its state (plain
tensors and scalars, so that it also survives Flower's one-process-per-message):

- `sf_start` (the global prompts and tail): score the local rows by EL2N and keep the top
  fraction; phase 1 (train prompts and tail on tail(head(x)), body skipped) on the kept rows, as
  SFPrompt does (`phase1_rows: all` trains it on every row); plan the split batches in chunks;
  send the head's activations of chunk 0.
- `sf_tail` (the body's output for the chunk): per batch, the loss through the tail; step the tail;
  send the gradient of the loss with respect to the body's output.
- `sf_head` (the gradient with respect to the head's output): per batch, backpropagate it into the
  prompts and step them; send the next chunk's activations, or, after the last, the trained
  prompts and tail (phase 3 averages them), and drop the whole state.

Nothing is carried from one round to the next: the global prompts and tail come with `sf_start`,
and the optimizers start afresh each round (their moments only bridge phase 1 and the split
requests of the round). So once the last reply is built the state is emptied: an idle simulated
client holds nothing, not a copy of the tail and two Adam moments of it.

The head's activations of a chunk are recomputed in `sf_head` with the same prompts and dropout
masks as when they were sent, so the gradients the server returns match them exactly; the prompt
steps of a chunk are applied after all its gradients are in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedft.federation.client import ClientContext
from fedft.federation.payload import Payload
from fedft.federation.training import (
    derived_seed,
    local_steps,
    make_optimizer,
    parameters_by_name,
    read_state,
    row_lengths,
    step_batches,
    write_state,
)
from fedft.methods.sfprompt.pruning import el2n_scores, keep_highest
from fedft.methods.sfprompt.split import Relay, Stop, blocks_skipped
from fedft.models.backbone import TaskModel

ACT, BODY_OUT, GRAD_BODY, GRAD_HEAD = (
    "act.head_out",
    "act.body_out",
    "grad.body_out",
    "grad.head_out",
)
MASK = "act.mask"
PARAM = "param."


def save_optimizer(opt: torch.optim.Optimizer, prefix: str, state: dict[str, Any]) -> None:
    for key in [k for k in state if k.startswith(prefix + ".")]:
        del state[key]
    for index, entries in opt.state_dict()["state"].items():
        for name, value in entries.items():
            state[f"{prefix}.{index}.{name}"] = torch.as_tensor(value).clone()


def load_optimizer(opt: torch.optim.Optimizer, prefix: str, state: dict[str, Any]) -> None:
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(prefix + "."):
            _, index, name = key.split(".", 2)
            entries.setdefault(int(index), {})[name] = value
    if entries:
        saved = opt.state_dict()
        saved["state"] = entries
        opt.load_state_dict(saved)


class SplitClient:
    """One request's worth of work on the shared client model, loaded from and saved to the
    client's state."""

    def __init__(self, ctx: ClientContext, relay: Relay, prompt_names: list[str], opts: Any):
        self.ctx = ctx
        self.model: TaskModel = ctx.model
        self.relay = relay
        self.options = opts
        self.prompt_names = prompt_names
        self.tail_names = [n for n in ctx.trainable if n not in set(prompt_names)]
        cfg = ctx.cfg
        params = parameters_by_name(self.model, ctx.trainable)
        self.prompt_opt = (
            make_optimizer([params[n] for n in prompt_names], cfg.train, opts.prompt_lr)
            if prompt_names
            else None
        )
        self.tail_opt = make_optimizer(
            [params[n] for n in self.tail_names], cfg.train, opts.tail_lr(cfg)
        )

    # --- state between requests ---------------------------------------------------------------
    def load(self) -> None:
        state = self.ctx.state
        write_state(
            self.model, {n: state[PARAM + n] for n in self.ctx.trainable if PARAM + n in state}
        )
        if self.prompt_opt is not None:
            load_optimizer(self.prompt_opt, "optp", state)
        load_optimizer(self.tail_opt, "optt", state)

    def save(self) -> None:
        for name, value in read_state(self.model, self.ctx.trainable).items():
            self.ctx.state[PARAM + name] = value
        if self.prompt_opt is not None:
            save_optimizer(self.prompt_opt, "optp", self.ctx.state)
        save_optimizer(self.tail_opt, "optt", self.ctx.state)

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: v.to(self.ctx.device) for k, v in self.ctx.data.train.batch(rows).items()}

    def chunk_batches(self, chunk: int) -> list[dict[str, torch.Tensor]]:
        """The chunk's batches, all of one width: the server runs the body on their activations
        together (generation rows are trimmed to the chunk's longest, not each batch's)."""
        plan = self.ctx.state["plan"]
        per = self.options.chunk_batches
        rows = [r[r >= 0].numpy() for r in plan[chunk * per : (chunk + 1) * per]]
        whole = self.batch(np.concatenate(rows))
        out, start = [], 0
        for r in rows:
            out.append({k: v[start : start + len(r)] for k, v in whole.items()})
            start += len(r)
        return out

    # --- phase 1 and pruning --------------------------------------------------------------------
    def start(self, payload: Payload) -> Payload:
        ctx, cfg = self.ctx, self.ctx.cfg
        ctx.state.clear()
        write_state(self.model, payload.tensors)
        rows = ctx.train_rows
        self.relay.mode = "skip"
        kept = self.prune(rows)
        phase1 = kept if self.options.phase1_rows == "kept" else rows
        loss_sum, seen = self.local_loss_phase(phase1)
        sampler = torch.Generator().manual_seed(derived_seed(ctx.seed, 2))
        steps = local_steps(cfg.train, len(kept))
        lengths = row_lengths(ctx.data.train, cfg.train)
        batches = list(step_batches(kept, cfg.train.batch_size, steps, sampler, None, lengths))
        width = max(len(b) for b in batches)
        plan = torch.full((len(batches), width), -1, dtype=torch.int64)
        for i, b in enumerate(batches):
            plan[i, : len(b)] = torch.as_tensor(b)
        ctx.state["plan"] = plan
        chunks = -(-len(batches) // self.options.chunk_batches)
        ctx.state["chunks"] = chunks
        ctx.state["phase1_loss_sum"], ctx.state["phase1_seen"] = loss_sum, seen
        ctx.state["split_loss_sum"], ctx.state["split_seen"] = 0.0, 0
        reply = self.head_activations(0)
        reply.scalars.update(
            {"num_examples": len(rows), "kept": len(kept), "chunks": chunks, "chunk": 0}
        )
        self.save()
        return reply

    def prune(self, rows: np.ndarray) -> np.ndarray:
        """The rows this round trains on: a share (overall or of each label) by EL2N, the
        hardest or the easiest, or a seeded random one; every row while pruning is off or still
        warming up."""
        ctx, o = self.ctx, self.options
        if o.keep_fraction >= 1 or ctx.round <= o.prune_warmup_rounds:
            return rows
        if o.prune_keep == "random":
            scores = np.random.default_rng(ctx.seed).random(len(rows))
        else:
            size = ctx.cfg.train.batch_size * 4
            scores = el2n_scores(self.model, ctx.data.train, rows, size, ctx.device)
            scores = scores if o.prune_keep == "hardest" else -scores
        labels = ctx.data.train.labels[rows].numpy() if o.prune_per_class else None
        return keep_highest(rows, scores, o.keep_fraction, labels)

    def local_loss_phase(self, rows: np.ndarray) -> tuple[float, int]:
        """Phase 1: prompts and tail on tail(head(x)), no network."""
        epochs = self.options.local_epochs
        if epochs == 0:
            return 0.0, 0
        cfg = self.ctx.cfg
        steps = epochs * -(-len(rows) // cfg.train.batch_size)
        if cfg.train.max_steps is not None:
            steps = min(steps, cfg.train.max_steps)
        sampler = torch.Generator().manual_seed(derived_seed(self.ctx.seed, 1))
        torch.manual_seed(derived_seed(self.ctx.seed, 3))
        self.model.train()
        loss_sum, seen = 0.0, 0
        lengths = row_lengths(self.ctx.data.train, cfg.train)
        for index in step_batches(rows, cfg.train.batch_size, steps, sampler, None, lengths):
            batch = self.batch(index)
            loss = self.model.task.loss(self.model(batch), batch)
            self.model.zero_grad(set_to_none=True)
            loss.backward()
            if self.prompt_opt is not None:
                self.prompt_opt.step()
            self.tail_opt.step()
            loss_sum += float(loss.detach()) * len(index)
            seen += len(index)
        return loss_sum, seen

    # --- phase 2 ---------------------------------------------------------------------------------
    def head_forward(self, chunk: int, j: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's output for batch j of a chunk, with that batch's own dropout masks."""
        torch.manual_seed(derived_seed(self.ctx.seed, 100 + chunk, j))
        self.model.train()
        self.relay.mode = "capture"
        try:
            self.model(batch)
        except Stop as stop:
            return stop.hidden
        finally:
            self.relay.mode = "skip"
        raise RuntimeError("the forward pass never reached the cut")

    def head_activations(self, chunk: int) -> Payload:
        outs, masks = [], []
        with torch.no_grad():
            for j, batch in enumerate(self.chunk_batches(chunk)):
                outs.append(self.head_forward(chunk, j, batch).cpu())
                if "attention_mask" in batch:
                    masks.append(batch["attention_mask"].to(torch.uint8).cpu())
        tensors = {ACT: torch.cat(outs)}
        if masks:
            tensors[MASK] = torch.cat(masks)
        return Payload(tensors, {"chunk": chunk})

    def tail_step(self, payload: Payload) -> Payload:
        chunk = int(self.ctx.state["chunk"]) if "chunk" in self.ctx.state else 0
        body_out = payload.tensors[BODY_OUT]
        grads, offset = [], 0
        torch.manual_seed(derived_seed(self.ctx.seed, 200 + chunk))
        self.model.train()
        self.relay.mode = "inject"
        try:
            with blocks_skipped(self.model, self.options.head_blocks):  # the relay injects
                for batch in self.chunk_batches(chunk):
                    size = len(batch["labels"])
                    incoming = body_out[offset : offset + size].to(self.ctx.device)
                    incoming.requires_grad_(True)
                    offset += size
                    self.relay.incoming = incoming
                    loss = self.model.task.loss(self.model(batch), batch)
                    self.model.zero_grad(set_to_none=True)
                    loss.backward()
                    self.tail_opt.step()
                    grads.append(incoming.grad.detach().cpu())
                    self.ctx.state["split_loss_sum"] += float(loss.detach()) * size
                    self.ctx.state["split_seen"] += size
        finally:
            self.relay.mode, self.relay.incoming = "skip", None
        if self.prompt_opt is None:  # nothing before the body trains: no gradient goes back
            return Payload({}, {"chunk": chunk})
        return Payload({GRAD_BODY: torch.cat(grads)}, {"chunk": chunk})

    def prompt_steps(self, chunk: int, grad_head: torch.Tensor) -> None:
        assert self.prompt_opt is not None
        params = list(self.prompt_opt.param_groups[0]["params"])
        per_batch, offset = [], 0
        for j, batch in enumerate(self.chunk_batches(chunk)):
            out = self.head_forward(chunk, j, batch)
            size = len(batch["labels"])
            g = grad_head[offset : offset + size].to(out.device)
            offset += size
            per_batch.append(torch.autograd.grad(out, params, grad_outputs=g, allow_unused=True))
        for grads in per_batch:  # all measured at the prompts the server saw, then applied
            for p, g in zip(params, grads, strict=True):
                p.grad = None if g is None else g.detach().clone()
            self.prompt_opt.step()
        self.prompt_opt.zero_grad(set_to_none=True)

    def head_step(self, payload: Payload) -> Payload:
        state = self.ctx.state
        chunk = int(state.get("chunk", 0))
        if self.prompt_opt is not None:
            self.prompt_steps(chunk, payload.tensors[GRAD_HEAD])
        chunk += 1
        state["chunk"] = chunk
        if chunk < int(state["chunks"]):
            return self.head_activations(chunk)
        seen = int(state["split_seen"])
        return Payload(
            read_state(self.model, self.ctx.trainable),
            {
                "done": True,
                "num_examples": len(self.ctx.train_rows),
                "train_loss": float(state["split_loss_sum"]) / max(seen, 1),
                "phase1_loss": float(state["phase1_loss_sum"]) / max(int(state["phase1_seen"]), 1),
            },
        )
