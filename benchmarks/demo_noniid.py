"""The built-in defaults (lora, MiniLM, demo data, 10 clients) under IID and Dirichlet partitions:
the same job, the same rounds, only the label skew across clients differs."""

from __future__ import annotations

from pathlib import Path

from common import (
    DOC,
    format_lr,
    machine,
    median_round_seconds,
    plot_accuracy_vs_mb,
    run_job,
    write_section,
)

PARTITIONS = {
    "IID": {"data.partition": "iid"},
    "Dirichlet 0.5 (default)": {"data.partition": "dirichlet", "data.alpha": 0.5},
}


def run(out_dir: Path) -> str:
    curves, lines = (
        {},
        [
            "## Non-IID on the built-in demo (the defaults)",
            "",
            f"Machine: {machine()}.",
            "",
            "`fedft run` defaults (all-MiniLM-L6-v2, built-in 8-class demo data, 10 clients, 5 per round,",
            "8 rounds, 1 local epoch, `lora`), with only the partition changed. Accuracy is on the 600-row",
            "global test set; the clients' column is their local test accuracy on the final model",
            "(weighted mean, worst client).",
            "",
            "| partition | lr | accuracy after round 1 / 4 / 8 | clients' local accuracy (worst) | total MB | s / round (median) |",
            "|---|---|---|---|---|---|",
        ],
    )
    for label, sets in PARTITIONS.items():
        name = "demo-" + sets["data.partition"]
        summary, metrics = run_job(name, out_dir, sets)
        curves[label] = metrics
        acc = {m["round"]: m["test_accuracy"] for m in metrics}
        ce = summary["client_eval"]
        lines.append(
            f"| {label} | {format_lr(summary['lr'])} | {100 * acc[1]:.1f}% / {100 * acc[4]:.1f}% / {100 * acc[8]:.1f}% | "
            f"{100 * ce['weighted_accuracy']:.1f}% ({100 * ce['min_accuracy']:.1f}%) | {summary['total_mb']:.1f} | "
            f"{median_round_seconds(metrics):.1f} |"
        )
    plot = DOC.parent / "benchmarks_demo_noniid.png"
    plot_accuracy_vs_mb(curves, plot, "demo data, lora: IID against Dirichlet 0.5")
    lines += [
        "",
        f"![accuracy against MB sent]({plot.name})",
        "",
        "Regenerate with `python benchmarks/run.py demo`.",
    ]
    body = "\n".join(lines)
    write_section("demo", body)
    return body
