"""The grid carries messages from the server side to clients and brings replies back.

Server code only sees `Grid.exchange`; which engine sits behind it (this process, or Flower) does
not change the method. Every exchange measures bytes both ways from the payloads, and the client's
time and peak memory.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from fedft.federation.client import ClientRuntime
from fedft.federation.payload import ClientCost, Message, Reply
from fedft.metrics.measure import measure

log = logging.getLogger("fedft")


class Grid(Protocol):
    def exchange(self, messages: list[Message]) -> list[Reply]: ...


class LocalGrid:
    """All clients in this process, run one after another on the shared model."""

    def __init__(self, runtime: ClientRuntime, device: torch.device, on_reply=None):
        self.runtime = runtime
        self.device = device
        self.on_reply = on_reply

    def exchange(self, messages: list[Message]) -> list[Reply]:
        replies = []
        for message in messages:
            cost = ClientCost(
                bytes_down=message.payload.tensor_bytes,
                scalar_bytes_down=message.payload.scalar_bytes,
            )
            payload, error = None, None
            with measure(self.device, self.runtime.cfg.federation.count_flops) as m:
                try:
                    payload = self.runtime.handle(message)
                except (
                    Exception
                ) as exc:  # a failing client is recorded and left out, the run goes on
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
            reply = Reply(message.client, message.kind, payload, error, cost)
            replies.append(reply)
            if self.on_reply is not None:
                self.on_reply(reply)
        return replies
