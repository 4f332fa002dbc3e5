"""What crosses the network: named tensors plus small scalars, and the messages that carry them.

Bytes on the wire are counted from the payload itself (tensor storage and scalar encodings), the
same way whichever engine carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Scalar = int | float | str | bool
SCALAR_NUMBER_BYTES = 8  # int64 / float64 / bool as sent in a record


@dataclass
class Payload:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def scalar_bytes(self) -> int:
        return sum(
            len(v.encode()) if isinstance(v, str) else SCALAR_NUMBER_BYTES
            for v in self.scalars.values()
        )

    @property
    def nbytes(self) -> int:
        return self.tensor_bytes + self.scalar_bytes


@dataclass
class Message:
    """A request from the server to one client."""

    client: int
    kind: str
    payload: Payload
    round: int


@dataclass
class ClientCost:
    """Measured for one exchange: bytes both ways, the client's compute time and peak memory."""

    bytes_down: int = 0
    bytes_up: int = 0
    scalar_bytes_down: int = 0
    scalar_bytes_up: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_cuda_bytes: int = 0
    flops: int = 0  # federation.count_flops: the exchange's floating-point operations


@dataclass
class Reply:
    client: int
    kind: str
    payload: Payload | None
    error: str | None
    cost: ClientCost

    @property
    def ok(self) -> bool:
        return self.error is None
