"""The server side of `sfprompt`: it owns the full model, answers the split steps with the frozen
body, and averages the prompts and tails (phase 3). It never sees raw inputs or labels: only the
head's activations (and the attention mask) and the gradient of the loss at the body's output."""

from __future__ import annotations

from typing import Any

import torch

from fedft.config import RunConfig
from fedft.federation.aggregation import Tensors, weighted_mean
from fedft.federation.grid import Grid
from fedft.federation.payload import Message, Payload, Reply
from fedft.federation.server import FedAvgServer, RoundOutcome, mean_train_loss
from fedft.federation.training import write_state
from fedft.methods.sfprompt.client import ACT, BODY_OUT, GRAD_BODY, GRAD_HEAD, MASK
from fedft.methods.sfprompt.split import BodyRunner
from fedft.metrics.measure import measure
from fedft.models.backbone import TaskModel


def is_activation(name: str) -> bool:
    return name.startswith(("act.", "grad."))


def split_bytes(replies: list[Reply], messages: list[Message]) -> tuple[int, int]:
    """(activation bytes, parameter bytes) that crossed the wire, both ways."""
    act = params = 0
    for payload in [m.payload for m in messages] + [r.payload for r in replies if r.payload]:
        for name, t in payload.tensors.items():
            size = t.numel() * t.element_size()
            if is_activation(name):
                act += size
            else:
                params += size
    return act, params


class SfPromptServer(FedAvgServer):
    """FedAvg of prompts and tails (with the server optimizer and its checkpointed state), around
    a round of split steps."""

    def __init__(self, cfg: RunConfig, initial: Tensors, full_model: TaskModel, options: Any):
        super().__init__(cfg, initial)
        self.model = full_model
        self.body = BodyRunner(full_model, options.head_blocks, options.tail_blocks)
        self.device = next(full_model.parameters()).device

    def evaluation_models(self, task_model: TaskModel) -> dict[str, TaskModel]:
        write_state(self.model, self.model_state())
        return {"test": self.model}  # the clients' models have no body

    def body_inputs(self, payload: Payload) -> dict[str, torch.Tensor]:
        """Model inputs of the right shape: the model's own code then builds the body's mask."""
        acts = payload.tensors[ACT]
        if MASK in payload.tensors:
            mask = payload.tensors[MASK].to(self.device, torch.int64)
            return {"input_ids": torch.zeros_like(mask), "attention_mask": mask}
        pre = self.model.preprocess
        shape = (acts.shape[0], pre.channels, pre.image_size, pre.image_size)
        return {"pixel_values": torch.zeros(shape, device=self.device)}

    def run_round(self, round_number: int, grid: Grid, clients: list[int]) -> RoundOutcome:
        clients, spent = self.admit(round_number, clients)
        state = dict(self.global_state)
        messages = [Message(c, "sf_start", Payload(state), round_number) for c in clients]
        replies = grid.exchange(messages)
        all_replies, all_messages = list(replies), list(messages)
        last = {r.client: r for r in replies}  # each client's latest answer
        live = {r.client: r for r in replies if r.ok}
        body_seconds, body_peak = 0.0, 0
        self.model.eval()  # the body is frozen: no dropout, so a recomputation would match
        while live:
            graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            tail_msgs = []
            for client, reply in live.items():
                with measure(self.device) as m:
                    acts = reply.payload.tensors[ACT].to(self.device).requires_grad_(True)
                    with torch.enable_grad():
                        out = self.body.forward(acts, self.body_inputs(reply.payload))
                body_seconds += m.seconds
                body_peak = max(body_peak, m.peak_rss_bytes)
                graphs[client] = (acts, out)
                tail_msgs.append(
                    Message(
                        client, "sf_tail", Payload({BODY_OUT: out.detach().cpu()}), round_number
                    )
                )
            tail_replies = grid.exchange(tail_msgs)
            last.update({r.client: r for r in tail_replies})
            all_replies += tail_replies
            all_messages += tail_msgs
            head_msgs = []
            for reply in tail_replies:
                if not reply.ok:
                    continue
                acts, out = graphs[reply.client]
                back: dict[str, torch.Tensor] = {}
                if GRAD_BODY in reply.payload.tensors:  # prompts train: backprop the body
                    with measure(self.device) as m:
                        grad = reply.payload.tensors[GRAD_BODY].to(self.device)
                        (grad_acts,) = torch.autograd.grad(out, acts, grad_outputs=grad)
                    body_seconds += m.seconds
                    body_peak = max(body_peak, m.peak_rss_bytes)
                    back[GRAD_HEAD] = grad_acts.detach().cpu()
                head_msgs.append(Message(reply.client, "sf_head", Payload(back), round_number))
            graphs.clear()
            head_replies = grid.exchange(head_msgs) if head_msgs else []
            last.update({r.client: r for r in head_replies})
            all_replies += head_replies
            all_messages += head_msgs
            live = {r.client: r for r in head_replies if r.ok and not r.payload.scalars.get("done")}
        ok = self.require_replies(list(last.values()), round_number)
        weights = [float(r.payload.scalars["num_examples"]) for r in ok]
        aggregate = weighted_mean([r.payload.tensors for r in ok], weights)
        self.global_state = self.optimizer.step(self.global_state, aggregate)
        write_state(self.model, self.global_state)
        act_bytes, param_bytes = split_bytes(all_replies, all_messages)
        metrics = {
            "train_loss": mean_train_loss(ok),
            "activation_bytes": act_bytes,
            "parameter_bytes": param_bytes,
            "server_body_seconds": body_seconds,
            "server_peak_rss_mb": body_peak / 1e6,
            "kept_examples": sum(int(r.payload.scalars["kept"]) for r in replies if r.ok),
            **self.account(ok, spent),
        }
        return RoundOutcome(all_replies, metrics)

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        write_state(self.model, self.global_state)
