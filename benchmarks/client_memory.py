"""Process peak RSS of a whole simulated federation on the local engine with 10 and 200 clients:
what a simulated client costs on top of the model, for `zo` on all weights (tiny-bert and MiniLM)
and `sfprompt` (MiniLM).

Each configuration runs in its own fresh process (so peaks do not mix). fedft's per-step
measurement resets the kernel's high-water mark (VmHWM) before every client step; the child turns
that reset into a no-op, so VmHWM read when the run ends is the peak of the whole process: the
server, every client's state, the model and the data (the per-step figures in its metrics are
then lifetime peaks too, which this benchmark does not use). The same number of
clients train each round in both sizes, so the only difference between the two columns is how
many clients have taken part, and what each of them keeps.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHARED, machine, write_section

CLIENTS = (10, 200)
ROWS_PER_CLIENT, ROUNDS, PER_ROUND = 10, 3, 10
COMMON: dict[str, object] = {
    "data.source": str(SHARED / "sst2"),
    "data.partition": "iid",
    "data.max_test_samples": 64,
    "model.max_length": 32,
    "federation.rounds": ROUNDS,
    "federation.sample_count": PER_ROUND,
    "federation.eval_every": ROUNDS,
    "train.batch_size": 8,
    "train.max_steps": 1,
}
SPLIT = {"method.head_blocks": 1, "method.tail_blocks": 1, "method.num_tokens": 20}
CONFIGS: list[tuple[str, str, dict[str, object]]] = [
    ("zo-tiny", "`zo`, all weights, tiny-bert", {"method.name": "zo", "model.name": "tiny-bert"}),
    ("zo-minilm", "`zo`, all weights, MiniLM", {"method.name": "zo", "model.name": "minilm"}),
    ("sfprompt-minilm", "`sfprompt`, MiniLM", {"method.name": "sfprompt", "model.name": "minilm"}),
]
CONFIGS = [
    (k, label, {**sets, **(SPLIT if k.startswith("sf") else {})}) for k, label, sets in CONFIGS
]

# Measured with this script on the same machine at commit 4690042, before clients shared their
# synced `zo` version and before `sfprompt` emptied a client's state after its round (MB).
BEFORE_COMMIT = "4690042"
BEFORE: dict[tuple[str, int], float] = {
    ("zo-tiny", 10): 687,
    ("zo-tiny", 200): 770,
    ("zo-minilm", 10): 1877,
    ("zo-minilm", 200): 3680,
    ("sfprompt-minilm", 10): 1405,
    ("sfprompt-minilm", 200): 1851,
}


def job_sets(key: str, clients: int) -> dict[str, object]:
    sets = next(s for k, _, s in CONFIGS if k == key)
    return {
        **COMMON,
        **sets,
        "federation.clients": clients,
        "data.max_train_samples": clients * ROWS_PER_CLIENT,
    }


def child(sets: dict[str, object], out_dir: str, name: str) -> dict:
    """Runs inside the child process: one `fedft run`, then the process's lifetime peak."""
    import fedft.metrics.measure as measure
    from fedft.cli import main

    measure._reset_hwm = lambda: True  # VmHWM stays the lifetime peak
    args = ["run", "--name", name, "--overwrite", "--quiet", "--set", f"output_dir={out_dir}"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    start = time.perf_counter()
    code = main(args)
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(code)
    summary = json.loads((Path(out_dir) / name / "summary.json").read_text())
    return {
        "peak_rss_mb": (measure._read_hwm() or 0) / 1e6,
        "seconds": seconds,
        "cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
        "accuracy": summary["final_accuracy"],
    }


def measure_job(key: str, clients: int, out_dir: Path, src: Path | None = None) -> dict:
    """One configuration in a fresh process; `src` runs another checkout's `src/` instead."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    sets = job_sets(key, clients)
    name = f"{key}-{clients}"
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(sets), str(out_dir), name],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"[bench] client-memory {name} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"[bench] client-memory {name}: {result['peak_rss_mb']:.0f} MB, "
        f"{result['seconds']:.0f} s ({result.get('cpu_seconds', 0):.0f} s CPU)",
        flush=True,
    )
    return result


def trainable_mb(key: str) -> float:
    """What one client's trainable state weighs (float32), from the task the run builds."""
    from fedft.config import build_config
    from fedft.federation.engine import build_task

    task = build_task(build_config(base={**job_sets(key, 10), "data.max_train_samples": 100}))
    return task.trainable_bytes / 1e6


def run(out_dir: Path) -> str:
    if not (SHARED / "sst2").is_dir():
        raise SystemExit("benchmarks need ../shared/data/sst2 beside the project")
    results = {(k, n): measure_job(k, n, out_dir) for k, _, _ in CONFIGS for n in CLIENTS}
    rows = []
    for key, label, _ in CONFIGS:
        small, large = results[key, CLIENTS[0]], results[key, CLIENTS[-1]]
        before = [BEFORE.get((key, n)) for n in CLIENTS]
        was = " / ".join(f"{b:.0f}" if b is not None else "-" for b in before)
        rows.append(
            f"| {label} | {trainable_mb(key):.1f} | {small['peak_rss_mb']:.0f} | "
            f"{large['peak_rss_mb']:.0f} | {large['peak_rss_mb'] - small['peak_rss_mb']:+.0f} | "
            f"{was} |"
        )
    table = "\n".join(rows)
    body = f"""## Memory of a simulated federation: 10 against 200 clients

What a simulated client costs on the local engine, one process for the whole federation: the
process's peak RSS (kernel high-water mark VmHWM over its whole life: server, model, data and
every client's state) of a run with {CLIENTS[0]} and with {CLIENTS[-1]} clients. SST-2 rows, IID,
{ROWS_PER_CLIENT} rows per client (a share held out as the client's local test), sequence
length 32, one local step of batch 8 (`sfprompt`: one step of phase 1 and one split step),
{ROUNDS} rounds of {PER_ROUND} clients each (so the
{CLIENTS[-1]}-client run has up to {ROUNDS * PER_ROUND} clients that took part, against
{CLIENTS[0]}), 64 test rows, each method's default learning rate. `zo`: `seeds` mode, all
weights. `sfprompt`: head = embeddings + 1 block + 20 prompts, tail = 1 block + pooler +
classifier (the process also holds the server's whole model). Each run in a fresh process;
`python benchmarks/run.py client-memory`.

Machine: {machine()}.

| run | trainable MB per client | peak RSS, {CLIENTS[0]} clients (MB) | peak RSS, {CLIENTS[-1]} clients (MB) | difference (MB) | before, {CLIENTS[0]} / {CLIENTS[-1]} clients (MB) |
|---|---|---|---|---|---|
{table}

"Before" is the same script at commit {BEFORE_COMMIT}, where every `zo` client kept its own copy
of the trainable weights it last synced, and every `sfprompt` client kept its tail, prompts and
both Adam moments of them after its round. Now the clients of a process share one copy of the
version they synced (a client past it keeps only its version number, and the newest records
rebuild its target from that copy), and a `sfprompt` client's state is emptied when its round
ends (nothing in it carries to the next round). What remains of the difference between the two
columns is the data (twenty times the rows) and the per-client bookkeeping.
"""
    write_section("client-memory", body)
    return body


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]), sys.argv[3], sys.argv[4])))
    elif len(sys.argv) == 3 and sys.argv[1] == "--before":
        # python benchmarks/client_memory.py --before /path/to/old/checkout/src
        out = ROOT / "runs" / "bench" / "client-memory-before"
        for key, _, _ in CONFIGS:
            for n in CLIENTS:
                measure_job(key, n, out, Path(sys.argv[2]))
    else:
        print(run(ROOT / "runs" / "bench" / "client-memory"))
