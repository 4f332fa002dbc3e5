"""`sfprompt` against `full` and `prompt` on SST-2 and AG News, with its two ablations.

Bytes per round are split into parameters (the tensors each method averages, both ways) and
activations (the head's outputs, the body's outputs and the two gradients of the split steps).
Client seconds are the sum of a client's exchanges in a round, averaged over the round's clients
and then the median over rounds. Peak memory is the process's peak RSS during a client's work on
the local engine; for `sfprompt` the same process also holds the server's copy of the whole
model, so the parameters a client holds are given too.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from common import SHARED, format_lr, machine, minilm_iid_setup, run_job, write_section

ROUNDS = 3
COMMON = minilm_iid_setup(1000, ROUNDS)
SPLIT = {"method.head_blocks": 1, "method.tail_blocks": 1, "method.num_tokens": 20}
RUNS = [
    ("full", {"method.name": "full"}),
    ("prompt", {"method.name": "prompt"}),
    ("sfprompt", {"method.name": "sfprompt", **SPLIT}),
    (
        "sfprompt, no pruning (γ = 1)",
        {"method.name": "sfprompt", **SPLIT, "method.keep_fraction": 1.0},
    ),
    ("sfprompt, no phase 1", {"method.name": "sfprompt", **SPLIT, "method.local_epochs": 0}),
]
DATASETS = [("sst2", "SST-2"), ("ag_news", "AG News")]


def client_parameters(method: str) -> int:
    """Parameters a client's model holds (the run's own process builds it the same way)."""
    from fedft.config import build_config
    from fedft.federation.engine import build_task

    sets = {**COMMON, "data.source": str(SHARED / "sst2"), "method.name": method}
    if method == "sfprompt":
        sets.update(SPLIT)
    sets["data.max_train_samples"] = 200
    task = build_task(build_config(base=sets))
    return sum(p.numel() for p in task.model.parameters())


def per_round(metrics: list[dict], key: str) -> float:
    return statistics.median(m.get(key, 0) for m in metrics)


def run(out_dir: Path) -> str:
    for folder, _ in DATASETS:
        if not (SHARED / folder).is_dir():
            raise SystemExit(f"benchmarks need ../shared/data/{folder} beside the project")
    held = {m: client_parameters(m) for m in ("full", "prompt", "sfprompt")}
    lines = [
        "## Split federated prompt tuning (`sfprompt`) on SST-2 and AG News (MiniLM, 10 clients)",
        "",
        f"Machine: {machine()}.",
        "",
        "Setup: all-MiniLM-L6-v2 (6 blocks), a fixed 1,000-row subset of each training set (seed 0),",
        f"IID over 10 clients; each round 5 clients train; {ROUNDS} rounds; batch 16, 1 local epoch,",
        "AdamW, each method's default learning rate (lr column). `sfprompt`: head = embeddings + 1 block + 20",
        "prompt tokens, body = 4 blocks (server), tail = 1 block + pooler + classifier; EL2N keeps",
        "half of each client's rows for the split phase; phase 1 is 1 epoch; 4 batches per exchange.",
        "Accuracy is on each test file (SST-2: the 872-row validation set; AG News: 1,520 rows).",
        "Per round: medians over the rounds; MB are both ways, summed over the round's clients.",
        "",
        "| data | method | lr | final acc. | parameter MB / round | activation MB / round | exchanges / round | client s / round | client peak RSS | server body s / round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for folder, label in DATASETS:
        for name, sets in RUNS:
            tag = (
                name.split(",")[0]
                + ("-nopruning" if "γ" in name else "")
                + ("-nophase1" if "phase 1" in name else "")
            )
            summary, metrics = run_job(
                f"sf-{folder}-{tag}",
                out_dir,
                {**COMMON, **sets, "data.source": SHARED / folder},
            )
            params_mb = (
                statistics.median(
                    m["bytes_up"] + m["bytes_down"] - m.get("activation_bytes", 0) for m in metrics
                )
                / 1e6
            )
            lines.append(
                f"| {label} | {name} | {format_lr(summary['lr'])} | {100 * summary['final_accuracy']:.1f}% | {params_mb:.1f} | "
                f"{per_round(metrics, 'activation_bytes') / 1e6:.1f} | "
                f"{per_round(metrics, 'exchanges'):.0f} | {per_round(metrics, 'client_seconds_mean'):.1f} | "
                f"{summary['client_peak_rss_mb']:.0f} MB | {per_round(metrics, 'server_body_seconds'):.1f} |"
            )
    lines += [
        "",
        "Parameters a client's model holds: "
        + "; ".join(f"`{m}` {n / 1e6:.1f}M" for m, n in held.items())
        + ". The `sfprompt` client has no body; MiniLM's word embeddings (11.7M) stay with it.",
        "Peak RSS is one process on the local engine: for `sfprompt` it also holds the server's",
        "whole model (the body the clients lack), so a `sfprompt` client alone needs less than shown.",
        "",
        "Regenerate with `python benchmarks/run.py sfprompt` (about 8 minutes on 2 CPU cores).",
    ]
    body = "\n".join(lines)
    write_section("sfprompt", body)
    return body
