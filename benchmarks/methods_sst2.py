"""Every FedPEFT method on a fixed SST-2 subset, 10 clients, plus centralized references.

Accuracy is on the full SST-2 validation set (872 rows). Seconds per round are the median over
the run's rounds; memory is the client's peak RSS (process high-water mark, reset per client step).
"""

from __future__ import annotations

from pathlib import Path

from common import (
    DOC,
    SHARED,
    format_lr,
    machine,
    median_round_seconds,
    plot_accuracy_vs_mb,
    run_job,
    write_section,
)

METHODS = ["full", "head", "bias", "adapter", "prompt", "lora"]
COMMON = {
    "model.name": "minilm",
    "model.max_length": 48,
    "data.max_train_samples": 2000,
    "federation.clients": 10,
    "federation.rounds": 5,
    "federation.sample_fraction": 0.5,
    "data.partition": "dirichlet",
    "data.alpha": 0.5,
    "train.batch_size": 16,
    "train.epochs": 1,
}
CENTRAL = {
    "federation.clients": 1,
    "federation.rounds": 3,
    "federation.sample_fraction": 1.0,
    "data.partition": "iid",
    "data.local_test_fraction": 0.0,
}


def run(out_dir: Path) -> str:
    data = SHARED / "sst2"
    if not data.is_dir():
        raise SystemExit("benchmarks need ../shared/data/sst2 beside the project")
    rows = []
    for method in METHODS:
        summary, metrics = run_job(
            f"sst2-{method}", out_dir, {**COMMON, "data.source": data, "method.name": method}
        )
        rows.append(
            (method, "10 clients, Dirichlet 0.5, 5 of 10 per round, 5 rounds", summary, metrics)
        )
    for method in ("lora", "full"):
        summary, metrics = run_job(
            f"sst2-central-{method}",
            out_dir,
            {**COMMON, **CENTRAL, "data.source": data, "method.name": method},
        )
        rows.append(
            (f"{method} (centralized)", "1 client with all 2,000 rows, 3 epochs", summary, metrics)
        )
    full_up = next(s["bytes_up_per_client_per_round"] for m, _, s, _ in rows if m == "full")
    lines = [
        "## FedPEFT methods on SST-2 (MiniLM, 10 clients)",
        "",
        f"Machine: {machine()}.",
        "",
        "Setup: all-MiniLM-L6-v2, a fixed 2,000-row subset of SST-2 train (seed 0), test on the 872-row",
        "validation set; 10 clients, Dirichlet alpha 0.5; each round 5 clients train 1 local epoch",
        "(batch 16, AdamW at each method's default learning rate, the lr column); FedAvg. Bytes are counted from the",
        "tensors each client sent; seconds per round are medians over the run's rounds, wall clock of",
        "the whole round including the global evaluation; memory is the client step's peak RSS.",
        "",
        "| method | setting | lr | final acc. | best acc. | trainable params | uplink / client / round | share of full | total MB (up+down) | client peak RSS | s / round (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, setting, s, metrics in rows:
        up = s["bytes_up_per_client_per_round"]
        lines.append(
            f"| {method} | {setting} | {format_lr(s['lr'])} | {100 * s['final_accuracy']:.1f}% | {100 * s['best_accuracy']:.1f}% | "
            f"{s['trainable_params']:,} | {up / 1e6:.3f} MB | {100 * up / full_up:.2f}% | {s['total_mb']:.1f} | "
            f"{s['client_peak_rss_mb']:.0f} MB | {median_round_seconds(metrics):.1f} |"
        )
    plot = DOC.parent / "benchmarks_methods_sst2.png"
    plot_accuracy_vs_mb(
        {m: metrics for m, _, _, metrics in rows},
        plot,
        "SST-2, MiniLM: accuracy against bytes sent",
    )
    lines += [
        "",
        f"![accuracy against MB sent]({plot.name})",
        "",
        "Regenerate with `python benchmarks/run.py methods` (about 15 minutes on 2 CPU cores).",
    ]
    body = "\n".join(lines)
    write_section("methods", body)
    return body
