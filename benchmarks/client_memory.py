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
    ("zo-tiny", 200): 766,
    ("zo-minilm", 10): 1878,
    ("zo-minilm", 200): 3686,
    ("sfprompt-minilm", 10): 1378,
    ("sfprompt-minilm", 200): 1884,
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


def render(results: dict[tuple[str, int], dict], trainable: dict[str, float]) -> str:
    """The section from measured peaks (`results[key, clients]`) and each run's trainable MB."""
    small_n, large_n = CLIENTS[0], CLIENTS[-1]
    took_part = min(large_n, ROUNDS * PER_ROUND)  # clients of the large run that ever trained
    rows = []
    for key, label, _ in CONFIGS:
        small, large = results[key, small_n]["peak_rss_mb"], results[key, large_n]["peak_rss_mb"]
        was_small, was_large = BEFORE.get((key, small_n)), BEFORE.get((key, large_n))
        if was_small is None or was_large is None:
            was, per = "-", "-"
        else:
            was = f"{was_small:.0f} / {was_large:.0f}"
            per = f"{(was_large - was_small) / (took_part - small_n):.1f}"
        rows.append(
            f"| {label} | {trainable[key]:.1f} | {small:.0f} | {large:.0f} | "
            f"{large - small:+.0f} | {was} | {per} |"
        )
    table = "\n".join(rows)
    return f"""## Memory of a simulated federation: {small_n} against {large_n} clients

What a simulated client costs on the local engine, where one process holds the whole federation:
the process's peak RSS (the kernel's high-water mark VmHWM over the whole run: server, model,
data and every client's state) with {small_n} and with {large_n} clients. SST-2 rows, IID,
{ROWS_PER_CLIENT} rows per client (a share held out as its local test), sequence length 32, one
local step of batch 8 (`sfprompt`: one phase-1 step and one split step), {ROUNDS} rounds of
{PER_ROUND} clients, 64 test rows, each method's default learning rate. So {took_part} clients
of the {large_n}-client run take part, against {small_n}. `zo`: `seeds` mode, all weights.
`sfprompt`: head = embeddings + 1 block + 20 prompts, tail = 1 block + pooler + classifier (the
process also holds the server's whole model). Each run in a fresh process;
`python benchmarks/run.py client-memory` (about 2 minutes on 2 CPU cores).

Machine: {machine()}.

| run | trainable MB per client | peak RSS, {small_n} clients (MB) | peak RSS, {large_n} clients (MB) | {large_n} - {small_n} (MB) | before: {small_n} / {large_n} clients (MB) | before: MB per client that took part |
|---|---|---|---|---|---|---|
{table}

"Before" is this script, same settings and machine, at commit {BEFORE_COMMIT}: each `zo` client
then kept its own copy of the weights it last synced (91 MB each on MiniLM), and each
`sfprompt` client kept its tail and prompts and both Adam moments of them after its round (about
three times the trainable MB). Now the clients of a process share one copy of the version they
synced (a client past it keeps only its version number; the copy plus the records the server
sends rebuild its target), and a `sfprompt` client's state is emptied when its round ends (nothing
in it carries to the next round). The peak no longer grows with the number of clients, though
the larger run holds twenty times the rows: the {large_n} - {small_n} column is the allocator's
noise (a few tens of MB, either sign).
"""


def run(out_dir: Path) -> str:
    if not (SHARED / "sst2").is_dir():
        raise SystemExit("benchmarks need ../shared/data/sst2 beside the project")
    results = {(k, n): measure_job(k, n, out_dir) for k, _, _ in CONFIGS for n in CLIENTS}
    trainable = {key: trainable_mb(key) for key, _, _ in CONFIGS}
    saved = {f"{k}-{n}": r for (k, n), r in results.items()}
    (out_dir / "results.json").write_text(json.dumps({"runs": saved, "trainable_mb": trainable}))
    body = render(results, trainable)
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
