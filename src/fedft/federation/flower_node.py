"""The ClientApp of fedft's Flower app, kept light: it imports flwr and numpy, not torch.

A Flower 1.41 SuperNode starts a ClientApp process for every message. Importing fedft's whole
client side (torch, transformers) takes about 4.6 s on 2 cores against 0.5 s for flwr's
ClientApp alone, so this module answers a message by forwarding it to the node's warm worker
(`fedft.federation.warm`), which holds the model and data loaded. It imports the in-process
path (`fedft.federation.flower`) only where that is asked for: `fedft-warm=false` in the node
config, or (`auto`, the default) inside Flower's simulation engine, whose Ray workers keep their
processes, and the runtime in them, between messages.

The Flower adapter is `fedft.federation.flower` (the ServerApp and the record conversions) and
this module; both are the only fedft modules that import `flwr`.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedft.federation import warm

STATE_TENSORS, STATE_SCALARS = "fedft.state.tensors", "fedft.state.scalars"

client_app = ClientApp()


def node_client(context: Context) -> int:
    """The client this node runs as: its partition id, whether or not it brings its own data."""
    return int(context.node_config.get("partition-id", 0))


def warm_enabled(context: Context) -> bool:
    flag = str(context.node_config.get("fedft-warm", "auto")).strip().lower()
    if flag in ("true", "1", "yes", "on"):
        return True
    if flag in ("false", "0", "no", "off"):
        return False
    if flag != "auto":
        raise ValueError(f"node config fedft-warm={flag!r}: use true, false or auto")
    return "ray" not in sys.modules  # Flower's simulation engine runs ClientApps in Ray workers


def arrays(record: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()} if record is not None else {}


def array_record(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        array_dict={k: Array(ndarray=np.ascontiguousarray(v)) for k, v in tensors.items()}
    )


def _reply(msg: Message, context: Context) -> Message:
    meta = dict(msg.content["meta"])
    client = node_client(context)
    if meta["kind"] == "hello":
        return Message(RecordDict({"meta": ConfigRecord({"client": client})}), reply_to=msg)
    if not warm_enabled(context):
        from fedft.federation.flower import reply_in_process

        return reply_in_process(msg, context)
    request = {
        "client": client,
        "kind": str(meta["kind"]),
        "round": int(meta["round"]),
        "tensors": arrays(msg.content.get("tensors")),
        "scalars": dict(msg.content["scalars"]) if "scalars" in msg.content else {},
        "state": arrays(context.state.get(STATE_TENSORS)),
        "state_scalars": dict(context.state.get(STATE_SCALARS) or {}),
    }
    answer = warm.call(dict(context.run_config), dict(context.node_config), request)
    context.state[STATE_TENSORS] = array_record(answer["state"])
    context.state[STATE_SCALARS] = ConfigRecord(answer["state_scalars"])
    content = RecordDict(
        {
            "tensors": array_record(answer["tensors"]),
            "scalars": ConfigRecord(answer["scalars"]),
            "meta": ConfigRecord({"client": int(meta["client"])}),
            "cost": MetricRecord(answer["cost"]),
        }
    )
    return Message(content, reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    return _reply(msg, context)
