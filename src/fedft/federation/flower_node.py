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


def _secure_aggregation(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's SecAgg+ client mod on the messages of a SecAgg+ round (its key, share and unmask
    stages it answers itself; its training stage calls the train handler below); every other
    message passes as it came."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, call_next)


client_app = ClientApp(mods=[_secure_aggregation])


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
    if "fitins.config" in msg.content.config_records:
        return Message(_secure_train(msg.content, context), reply_to=msg)
    return Message(_answer(msg.content, context), reply_to=msg)


def _secure_train(content: RecordDict, context: Context) -> RecordDict:
    """A SecAgg+ round's training step: the request comes as the workflow's FitIns (the tensors
    in order, their names and fedft's fields in its config); the reply is a FitRes whose
    parameters are the update, trained minus sent, which the mod quantizes and masks. The row
    count goes as the FitRes weight (masked too); the training loss stays home."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
    from flwr.compat.common import recorddict_compat as compat

    fit = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(fit.config)
    names = str(config.pop("fedft.names")).split("\n")  # a legacy config holds no lists
    meta = {k: config.pop(k) for k in ("client", "round", "kind")}
    clip = config.pop("fedft.clip", None)  # client-level DP: clip here, count once
    sent = dict(zip(names, parameters_to_ndarrays(fit.parameters), strict=True))
    request = RecordDict(
        {
            "tensors": array_record(sent),
            "scalars": ConfigRecord(config),
            "meta": ConfigRecord(meta),
        }
    )
    answer = _answer(request, context)
    trained = arrays(answer["tensors"])
    scalars = dict(answer["scalars"])
    rows = int(scalars.pop("num_examples"))
    scalars.pop("train_loss", None)
    update = [trained[n].astype(np.float64) - sent[n].astype(np.float64) for n in names]
    if clip is not None:
        norm = float(np.sqrt(sum(float(np.square(u).sum()) for u in update)))
        update = [u * min(1.0, float(clip) / max(norm, 1e-12)) for u in update]
        rows = 1
    bound = float(context.state.config_records[RECORD_KEY_STATE]["clipping_range"])
    largest = max((float(np.abs(u).max()) for u in update if u.size), default=0.0)
    if largest > bound:
        raise ValueError(
            f"a value of this client's update ({largest:.3g}) lies outside "
            f"federation.secagg_clip_range={bound:g}; raise it (quantization coarsens with it)"
        )
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), rows, scalars)
    out = compat.fitres_to_recorddict(fit_res, keep_input=True)
    out["cost"] = answer["cost"]
    return out


def _answer(content: RecordDict, context: Context) -> RecordDict:
    meta = dict(content["meta"])
    client = node_client(context)
    if meta["kind"] == "hello":
        if warm_enabled(context):
            warm.prestart(dict(context.run_config), dict(context.node_config))
        return RecordDict({"meta": ConfigRecord({"client": client})})
    if not warm_enabled(context):
        from fedft.federation.flower import answer_in_process

        return answer_in_process(content, context)
    request = {
        "client": client,
        "kind": str(meta["kind"]),
        "round": int(meta["round"]),
        "tensors": arrays(content.get("tensors")),
        "scalars": dict(content["scalars"]) if "scalars" in content else {},
        "state": arrays(context.state.get(STATE_TENSORS)),
        "state_scalars": dict(context.state.get(STATE_SCALARS) or {}),
    }
    answer = warm.call(dict(context.run_config), dict(context.node_config), request)
    context.state[STATE_TENSORS] = array_record(answer["state"])
    context.state[STATE_SCALARS] = ConfigRecord(answer["state_scalars"])
    return RecordDict(
        {
            "tensors": array_record(answer["tensors"]),
            "scalars": ConfigRecord(answer["scalars"]),
            "meta": ConfigRecord({"client": int(meta["client"])}),
            "cost": MetricRecord(answer["cost"]),
        }
    )


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    return _reply(msg, context)
