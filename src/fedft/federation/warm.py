"""A warm client runtime for a Flower deployment: one long-lived process per node source that
keeps the model and data loaded, so that a message does not pay for loading them again.

Flower 1.41's SuperNode starts a new ClientApp process for every message and the process exits
after its reply (`flwr.supernode.runtime.run_clientapp`), so nothing loaded in it outlives the
message: each one imported torch and transformers, read the model and tokenized the data again
(337 s for a job the local engine runs in 55 s). Here the ClientApp process stays light (flwr,
numpy and this module) and forwards the message to a worker process over a Unix socket in a
folder only this user can read; the hello exchange (or else the first message) of a source starts
the worker, which builds the runtime once and serves every later message of that source until it
has been idle for `fedft-warm-idle` seconds. Client state still lives in Flower's `context.state`:
it travels with each request and comes back with the reply, exactly as the in-process path reads
and writes it.

This module does not import `flwr` (the ClientApp side converts records to numpy arrays), nor
torch until a worker starts serving.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("fedft")

IDLE_SECONDS = 600.0  # node config fedft-warm-idle: a worker with no message for this long exits
START_SECONDS = 900.0  # how long a ClientApp waits for a new worker to load model and data
Request = dict[str, Any]


def runtime_key(run_config: dict[str, Any], node_config: dict[str, Any]) -> str:
    """What a node's runtime depends on: the run config and where its data comes from, not which
    client it is (the client travels with each request)."""
    source = (
        {"data-path": str(node_config["data-path"])}
        if "data-path" in node_config
        else {
            k: v
            for k, v in node_config.items()
            if k != "partition-id" and not k.startswith("fedft-")
        }
    )
    return json.dumps([dict(run_config), source], sort_keys=True, default=str)


def warm_dir() -> Path:
    """Sockets, keys, pid files and logs of this user's workers (`FEDFT_WARM_DIR` to choose)."""
    chosen = os.environ.get("FEDFT_WARM_DIR")
    folder = Path(chosen) if chosen else Path(tempfile.gettempdir()) / f"fedft-warm-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def worker_files(key: str) -> dict[str, Path]:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = warm_dir()
    return {
        name: folder / f"{digest}.{name}" for name in ("sock", "key", "pid", "log", "lock", "spec")
    }


# --- the ClientApp side -------------------------------------------------------------------------
def call(
    run_config: dict[str, Any],
    node_config: dict[str, Any],
    request: Request,
    start_seconds: float = START_SECONDS,
) -> Request:
    """Send one request to the worker of this source, starting the worker if none is up."""
    key = runtime_key(run_config, node_config)
    files = worker_files(key)
    answer = _try(files, request)
    if answer is None:
        _start_worker(files, run_config, node_config)
        deadline = time.monotonic() + start_seconds
        while answer is None:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the warm worker did not start in {start_seconds:.0f} s; see {files['log']}"
                )
            if not _alive(files):
                tail = files["log"].read_text()[-2000:] if files["log"].exists() else ""
                raise RuntimeError(f"the warm worker exited while starting:\n{tail}")
            time.sleep(0.2)
            answer = _try(files, request)
    if not answer["ok"]:
        raise RuntimeError(answer["error"])
    return answer


def prestart(run_config: dict[str, Any], node_config: dict[str, Any]) -> None:
    """Start this source's worker, if none is up, without waiting for it. The hello exchange
    calls it, so that the worker loads its model and data while the server loads its own (and
    evaluates the start), not only inside round 1's reply timeout (a worker's first start took
    over 20 s beside other jobs)."""
    _start_worker(worker_files(runtime_key(run_config, node_config)), run_config, node_config)


def _try(files: dict[str, Path], request: Request) -> Request | None:
    """The worker's answer, or None where no worker listens (yet)."""
    if not files["sock"].exists() or not files["key"].exists():
        return None
    try:
        conn = Client(str(files["sock"]), family="AF_UNIX", authkey=files["key"].read_bytes())
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    with conn:
        conn.send(request)
        return conn.recv()


def _alive(files: dict[str, Path]) -> bool:
    try:
        pid = int(files["pid"].read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _start_worker(
    files: dict[str, Path], run_config: dict[str, Any], node_config: dict[str, Any]
) -> None:
    """Start the source's worker unless another ClientApp process already did (a file lock
    makes the check and the start one step)."""
    with open(files["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _alive(files):
            return
        files["sock"].unlink(missing_ok=True)  # a dead worker's
        files["key"].write_bytes(secrets.token_bytes(32))
        os.chmod(files["key"], 0o600)
        idle = float(node_config.get("fedft-warm-idle", IDLE_SECONDS))
        spec = {"run_config": run_config, "node_config": node_config, "idle": idle}
        files["spec"].write_text(json.dumps(spec, default=str))
        with open(files["log"], "a") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedft.federation.warm", str(files["spec"])],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives the ClientApp process that started it
            )
        files["pid"].write_text(str(proc.pid))


def stop_workers(folder: Path) -> list[int]:
    """Stop every worker whose pid file is in `folder` (tests and benchmarks stop what they
    started); the pids signalled."""
    import signal

    stopped = []
    for pid_file in folder.glob("*.pid"):
        try:
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except (OSError, ValueError):
            pass
        pid_file.unlink(missing_ok=True)
    return stopped


def split_state(state: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A client's lasting state as arrays and scalars (what `context.state` can hold)."""
    import torch

    tensors = {k: v.detach().cpu().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if isinstance(v, int | float | str | bool)}
    other = sorted(set(state) - set(tensors) - set(scalars))
    if other:
        raise TypeError(
            f"client state {other}: only tensors and scalars persist between Flower messages"
        )
    return tensors, scalars


# --- the worker ---------------------------------------------------------------------------------
def config_from_run_config(run_config: dict[str, Any], extra: list[str] | None = None) -> Any:
    """The RunConfig of a Flower run config: `fedft-config` (a YAML file) and `fedft-set`
    (';'-separated overrides), then `extra`."""
    from fedft.config import build_config

    file = str(run_config.get("fedft-config", "") or "") or None
    sets = [s.strip() for s in str(run_config.get("fedft-set", "") or "").split(";") if s.strip()]
    return build_config(file, sets + (extra or []))


def build_runtime(run_config: dict[str, Any], node_config: dict[str, Any]) -> Any:
    """A node's ClientRuntime: its source's task, or (`data-path`) its own dataset as its one
    client's split, trained under the client id each request names."""
    from fedft.errors import FedftError
    from fedft.federation.client import ClientRuntime
    from fedft.federation.engine import build_task

    if "data-path" in node_config:
        # The node's own dataset is the whole of this client's data: the task partitions it for
        # one client; the runtime keeps the run's federation settings.
        source = f"data.source={node_config['data-path']}"
        cfg = config_from_run_config(run_config, [source])
        own = [source, "federation.clients=1", "data.partition=iid", "data.min_partition_size=1"]
        task = build_task(config_from_run_config(run_config, own))
        return ClientRuntime(
            task.method, task.model, task.data, cfg, task.device, split=task.data.clients[0]
        )
    cfg = config_from_run_config(run_config)
    partitions = int(node_config.get("num-partitions", cfg.federation.clients))
    if partitions != cfg.federation.clients:
        raise FedftError(
            f"node num-partitions={partitions} but federation.clients={cfg.federation.clients}"
        )
    task = build_task(cfg)
    return ClientRuntime(task.method, task.model, task.data, cfg, task.device)


def handle(runtime: Any, request: Request) -> Request:
    """One message on the warm runtime, measured as the in-process ClientApp measures it."""
    import torch

    from fedft.federation.payload import Message, Payload
    from fedft.metrics.measure import measure

    client = int(request["client"])
    state: dict[str, Any] = {k: torch.from_numpy(v.copy()) for k, v in request["state"].items()}
    state.update(request["state_scalars"])
    runtime.states[client] = state
    tensors = {k: torch.from_numpy(v.copy()) for k, v in request["tensors"].items()}
    message = Message(
        client, request["kind"], Payload(tensors, request["scalars"]), request["round"]
    )
    try:
        with measure(runtime.device, runtime.cfg.federation.count_flops) as m:
            payload = runtime.handle(message)
        state_tensors, state_scalars = split_state(runtime.states[client])
    finally:
        runtime.states.pop(client, None)
    return {
        "ok": True,
        "tensors": {k: v.detach().cpu().numpy() for k, v in payload.tensors.items()},
        "scalars": dict(payload.scalars),
        "state": state_tensors,
        "state_scalars": state_scalars,
        "cost": {
            "seconds": m.seconds,
            "peak_rss_bytes": m.peak_rss_bytes,
            "peak_cuda_bytes": m.peak_cuda_bytes,
            "flops": float(m.flops),
        },
    }


def serve(spec_file: Path) -> None:
    spec = json.loads(spec_file.read_text())
    key = runtime_key(spec["run_config"], spec["node_config"])
    files = worker_files(key)
    runtime = build_runtime(spec["run_config"], spec["node_config"])
    listener = Listener(str(files["sock"]), family="AF_UNIX", authkey=files["key"].read_bytes())
    os.chmod(files["sock"], 0o600)
    last = [time.monotonic()]

    def watch() -> None:  # exit once idle: nothing else ends a worker the node no longer uses
        while time.monotonic() - last[0] < spec["idle"]:
            time.sleep(min(5.0, spec["idle"] / 4))
        files["sock"].unlink(missing_ok=True)
        files["pid"].unlink(missing_ok=True)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    log.info("fedft warm worker %d serving %s", os.getpid(), files["sock"])
    while True:
        with listener.accept() as conn:
            last[0] = time.monotonic()
            request = conn.recv()
            try:
                answer = handle(runtime, request)
            except Exception as exc:  # the ClientApp raises it: Flower reports a client error
                traceback.print_exc()
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            conn.send(answer)
            last[0] = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description="fedft's warm client runtime (started by Flower)")
    parser.add_argument("spec", type=Path)
    logging.basicConfig(level=logging.INFO)
    serve(parser.parse_args().spec)


if __name__ == "__main__":
    main()
