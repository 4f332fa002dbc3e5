"""The same `lora` job on the local engine, on Flower's simulation engine and on a Flower
deployment on loopback (a SuperLink and one SuperNode per client), measured side by side."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import psutil

from fedft.federation.loopback import Federation

from common import SHARED, format_lr, machine, run_job, run_lr, write_section

CLIENTS = 4
SETS = {
    "model.name": "minilm",
    "model.max_length": 48,
    "data.max_train_samples": 800,
    "federation.clients": CLIENTS,
    "federation.rounds": 3,
    "federation.sample_fraction": 1.0,
    "data.partition": "dirichlet",
    "train.batch_size": 16,
    "method.name": "lora",
}


class TreeMemory:
    """Peak summed RSS of a set of process trees, sampled while a run goes on, and of the warm
    workers whose pid files are in `warm` (they leave the SuperNode's tree when the ClientApp
    process that started them exits)."""

    def __init__(self, pids: list[int], warm: Path):
        self.pids, self.warm, self.peak = pids, warm, 0

    def sample(self) -> None:
        total = 0
        workers = []
        for pid_file in self.warm.glob("*.pid"):
            try:
                workers.append(int(pid_file.read_text()))
            except (OSError, ValueError):
                continue
        for pid in [*self.pids, *workers]:
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    total += proc.memory_info().rss
            except psutil.Error:
                continue
        self.peak = max(self.peak, total)


def flower_job(
    name: str, out_dir: Path, simulation: bool, sets: dict | None = None, clients: int = CLIENTS
) -> tuple[dict, float, int]:
    """One run on a fresh Flower federation of `clients` nodes (or Ray's virtual clients): its
    summary, wall time from starting the SuperLink, and the federation's peak summed RSS."""
    work = out_dir / f"{name}-federation"
    shutil.rmtree(work, ignore_errors=True)
    fed = Federation(work, simulation=simulation)
    sets = {**(sets or SETS), "data.source": str(SHARED / "sst2"), "name": name,
            "output_dir": str(out_dir)}  # fmt: skip
    shutil.rmtree(out_dir / name, ignore_errors=True)
    print(f"[bench] {name}: Flower {'simulation' if simulation else 'deployment'}", flush=True)
    try:
        start = time.perf_counter()
        fed.start_superlink()
        if not simulation:
            for c in range(clients):
                fed.start_supernode(f"node{c}", f"partition-id={c} num-partitions={clients}")
        memory = TreeMemory([p.pid for p in fed.procs.values()], Path(fed.env["FEDFT_WARM_DIR"]))
        run_id = fed.run_app(
            'fedft-set="' + "; ".join(f"{k}={v}" for k, v in sets.items()) + '"',
            federation_config=f"num-supernodes={clients} client-resources-num-cpus=1"
            if simulation
            else None,
        )
        while True:
            memory.sample()
            status = fed.status(run_id)
            if status.startswith("finished"):
                break
            time.sleep(0.5)
        wall = time.perf_counter() - start
        if status != "finished:completed":
            raise SystemExit(f"[bench] {name} ended {status}:\n{fed.logs(run_id)[-2000:]}")
    finally:
        fed.stop()
    summary = json.loads((out_dir / name / "summary.json").read_text())
    summary["lr"] = run_lr(out_dir / name)
    print(f"[bench] {name}: accuracy {summary['final_accuracy']:.4f}, {wall:.0f} s", flush=True)
    return summary, wall, memory.peak


def local_job(out_dir: Path) -> tuple[dict, float, int]:
    start = time.perf_counter()
    summary, _ = run_job("engines-local", out_dir, {**SETS, "data.source": SHARED / "sst2"})
    return summary, time.perf_counter() - start, int(summary["client_peak_rss_mb"] * 1e6)


def run(out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        ("local (one process)", *local_job(out_dir)),
        (
            "Flower simulation (Ray, 4 virtual clients)",
            *flower_job("engines-simulation", out_dir, simulation=True),
        ),
        (
            "Flower deployment (SuperLink + 4 SuperNodes on 127.0.0.1)",
            *flower_job("engines-deployment", out_dir, simulation=False),
        ),
    ]
    lines = [
        "## One job on three engines",
        "",
        f"Machine: {machine()}.",
        "",
        "`lora` on all-MiniLM-L6-v2, 4 clients (Dirichlet 0.5 over an 800-row SST-2 subset), all 4",
        "clients every round, 3 rounds, 1 local epoch, batch 16; test on the 872-row validation set.",
        "Wall time runs from start (for Flower: starting the SuperLink) to the end of the run, in one",
        "run of the benchmark. Peak memory: for the local engine the process's peak RSS; for Flower",
        "the peak of the summed RSS of every process of the federation (SuperLink, SuperNodes, the",
        "ServerApp and ClientApp processes, the nodes' warm workers, Ray's workers), sampled every",
        "0.5 s. Flower starts a ClientApp process per message in a deployment; fedft's is light and",
        "hands the message to the node's warm worker, which loaded the model and data once (the",
        "4 partition nodes share one worker on this machine). The simulation reuses Ray workers.",
        "Bytes are counted from the tensors in the records sent.",
        "",
        "| engine | lr | wall time | s / round | clients' handler s / round (sum) | slowest client's s / round | peak memory | client step peak RSS | bytes per round (up+down) | final accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gaps: dict[str, tuple[float, float]] = {}
    for label, summary, wall, peak in rows:
        per_round = summary["total_bytes"] / summary["rounds_completed"]
        lines_of = out_dir / summary["name"] / "metrics.jsonl"
        metrics = [json.loads(x) for x in lines_of.read_text().splitlines()]
        round_s = statistics.median(m["round_seconds"] - m["eval_seconds"] for m in metrics)
        client_s = statistics.median(m["client_seconds_max"] for m in metrics)
        handlers = statistics.median(sum(c["seconds"] for c in m["per_client"]) for m in metrics)
        gaps[label] = (round_s, handlers)
        lines.append(
            f"| {label} | {format_lr(summary['lr'])} | {wall:.0f} s | {round_s:.1f} | "
            f"{handlers:.1f} | {client_s:.1f} | "
            f"{peak / 1e6:.0f} MB | {summary['client_peak_rss_mb']:.0f} MB | "
            f"{per_round / 1e6:.2f} MB | {100 * summary['final_accuracy']:.1f}% |"
        )
    deployment, local = rows[2], rows[0]
    d_round, d_handlers = gaps[deployment[0]]
    l_round, l_handlers = gaps[local[0]]
    lines += [
        "",
        f"The deployment took {deployment[2] / local[2]:.1f}x the local engine's wall time. "
        "Seconds a round leave out the global evaluation; a client's handler seconds are its "
        "work inside the warm worker (the 4 nodes share one worker, so their requests run one "
        "after another, as on the local engine). Where a deployment round goes: "
        f"{d_handlers:.1f} s of the clients' handlers against {l_handlers:.1f} s locally (the same "
        "work, slower on 2 cores shared with the 4 SuperNodes, their ClientApp processes, the "
        f"SuperLink and the ServerApp), and {d_round - d_handlers:.1f} s outside them "
        f"({l_round - l_handlers:.1f} s locally): Flower 1.41's message round trips. Its "
        "ServerApp grid asks the SuperLink for replies every 3 s (`http_grid.send_and_receive`) "
        "and an idle SuperNode asks for messages every 3 s (`start_client_internal`), so an "
        "exchange waits 0 to 6 s on polling alone, and a fresh ClientApp process starts for "
        "each message. Within 2x of the local engine would need both the handlers' contention "
        "and that polling to go; the polling intervals are fixed in Flower 1.41's code.",
    ]
    lines += [
        "",
        "Regenerate with `python benchmarks/run.py engines` (about 8 minutes on 2 CPU cores).",
    ]
    body = "\n".join(lines)
    write_section("engines", body)
    return body
