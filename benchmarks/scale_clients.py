"""Scale: the cost of a run against the number of clients that exist, at the same work a round.

Every method that runs on the local engine, with 10, 100, 1,000 and 10,000 clients, 5 of them a
round, on MiniLM and SST-2 with the default (Dirichlet 0.5) partition: the run process's peak RSS,
seconds a round and bytes a round. The bounds (issue: cost independent of the population): peak
RSS within 1.5x and seconds a round within 1.2x of the 10-client run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, SHARED, finished_with, in_child, machine, write_section

POPULATIONS = [10, 100, 1_000, 10_000]
ROUNDS = 4
BASE = {
    "model.name": "minilm",
    "model.max_length": 32,
    "data.source": str(SHARED / "sst2"),
    "data.max_train_samples": 30_000,  # 10,000 clients x min_partition_size 2, and more
    "data.max_test_samples": 200,
    "data.min_partition_size": 2,
    "federation.sample_count": 5,
    "federation.rounds": ROUNDS,
    "federation.eval_every": ROUNDS,
    "train.max_steps": 2,
    "train.batch_size": 16,
}
METHODS: dict[str, dict[str, object]] = {
    "head": {},
    "bias": {},
    "adapter": {},
    "prompt": {},
    "lora": {},
    "full": {},
    "zo": {},
    "sfprompt": {"method.head_blocks": 1, "method.tail_blocks": 1},
    "fedpft": {},
    "fedpt": {"data.server_rows": 50},
    "lora, DP sample eps 8": {
        "method.name": "lora",
        "privacy.mode": "sample",
        "privacy.epsilon": 8,
    },
    "bias, DP client eps 8": {
        "method.name": "bias",
        "privacy.mode": "client",
        "privacy.epsilon": 8,
    },
}

# The run in a child process that reports its own peak RSS at exit (the run's whole footprint:
# server, clients, data, per-client state).
CHILD = """
import json, resource, sys
from fedft.cli import main
code = main(sys.argv[1:])
print("FEDFT_PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(code)
"""


def one_run(name: str, out: Path, sets: dict[str, object]) -> dict[str, float]:
    """One run in its own process; its peak RSS is kept beside the run (`peak_rss_kb`) so that
    FEDFT_BENCH_REUSE=1 can read a finished run of the same settings back."""
    run_dir = out / name
    peak_file = run_dir / "peak_rss_kb"
    if (
        os.environ.get("FEDFT_BENCH_REUSE") == "1"
        and peak_file.exists()
        and finished_with(run_dir, sets)
    ):
        print(f"[bench] {name}: reusing the finished run in {run_dir}", flush=True)
        peak_kb = int(peak_file.read_text())
    else:
        args = [sys.executable, "-c", CHILD, "run", "--name", name, "--overwrite", "--quiet"]
        for key, value in {"output_dir": str(out), **sets}.items():
            args += ["--set", f"{key}={value}"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        print(f"[bench] {name}", flush=True)
        done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            err = done.stderr.strip()
            return {"error": err.splitlines()[-1] if err else "failed"}
        peak_kb = next(
            int(line.split()[1])
            for line in done.stdout.splitlines()
            if line.startswith("FEDFT_PEAK")
        )
        peak_file.write_text(str(peak_kb))
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # rounds after the first (which warms caches), without the final evaluation's seconds
    seconds = [m["round_seconds"] - m["eval_seconds"] for m in lines[1:]]
    return {
        "peak_mb": peak_kb / 1024,
        "seconds": statistics.median(seconds),
        "bytes": summary["total_bytes"] / len(lines),
    }


MINILM_BATCH = {"model.name": "minilm", "train.batch_size": 16}
SMOLLM2_BATCH = {"model.name": "smollm2", "train.batch_size": 8, "task.system_prompt": ""}
BATCHED = {  # the default batch sizes: MiniLM classification 16, SmolLM2 generation 8
    "MiniLM (SST-2, length 64), lora": {**MINILM_BATCH, "method.name": "lora"},
    "MiniLM (SST-2, length 64), prompt": {**MINILM_BATCH, "method.name": "prompt"},
    "SmolLM2 (SST-2 label words, length 64), lora": {**SMOLLM2_BATCH, "method.name": "lora"},
    "SmolLM2 (SST-2 label words, length 64), prompt": {**SMOLLM2_BATCH, "method.name": "prompt"},
}
BATCH_K, BATCH_STEPS, BATCH_REPEATS = 5, 4, 3


def batched_speed(sets: dict[str, object]) -> dict[str, float]:
    """In a child process: k clients' rounds (lora or prompt) one after another, then the same k
    in one forward pass a step, interleaved `BATCH_REPEATS` times; client-steps per second,
    medians."""
    import time

    import torch

    from fedft.config import build_config
    from fedft.federation.batched import train_batched
    from fedft.federation.engine import build_task
    from fedft.federation.training import read_state, train_locally, write_state

    torch.set_num_threads(2)
    base = {
        "data.source": str(SHARED / "sst2"),
        "data.max_train_samples": 2000,
        "data.partition": "iid",
        "federation.clients": 10,
        "train.max_steps": BATCH_STEPS,
        "model.max_length": 64,
    }
    task = build_task(build_config(base={**base, **sets}))
    names, cfg = task.method.trainable_names, task.cfg.train
    start = read_state(task.model, names)
    rows = [task.data.clients[c].train for c in range(BATCH_K)]
    alone, together = [], []
    for _ in range(BATCH_REPEATS):
        began = time.perf_counter()
        for c in range(BATCH_K):
            write_state(task.model, start)
            train_locally(task.model, names, task.data.train, rows[c], cfg, 1e-3, c, task.device)
        alone.append(time.perf_counter() - began)
        began = time.perf_counter()
        seeds = list(range(BATCH_K))
        train_batched(task.model, names, task.data.train, rows, [start] * BATCH_K, cfg, 1e-3,
                      seeds, task.device)  # fmt: skip
        together.append(time.perf_counter() - began)
    steps = BATCH_K * BATCH_STEPS
    return {
        "sequential": steps / statistics.median(alone),
        "batched": steps / statistics.median(together),
    }


def kept_measure(path: Path, label: str, settings: list, call: str) -> dict | None:
    """`call` of this module in a child process, kept in the JSON file `path` under `label` with
    its settings and read back under FEDFT_BENCH_REUSE=1 while they match; None if it failed."""
    kept = json.loads(path.read_text()) if path.exists() else {}
    key = json.dumps(settings, sort_keys=True)
    if os.environ.get("FEDFT_BENCH_REUSE") == "1" and kept.get(label, {}).get("key") == key:
        print(f"[bench] {label}: reusing", flush=True)
        return kept[label]["got"]
    try:
        got = in_child("scale_clients", call)
    except SystemExit as failed:
        print(failed, flush=True)
        return None
    kept[label] = {"key": key, "got": got}
    path.write_text(json.dumps(kept, indent=1))
    return got


EVAL_REPEATS = 3
# populations whose clients hold about 30 and about 3 test rows; 100 clients are scored in both
EVAL_CASES = [(method, clients) for clients in (100, 1_000) for method in ("prompt", "lora")]


def eval_speed(method: str, population: int) -> dict[str, float]:
    """In a child process: the final client evaluation of a `population` (the scale table's
    settings, the clients `federation.eval_clients` picks), each client's rows in forwards of
    their own, against all their rows in one pass (what the local engine does), interleaved
    `EVAL_REPEATS` times; medians, and the largest difference between the two in any client's
    metric."""
    import time

    import torch

    from fedft.config import build_config
    from fedft.federation.client import ClientRuntime
    from fedft.federation.engine import build_task, evaluation_clients, make_server
    from fedft.federation.payload import Message

    torch.set_num_threads(2)
    sets = {**BASE, "method.name": method, "federation.clients": population}
    task = build_task(build_config(base=sets))
    server = make_server(task)
    runtime = ClientRuntime(task.method, task.model, task.data, task.cfg, task.device)
    clients, _ = evaluation_clients(task)
    messages = [Message(c, "evaluate", server.evaluation_payload(c), 1) for c in clients]
    alone, together = [], []
    for _ in range(EVAL_REPEATS):
        began = time.perf_counter()
        singles = [runtime.handle(m).scalars for m in messages]
        alone.append(time.perf_counter() - began)
        began = time.perf_counter()
        joint = [p.scalars for p in runtime.handle_batch(messages)]
        together.append(time.perf_counter() - began)
    gap = max(abs(a[k] - b[k]) for a, b in zip(singles, joint, strict=True) for k in a)
    return {
        "clients": len(clients),
        "rows": sum(int(p["num_examples"]) for p in joint),
        "alone": statistics.median(alone),
        "together": statistics.median(together),
        "gap": gap,
    }


def eval_rows(out: Path) -> list[str]:
    """The joint evaluation's rows, kept in `out/eval.json` like `batched_rows`."""
    rows = [
        "| method | clients | scored | their test rows | a forward per client | one pass over all "
        "rows | speedup | largest metric difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, population in EVAL_CASES:
        got = kept_measure(
            out / "eval.json",
            f"{method}@{population}",
            [BASE, EVAL_REPEATS],
            f"eval_speed({method!r}, {population})",
        )
        if got is None:
            rows.append(f"| {method} | {population:,} | failed | | | | | |")
            continue
        rows.append(
            f"| {method} | {population:,} | {got['clients']} | {got['rows']:,} | "
            f"{got['alone']:.1f} s | "
            f"{got['together']:.1f} s | {got['alone'] / got['together']:.2f}x | {got['gap']:.1e} |"
        )
    return rows


def batched_rows(out: Path) -> list[str]:
    """The speedup rows; each measurement is kept in `out/batched.json` with its settings, and
    read back under FEDFT_BENCH_REUSE=1."""
    rows = [
        f"| model | batch | sequential client-steps / s | {BATCH_K} clients a forward pass | speedup |",
        "|---|---|---|---|---|",
    ]
    for label, sets in BATCHED.items():
        got = kept_measure(
            out / "batched.json",
            label,
            [sets, BATCH_K, BATCH_STEPS, BATCH_REPEATS],
            f"batched_speed({sets!r})",
        )
        if got is None:
            rows.append(f"| {label} | {sets['train.batch_size']} | failed | | |")
            continue
        rows.append(
            f"| {label} | {sets['train.batch_size']} | {got['sequential']:.2f} | "
            f"{got['batched']:.2f} | {got['batched'] / got['sequential']:.2f}x |"
        )
    return rows


def run(out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        "| method | clients | peak RSS | vs 10 | s / round | vs 10 | MB / round |",
        "|---|---|---|---|---|---|---|",
    ]
    misses = []
    for label, extra in METHODS.items():
        sets = {**BASE, "method.name": label.split(",")[0], **extra}
        base = None
        for clients in POPULATIONS:
            slug = label.replace(" ", "").replace(",", "-")
            got = one_run(f"scale-{slug}-{clients}", out, {**sets, "federation.clients": clients})
            if "error" in got:
                rows.append(f"| {label} | {clients:,} | failed: {got['error']} | | | | |")
                misses.append(f"{label} at {clients:,}: {got['error']}")
                continue
            base = base or got
            rss, sec = got["peak_mb"] / base["peak_mb"], got["seconds"] / base["seconds"]
            if rss > 1.5 or sec > 1.2:
                misses.append(f"{label} at {clients:,}: {rss:.2f}x RSS, {sec:.2f}x s / round")
            rows.append(
                f"| {label} | {clients:,} | {got['peak_mb']:.0f} MB | {rss:.2f}x | "
                f"{got['seconds']:.2f} | {sec:.2f}x | {got['bytes'] / 1e6:.2f} |"
            )
    verdict = (
        "Every run is within the bounds (1.5x RSS, 1.2x seconds a round)."
        if not misses
        else "Outside the bounds: " + "; ".join(misses) + "."
    )
    body = f"""
## Scale: 10 to 10,000 clients at the same work a round

Machine: {machine()}.

all-MiniLM-L6-v2 on {BASE["data.max_train_samples"]:,} SST-2 rows, Dirichlet 0.5 (min 2 rows a client), 5 clients a
round, {ROUNDS} rounds of 2 steps of batch 16 (length 32); the final client evaluation asks at most
`federation.eval_clients` = 100 clients. Peak RSS: the whole run process (server, clients, data,
per-client state). Seconds a round: the median of rounds 2 to {ROUNDS}, without the global
evaluation. One run each; seconds a round on 2 cores vary by about 10% from run to run. The rows
are fixed, so a client holds {BASE["data.max_train_samples"] // 10:,} of them on average at 10 clients and
{BASE["data.max_train_samples"] // 10_000:,} at 10,000: there its 2 steps are batches of its few rows, and a round can take less
time than at 10 clients (the bound asks only that it take no more).

{chr(10).join(rows)}

{verdict}

Many clients per forward pass (`federation.batch_clients`): {BATCH_K} clients' `lora` or `prompt`
rounds of {BATCH_STEPS} steps one after another, against the same clients in one forward pass a
step (each example through its own client's LoRA or prompt tokens, and head), in one process, interleaved {BATCH_REPEATS} times
(medians):

{chr(10).join(batched_rows(out))}

The final client evaluation scores the sampled clients' test rows in one pass (each client's
metrics from its own rows' figures; batches filled across clients, rows of similar length
together, each batch trimmed of the padding none of its rows uses) instead of a forward per
client; each client is still charged the model it is sent. Measured side by side (the table's
settings and its sample of at most 100 clients, the untuned model, {EVAL_REPEATS} interleaved
repeats, medians; the last column: the largest difference in any client's loss or accuracy
between the two):

{chr(10).join(eval_rows(out))}

Regenerate with `python benchmarks/run.py scale`.
"""
    write_section("scale", body)
    return body
