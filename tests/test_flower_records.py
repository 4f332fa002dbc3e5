"""Payloads and client state through Flower's real record types (no processes needed)."""

import pytest
import torch
from flwr.app import RecordDict

from fedft.federation.flower import (
    from_records,
    load_client_state,
    record_bytes,
    save_client_state,
    to_records,
)
from fedft.federation.payload import Payload


def test_payload_round_trips_through_records_with_the_same_bytes():
    payload = Payload(
        {"net.a.weight": torch.randn(3, 4), "prompt.tokens": torch.randn(2, 5).half()},
        {"num_examples": 12, "train_loss": 0.25, "note": "ok"},
    )
    content = to_records(payload, {"client": 3, "round": 2, "kind": "train"})
    back = from_records(content)
    assert back.tensors.keys() == payload.tensors.keys()
    assert all(torch.equal(back.tensors[k], payload.tensors[k]) for k in payload.tensors)
    assert back.tensors["prompt.tokens"].dtype == torch.float16
    assert back.scalars == payload.scalars
    tensor_bytes, scalar_bytes, wire = record_bytes(content)
    assert (tensor_bytes, scalar_bytes) == (payload.tensor_bytes, payload.scalar_bytes)
    assert wire > tensor_bytes


def test_client_state_persists_in_context_records():
    records = RecordDict()
    save_client_state({"momentum": torch.arange(4.0), "steps": 7, "seed": "abc"}, records)
    state = load_client_state(records)
    assert (
        torch.equal(state["momentum"], torch.arange(4.0))
        and state["steps"] == 7
        and state["seed"] == "abc"
    )
    with pytest.raises(TypeError, match="only tensors and scalars persist"):
        save_client_state({"bad": [1, 2]}, records)
