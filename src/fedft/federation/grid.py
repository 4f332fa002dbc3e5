"""The grid carries messages from the server side to clients and brings replies back.

Server code only sees `Grid.exchange`; which engine sits behind it (this process, or Flower) does
not change the method. Every exchange measures bytes both ways from the payloads, and the client's
time and peak memory.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from fedft.config import FederationConfig
from fedft.federation.client import ClientRuntime
from fedft.federation.payload import ClientCost, Message, Reply
from fedft.metrics.measure import measure

log = logging.getLogger("fedft")


class Grid(Protocol):
    def exchange(self, messages: list[Message]) -> list[Reply]: ...


class SecureGrid(Grid, Protocol):
    def secure_mean(
        self, messages: list[Message], cfg: FederationConfig, clip: float | None = None
    ) -> tuple[dict[str, torch.Tensor], list[Reply]]:
        """Train requests whose replies reach the server only as their example-weighted mean
        update (trained minus sent, per tensor), with each client's costs and its public scalars
        (never its row count or loss). With `clip`, each client clips its update to that L2
        norm over all its tensors and counts once (client-level DP)."""
        ...


class LocalGrid:
    """All clients in this process, run one after another on the shared model."""

    def __init__(self, runtime: ClientRuntime, device: torch.device, on_reply=None):
        self.runtime = runtime
        self.device = device
        self.on_reply = on_reply

    def exchange(self, messages: list[Message]) -> list[Reply]:
        size = self.runtime.cfg.federation.batch_clients
        if all(m.kind == "evaluate" for m in messages):
            size = len(messages)  # scoring batches rows across clients, at no cost to results
        replies: list[Reply] = []
        for start in range(0, len(messages), size):
            chunk = messages[start : start + size]
            batched = self._batched(chunk) if len(chunk) > 1 else None
            for reply in batched if batched is not None else map(self._one, chunk):
                replies.append(reply)
                if self.on_reply is not None:
                    self.on_reply(reply)
        return replies

    def _one(self, message: Message) -> Reply:
        cost = ClientCost(
            bytes_down=message.payload.tensor_bytes,
            scalar_bytes_down=message.payload.scalar_bytes,
        )
        payload, error = None, None
        with measure(self.device, self.runtime.cfg.federation.count_flops) as m:
            try:
                payload = self.runtime.handle(message)
            except Exception as exc:  # a failing client is recorded and left out, the run goes on
                error = f"{type(exc).__name__}: {exc}"
                if self.runtime.cfg.privacy.mode == "client":  # who took part is secret
                    log.warning("a client failed in round %d", message.round)
                else:
                    log.warning(
                        "client %d failed in round %d: %s", message.client, message.round, error
                    )
        cost.seconds, cost.peak_rss_bytes, cost.peak_cuda_bytes, cost.flops = (
            m.seconds,
            m.peak_rss_bytes,
            m.peak_cuda_bytes,
            m.flops,
        )
        if payload is not None:
            cost.bytes_up, cost.scalar_bytes_up = payload.tensor_bytes, payload.scalar_bytes
        return Reply(message.client, message.kind, payload, error, cost)

    def _batched(self, chunk: list[Message]) -> list[Reply] | None:
        """The chunk's clients at once (training: one forward pass a step,
        `federation.batch_clients`; evaluation: one pass over all their test rows), each charged
        an equal share of the time and the chunk's peak memory; None where the method cannot, or
        the joined work failed (its clients then run one by one, so that a failing client fails
        alone)."""
        with measure(self.device, self.runtime.cfg.federation.count_flops) as m:
            try:
                payloads = self.runtime.handle_batch(chunk)
            except Exception as exc:
                log.warning("batched clients failed (%s); running them one by one", exc)
                return None
        if payloads is None:
            return None
        replies = []
        for message, payload in zip(chunk, payloads, strict=True):
            cost = ClientCost(
                bytes_down=message.payload.tensor_bytes,
                scalar_bytes_down=message.payload.scalar_bytes,
                bytes_up=payload.tensor_bytes,
                scalar_bytes_up=payload.scalar_bytes,
                seconds=m.seconds / len(chunk),
                peak_rss_bytes=m.peak_rss_bytes,
                peak_cuda_bytes=m.peak_cuda_bytes,
                flops=m.flops // len(chunk),
            )
            replies.append(Reply(message.client, message.kind, payload, None, cost))
        return replies
