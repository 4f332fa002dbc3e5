"""The Flower adapter: with `flower_node` (the light ClientApp), the only modules of fedft that
import `flwr`.

The same method server code runs inside a Flower `ServerApp` (driving a `FlowerGrid` instead of
the in-process grid), and the same client handlers run for a Flower `ClientApp`: in a node's warm
worker (`fedft.federation.warm`) or, in simulation, in this process. A `Payload`
maps to a `RecordDict`: tensors to an `ArrayRecord`, scalars to a `ConfigRecord`. Bytes are
counted from the arrays in the records that were sent (their raw data, as the local engine counts
tensors), and the serialised size of the records is reported beside them as `wire_bytes`.

Run config keys (declared in flower-app/pyproject.toml): `fedft-config` (a YAML file),
`fedft-set` (';'-separated overrides) and `fedft-resume` (a run folder to continue).
Node config keys: `partition-id` + `num-partitions` (a shared source split for demos) or
`data-path` (the node's own dataset; `partition-id` still names the client); `fedft-warm`
(auto/true/false) and `fedft-warm-idle` (seconds) for the warm worker.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid as FlowerGridApi
from flwr.serverapp import ServerApp

from fedft.config import RunConfig
from fedft.errors import FedftError, RunStopped
from fedft.federation import warm
from fedft.federation.client import ClientRuntime
from fedft.federation.engine import build_task, run_federation
from fedft.federation.flower_node import STATE_SCALARS, STATE_TENSORS, array_record, node_client
from fedft.federation.payload import ClientCost, Payload, Reply
from fedft.federation.payload import Message as FedftMessage
from fedft.metrics import rundir
from fedft.metrics.measure import measure

log = logging.getLogger("fedft")


# --- config -------------------------------------------------------------------------------------
def config_from_run_config(run_config: dict[str, Any], extra: list[str] | None = None) -> RunConfig:
    return warm.config_from_run_config(run_config, extra)


# --- payload <-> records ------------------------------------------------------------------------
def to_records(payload: Payload, meta: dict[str, Any]) -> RecordDict:
    return RecordDict(
        {
            "tensors": ArrayRecord(
                torch_state_dict={k: v.detach().cpu() for k, v in payload.tensors.items()}
            ),
            "scalars": ConfigRecord(dict(payload.scalars)),
            "meta": ConfigRecord(meta),
        }
    )


def from_records(content: RecordDict) -> Payload:
    tensors = content["tensors"].to_torch_state_dict() if "tensors" in content else {}
    scalars = dict(content["scalars"]) if "scalars" in content else {}
    return Payload(tensors, scalars)


def record_bytes(content: RecordDict) -> tuple[int, int, int]:
    """(tensor data bytes, scalar bytes, serialised record bytes) of what was sent."""
    payload = from_records(content)
    wire = sum(content[k].count_bytes() for k in ("tensors", "scalars") if k in content)
    return payload.tensor_bytes, payload.scalar_bytes, wire


def message_type(kind: str) -> str:
    """train and evaluate map to Flower's own types; every other request kind is a query (the kind
    itself travels in the `meta` record)."""
    return {"train": MessageType.TRAIN, "evaluate": MessageType.EVALUATE}.get(
        kind, MessageType.QUERY
    )


# --- server side --------------------------------------------------------------------------------
class FlowerGrid:
    """fedft's Grid over a Flower federation: client ids are the nodes' partition ids."""

    def __init__(self, grid: FlowerGridApi, node_of_client: dict[int, int], timeout: float):
        self.grid = grid
        self.node_of_client = node_of_client
        self.timeout = timeout
        self.wire_bytes = 0

    def exchange(self, messages: list[FedftMessage]) -> list[Reply]:
        sent: dict[int, tuple[FedftMessage, int, int]] = {}
        out: list[Message] = []
        missing: list[Reply] = []
        for m in messages:
            node = self.node_of_client.get(m.client)
            if node is None:
                missing.append(
                    Reply(m.client, m.kind, None, "no SuperNode serves this client", ClientCost())
                )
                continue
            content = to_records(m.payload, {"client": m.client, "round": m.round, "kind": m.kind})
            tensor_bytes, scalar_bytes, wire = record_bytes(content)
            self.wire_bytes += wire
            sent[node] = (m, tensor_bytes, scalar_bytes)
            out.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type=message_type(m.kind),
                    group_id=str(m.round),
                )
            )
        answers = (
            {
                r.metadata.src_node_id: r
                for r in self.grid.send_and_receive(out, timeout=self.timeout)
            }
            if out
            else {}
        )
        replies = []
        for node, (m, down, scalar_down) in sent.items():
            cost = ClientCost(bytes_down=down, scalar_bytes_down=scalar_down)
            answer = answers.get(node)
            if answer is None:
                replies.append(
                    Reply(
                        m.client,
                        m.kind,
                        None,
                        f"no reply within {self.timeout:.0f} s (node lost?)",
                        cost,
                    )
                )
                continue
            if answer.has_error():
                replies.append(
                    Reply(
                        m.client,
                        m.kind,
                        None,
                        f"node error {answer.error.code}: {answer.error.reason}",
                        cost,
                    )
                )
                continue
            payload = from_records(answer.content)
            up, scalar_up, wire = record_bytes(answer.content)
            self.wire_bytes += wire
            measured = answer.content.get("cost", {})
            cost.bytes_up, cost.scalar_bytes_up = up, scalar_up
            cost.seconds = float(measured.get("seconds", 0.0))
            cost.peak_rss_bytes = int(measured.get("peak_rss_bytes", 0))
            cost.peak_cuda_bytes = int(measured.get("peak_cuda_bytes", 0))
            cost.flops = int(measured.get("flops", 0))
            replies.append(Reply(m.client, m.kind, payload, None, cost))
        order = {m.client: i for i, m in enumerate(messages)}
        return sorted(replies + missing, key=lambda r: order[r.client])


def discover_clients(grid: FlowerGridApi, cfg: RunConfig) -> dict[int, int]:
    """Wait for the SuperNodes, then ask each which client (partition id) it serves."""
    expected, deadline = cfg.federation.clients, time.monotonic() + cfg.federation.node_wait
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected:
        if time.monotonic() > deadline:
            raise RunStopped(
                f"only {len(nodes)} of federation.clients={expected} SuperNodes connected within "
                f"{cfg.federation.node_wait:.0f} s; start more SuperNodes or lower federation.clients"
            )
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    hello = [
        Message(
            RecordDict({"meta": ConfigRecord({"kind": "hello"})}),
            dst_node_id=n,
            message_type=message_type("hello"),
            group_id="0",
        )
        for n in nodes
    ]
    mapping: dict[int, int] = {}
    for answer in grid.send_and_receive(hello, timeout=cfg.federation.reply_timeout):
        if answer.has_error():
            log.warning(
                "node %s did not say hello: %s", answer.metadata.src_node_id, answer.error.reason
            )
            continue
        client = int(answer.content["meta"]["client"])
        if client in mapping:
            raise RunStopped(
                f"two SuperNodes claim partition-id {client}; give each node its own partition-id"
            )
        mapping[client] = answer.metadata.src_node_id
    bad = sorted(c for c in mapping if not 0 <= c < expected)
    if bad:
        raise RunStopped(
            f"SuperNodes with partition-id {bad} are outside 0..{expected - 1} (federation.clients={expected})"
        )
    return mapping


server_app = ServerApp()


@server_app.main()
def _server_main(grid: FlowerGridApi, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    resume = str(context.run_config.get("fedft-resume", "") or "")
    task = build_task(cfg)
    if resume:
        run_dir = Path(resume)
        lock = rundir.RunLock(run_dir).acquire()  # one writer per run folder
        rundir.load_checkpoint(run_dir)
    else:
        run_dir, lock = rundir.new_run_dir(cfg, overwrite=False, suffix="-flower")
    print(
        f"fedft: {cfg.method.name} on a Flower federation of {cfg.federation.clients} clients -> {run_dir}",
        flush=True,
    )
    try:
        mapping = discover_clients(grid, cfg)
        flower_grid = FlowerGrid(grid, mapping, cfg.federation.reply_timeout)
        summary = run_federation(
            task, run_dir, resume=bool(resume), progress=_PrintProgress(), grid=flower_grid
        )
        summary["engine"] = "flower"
        summary["wire_bytes"] = flower_grid.wire_bytes
        rundir.write_summary(run_dir, summary)
    except FedftError as exc:
        (run_dir / rundir.STOPPED).write_text(str(exc) + "\n")
        print(f"fedft: error: {exc}", flush=True)
        raise
    finally:
        lock.release()


class _PrintProgress:
    """Round lines for `flwr log` (no terminal bar inside a ServerApp)."""

    def start(self, total_rounds: int, first_round: int, clients_per_round: int) -> None:
        self.total = total_rounds

    def client_done(self, reply: Reply) -> None:
        pass

    def round_done(self, line: dict[str, Any]) -> None:
        acc = line.get("test_accuracy")
        failed = f", {len(line['failed'])} failed" if line["failed"] else ""
        shown = f"{100 * acc:.1f}%" if acc is not None else "-"
        print(
            f"fedft: round {line['round']}/{self.total} accuracy {shown}, {line['total_mb']:.2f} MB{failed}",
            flush=True,
        )

    def close(self) -> None:
        pass


# --- client side (in process; fedft.federation.flower_node is the ClientApp) ---------------------
def save_client_state(state: dict[str, Any], records: RecordDict) -> None:
    """Keep a client's lasting state in Flower's `context.state`: each message starts a new
    ClientApp process, so memory does not outlive the message. Tensors and scalars persist."""
    tensors, scalars = warm.split_state(state)
    records[STATE_TENSORS] = array_record(tensors)
    records[STATE_SCALARS] = ConfigRecord(scalars)


def load_client_state(records: RecordDict) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if STATE_TENSORS in records:
        state.update(records[STATE_TENSORS].to_torch_state_dict())
    if STATE_SCALARS in records:
        state.update(dict(records[STATE_SCALARS]))
    return state


# A runtime is a whole task (model + data): one per source, never one per client. Partition
# nodes of the same source share one (its data holds every partition, so in simulation one Ray
# worker serves all its virtual clients with it); own-data nodes share one per data-path. At most
# MAX_RUNTIMES stay, least recently used evicted: a worker that serves run after run keeps the
# latest, not all of them.
MAX_RUNTIMES = 2
_RUNTIMES: OrderedDict[str, ClientRuntime] = OrderedDict()


def _client_runtime(context: Context) -> ClientRuntime:
    """The node's runtime, built once per process and source (simulation reuses processes)."""
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    key = warm.runtime_key(run_config, node_config)
    if key in _RUNTIMES:
        _RUNTIMES.move_to_end(key)
        return _RUNTIMES[key]
    runtime = warm.build_runtime(run_config, node_config)
    _RUNTIMES[key] = runtime
    while len(_RUNTIMES) > MAX_RUNTIMES:
        _RUNTIMES.popitem(last=False)
    return runtime


def reply_in_process(msg: Message, context: Context) -> Message:
    """Answer a message with a runtime of this process (`fedft-warm=false`, or simulation)."""
    meta = dict(msg.content["meta"])
    client = node_client(context)
    runtime = _client_runtime(context)
    request = FedftMessage(client, str(meta["kind"]), from_records(msg.content), int(meta["round"]))
    # The state lives in context.state; the runtime holds it only for this request, so a runtime
    # shared by many virtual clients does not keep a copy of each one's state.
    runtime.states[client] = load_client_state(context.state)
    try:
        with measure(runtime.device, runtime.cfg.federation.count_flops) as m:
            payload = runtime.handle(request)
        save_client_state(runtime.states[client], context.state)
    finally:
        runtime.states.pop(client, None)
    content = to_records(payload, {"client": int(meta["client"])})
    content["cost"] = MetricRecord(
        {
            "seconds": m.seconds,
            "peak_rss_bytes": m.peak_rss_bytes,
            "peak_cuda_bytes": m.peak_cuda_bytes,
            "flops": float(m.flops),
        }
    )
    return Message(content, reply_to=msg)
