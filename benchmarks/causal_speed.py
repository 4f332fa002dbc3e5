"""Causal-LM training speed: SmolLM2 LoRA steps with and without gradient checkpointing, bf16
autocast and length-bucketed batches; seconds a step and peak RSS of a client alone, and what bf16
does to a short federated run's loss and Rouge-L against fp32."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

from common import SHARED, in_child, machine, run_job, write_section

REPEATS, WARMUP, MEASURED = 3, 1, 4
DATA = {
    "model.name": "smollm2",
    "model.max_length": 96,
    "task.system_prompt": "",
    "data.source": str(SHARED / "ag_news_headlines"),
    "data.label_column": "topic",
    "train.batch_size": 8,
}
RUN = {  # the short federated run of fp32 against bf16
    **DATA,
    "method.name": "lora",
    "data.partition": "iid",
    "data.max_train_samples": 400,
    "data.max_test_samples": 60,
    "task.eval_generations": 30,
    "task.max_new_tokens": 20,
    "task.client_eval_generations": 0,
    "federation.clients": 5,
    "federation.sample_count": 3,
    "federation.rounds": 3,
    "federation.eval_every": 3,
    "train.max_steps": 4,
}


def one_client(precision: str, checkpointing: bool, bucketed: bool) -> dict:
    """In a child process: one warm-up step, then the measured steps of one client's LoRA
    training on 64 headline rows (their real lengths), timed and measured."""
    import torch

    from fedft.config import build_config
    from fedft.federation.engine import build_task
    from fedft.federation.training import train_locally
    from fedft.metrics.measure import measure

    torch.set_num_threads(2)
    sets = {
        **DATA,
        "method.name": "lora",
        "data.max_train_samples": 64,
        "data.partition": "iid",
        "federation.clients": 1,
        "train.precision": precision,
        "train.gradient_checkpointing": checkpointing,
        "train.group_by_length": bucketed,
    }
    task = build_task(build_config(base=sets))
    rows = task.data.clients[0].train
    names = task.method.trainable_names
    args = (task.model, names, task.data.train, rows)
    warm = task.cfg.train.model_copy(update={"max_steps": WARMUP})
    train_locally(*args, warm, 1e-4, 0, task.device)
    timed = task.cfg.train.model_copy(update={"max_steps": MEASURED})
    with measure(task.device) as m:
        stats = train_locally(*args, timed, 1e-4, 1, task.device)
    return {
        "seconds": m.seconds / MEASURED,
        "peak_mb": m.peak_rss_bytes / 1e6,
        "loss": stats.mean_loss,
    }


def probe(precision: str, checkpointing: bool, bucketed: bool) -> dict:
    return in_child("causal_speed", f"one_client({precision!r}, {checkpointing}, {bucketed})")


def run(out: Path) -> str:
    rows = [
        "| precision | gradient checkpointing | length-bucketed batches | s / step | peak RSS | "
        "loss of the measured steps |",
        "|---|---|---|---|---|---|",
    ]
    base = None
    for precision, checkpointing, bucketed in itertools.product(
        ["fp32", "bf16"], [False, True], [True, False]
    ):
        found = [probe(precision, checkpointing, bucketed) for _ in range(REPEATS)]
        print(f"[bench] causal-speed {precision} {checkpointing} {bucketed}: {found}", flush=True)
        sec = statistics.median(r["seconds"] for r in found)
        peak = statistics.median(r["peak_mb"] for r in found)
        base = base or (sec, peak)
        rows.append(
            f"| {precision} | {'on' if checkpointing else 'off'} | {'on' if bucketed else 'off'} | "
            f"{sec:.2f} ({sec / base[0]:.2f}x) | {peak:.0f} MB ({peak / base[1]:.2f}x) | "
            f"{found[0]['loss']:.3f} |"
        )
    runs = {
        p: run_job(f"causal-{p}", out, {**RUN, "train.precision": p})[0] for p in ("fp32", "bf16")
    }
    quality = [
        "| precision | test loss | Rouge-L | seconds |",
        "|---|---|---|---|",
        *(
            f"| {p} | {s['final_loss']:.3f} | {100 * s['final_rouge_l']:.1f}% | {s['seconds']:.0f} |"
            for p, s in runs.items()
        ),
    ]
    body = f"""
## Causal-LM step speed: checkpointing, bf16, length buckets (SmolLM2 LoRA)

Machine: {machine()}.

One client's LoRA steps (r = 8 on q/v, AdamW) on SmolLM2-135M-Instruct over 64 AG News headline
rows of their real lengths (at most {DATA["model.max_length"]} tokens), batch {DATA["train.batch_size"]}, in a fresh process holding
only the client: {WARMUP} warm-up step, then {MEASURED} measured; peak RSS is the process's high-water mark
during them. Median of {REPEATS} processes. Ratios against the first row. bf16 is autocast of the
forward and the loss (weights, gradients and AdamW stay fp32); on a CPU without bf16 matrix
units it emulates, so it may be slower, not faster.

{chr(10).join(rows)}

bf16 against fp32 on a short federated run (5 clients IID, 3 a round, 3 rounds of 4 steps; 60
test rows, Rouge-L on 30 greedy answers of at most 20 tokens):

{chr(10).join(quality)}

Regenerate with `python benchmarks/run.py causal-speed`.
"""
    write_section("causal-speed", body)
    return body
