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

import torch
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

from fedft.config import FederationConfig, RunConfig
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

    def secure_mean(
        self, messages: list[FedftMessage], cfg: FederationConfig, clip: float | None = None
    ) -> tuple[dict[str, torch.Tensor], list[Reply]]:
        """One SecAgg+ round (Flower's workflow: keys, shares, masked updates, unmasking): the
        nodes send their updates (trained minus sent) quantized and masked; only the
        example-weighted mean comes back (with `clip`: each node clips its update to that L2
        norm and weighs 1). Bytes: every record of the four stages, both ways."""
        from flwr.app import ArrayRecord as Arrays
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD

        by_node = {
            self.node_of_client[m.client]: m for m in messages if m.client in self.node_of_client
        }
        missing = [
            Reply(m.client, m.kind, None, "no SuperNode serves this client", ClientCost())
            for m in messages
            if m.client not in self.node_of_client
        ]
        if len(by_node) < 2:
            raise RunStopped(
                f"federation.secure_aggregation needs at least 2 clients a round, not {len(by_node)}; "
                "raise federation.sample_fraction or federation.sample_count"
            )
        first = next(iter(by_node.values()))
        names, round_number = list(first.payload.tensors), first.round
        counting = _CountingGrid(self.grid)
        extra = {"fedft.clip": float(clip)} if clip is not None else {}
        strategy = _secure_mean_strategy(by_node, names, counting, extra)
        context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=strategy)
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": round_number})
        context.state[MAIN_PARAMS_RECORD] = Arrays()
        workflow = SecAggPlusWorkflow(
            SECURE_SHARES,
            SECURE_THRESHOLD,
            clipping_range=cfg.secagg_clip_range,
            max_weight=cfg.secagg_max_weight if clip is None else 1.0,  # every weight is 1
            timeout=self.timeout,
        )
        workflow(counting, context)
        replies = []
        for node, m in by_node.items():
            cost = ClientCost(
                bytes_down=counting.down.get(node, 0), bytes_up=counting.up.get(node, 0)
            )
            measured = counting.costs.get(node, {})
            cost.seconds = float(measured.get("seconds", 0.0))
            cost.peak_rss_bytes = int(measured.get("peak_rss_bytes", 0))
            cost.peak_cuda_bytes = int(measured.get("peak_cuda_bytes", 0))
            cost.flops = int(measured.get("flops", 0))
            self.wire_bytes += cost.bytes_down + cost.bytes_up
            if strategy.mean is None or node not in strategy.scalars:
                error = "dropped out of the secure aggregation round"
                replies.append(Reply(m.client, m.kind, None, error, cost))
                continue
            replies.append(Reply(m.client, m.kind, Payload({}, strategy.scalars[node]), None, cost))
        if strategy.mean is None:
            raise RunStopped(
                f"round {round_number}: secure aggregation halted (too few nodes answered to "
                "unmask the sum); the last checkpoint is kept, fix the nodes and --resume"
            )
        shapes = [first.payload.tensors[n].shape for n in names]
        mean = {
            n: torch.from_numpy(a).reshape(shape)
            for n, a, shape in zip(names, strategy.mean, shapes, strict=True)
        }
        order = {m.client: i for i, m in enumerate(messages)}
        return mean, sorted(replies + missing, key=lambda r: order[r.client])


# --- secure aggregation (Flower's SecAgg+ workflow; nodes run its client mod) -----------------------
SECURE_SHARES = 1.0  # each sampled node's secrets are shared with every other sampled node
SECURE_THRESHOLD = 2 / 3  # shares that rebuild a dropped node's mask: two thirds of them


def _value_bytes(value: Any) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, str | bytes):
        return len(value)
    return 1 if isinstance(value, bool) else 8  # as Flower counts: 64-bit numbers


def _record_bytes(content: RecordDict) -> int:
    """Bytes of every record, as Flower's `count_bytes` counts them (an empty text, which it
    refuses to count, as 0)."""
    total = 0
    for record in content.values():
        if isinstance(record, ConfigRecord):
            total += sum(len(k) + _value_bytes(v) for k, v in record.items())
        else:
            total += record.count_bytes()
    return total


class _CountingGrid:
    """Flower's grid, counting every record each node is sent and sends back, by node."""

    def __init__(self, grid: FlowerGridApi):
        self.grid = grid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.costs: dict[int, dict[str, float]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        for m in messages:
            node = m.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + _record_bytes(m.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_error():
                continue
            node = r.metadata.src_node_id
            self.up[node] = self.up.get(node, 0) + _record_bytes(r.content)
            if "cost" in r.content:  # the training step's own measurements
                self.costs[node] = dict(r.content["cost"])
        return replies


def _secure_mean_strategy(
    messages: dict[int, FedftMessage], names: list[str], grid: Any, extra: dict[str, Any]
):
    """The legacy Strategy the SecAgg+ workflow asks: the train requests to send, and where to
    put the unmasked mean it hands back."""
    from flwr.common import FitIns, ndarray_to_bytes, parameters_to_ndarrays
    from flwr.common import Parameters as LegacyParameters
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy

    class SecureMean(Strategy):
        def __init__(self) -> None:
            self.mean: list[Any] | None = None
            self.scalars: dict[int, dict[str, Any]] = {}

        def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001
            out = []
            for node, m in messages.items():
                tensors = [ndarray_to_bytes(m.payload.tensors[n].numpy()) for n in names]
                config = {
                    **m.payload.scalars,
                    **extra,
                    "client": m.client,
                    "round": m.round,
                    "kind": m.kind,
                    "fedft.names": "\n".join(names),  # a legacy config holds no lists
                }
                fit = FitIns(LegacyParameters(tensors=tensors, tensor_type="numpy.ndarray"), config)
                out.append((GridClientProxy(node, grid, 0), fit))
            return out

        def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001
            if results:  # the workflow gives every result the one unmasked mean
                self.mean = parameters_to_ndarrays(results[0][1].parameters)
            for proxy, fit in results:
                self.scalars[proxy.node_id] = dict(fit.metrics)
            return None, {}

        def initialize_parameters(self, client_manager):  # noqa: ANN001
            return None

        def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001
            return []

        def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001
            return None, {}

        def evaluate(self, server_round, parameters):  # noqa: ANN001
            return None

    return SecureMean()


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


def answer_in_process(content: RecordDict, context: Context) -> RecordDict:
    """Answer a request with a runtime of this process (`fedft-warm=false`, or simulation)."""
    meta = dict(content["meta"])
    client = node_client(context)
    runtime = _client_runtime(context)
    request = FedftMessage(client, str(meta["kind"]), from_records(content), int(meta["round"]))
    # The state lives in context.state; the runtime holds it only for this request, so a runtime
    # shared by many virtual clients does not keep a copy of each one's state.
    runtime.states[client] = load_client_state(context.state)
    try:
        with measure(runtime.device, runtime.cfg.federation.count_flops) as m:
            payload = runtime.handle(request)
        save_client_state(runtime.states[client], context.state)
    finally:
        runtime.states.pop(client, None)
    answer = to_records(payload, {"client": int(meta["client"])})
    answer["cost"] = MetricRecord(
        {
            "seconds": m.seconds,
            "peak_rss_bytes": m.peak_rss_bytes,
            "peak_cuda_bytes": m.peak_cuda_bytes,
            "flops": float(m.flops),
        }
    )
    return answer
