"""`zo` on SST-2 with MiniLM and 10 clients: accuracy of zo on all weights, on LoRA, and with DP at
epsilon 2 and 8, next to `lora` backprop with the same rounds; uplink bytes of `seeds` mode against
`delta` mode and against `lora`; the rounds zo needs to come within 2 points of its final accuracy."""

from __future__ import annotations

import math
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

ROUNDS = 10
COMMON = {
    "model.name": "minilm",
    "model.max_length": 32,
    "data.max_train_samples": 2000,
    "data.partition": "iid",
    "federation.clients": 10,
    "federation.rounds": ROUNDS,
    "federation.sample_fraction": 0.5,
    "train.batch_size": 32,
    "train.epochs": 1,
}
DP = {"privacy.mode": "sample", "privacy.delta": 1e-5, "privacy.clip": 2.0}
RUNS = {
    "zo (all weights)": {"method.name": "zo", "method.params": "all"},
    "zo (LoRA)": {"method.name": "zo", "method.params": "lora"},
    "zo (LoRA), DP eps=8": {
        "method.name": "zo",
        "method.params": "lora",
        **DP,
        "privacy.epsilon": 8,
    },
    "zo (LoRA), DP eps=2": {
        "method.name": "zo",
        "method.params": "lora",
        **DP,
        "privacy.epsilon": 2,
    },
    "lora (backprop)": {"method.name": "lora"},
}
DELTA = {
    "method.name": "zo",
    "method.params": "lora",
    "method.mode": "delta",
    "federation.rounds": 2,
}


# The learning-rate sweep behind DEFAULT_LR in src/fedft/methods/zo/__init__.py: the benchmark's
# step (batch, sequence length, eps, directions, clients per round) on fewer rows and rounds, scored
# on a validation split held out of SST-2's train rows (SST-2's validation file, the benchmark's
# test set, is never read). Half-decade grids spanning 100x; all weights' grid went on up until
# the pick was no longer its top value.
SWEEP_ROUNDS, SWEEP_ROWS, SWEEP_VALIDATION = 3, 500, 500
SWEEP_LRS = {
    "lora": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "all": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
}
SWEEP_LABELS = {"lora": "LoRA + head", "all": "all weights"}


def sweep_sets(params: str, lr: float) -> dict[str, object]:
    return {
        **COMMON,
        "data.source": SHARED / "sst2" / "train.csv",  # no test file: data.test_fraction held out
        "data.max_train_samples": SWEEP_ROWS,
        "data.max_test_samples": SWEEP_VALIDATION,
        "federation.rounds": SWEEP_ROUNDS,
        "federation.eval_every": SWEEP_ROUNDS,
        "method.name": "zo",
        "method.params": params,
        "train.lr": lr,
    }


def sweep(out_dir: Path) -> str:
    """`python benchmarks/run.py zo-sweep`: zo's learning rate per parameter set."""
    if not (SHARED / "sst2" / "train.csv").is_file():
        raise SystemExit("benchmarks need ../shared/data/sst2 beside the project")
    scores: dict[str, dict[float, tuple[float, float, float]]] = {}
    for params, lrs in SWEEP_LRS.items():
        scores[params] = {}
        for lr in lrs:
            name = f"zo-sweep-{params}-{format_lr(lr)}"
            s, _ = run_job(name, out_dir, sweep_sets(params, lr))
            used = s["lr"]
            if abs(used - lr) > 1e-12 * lr:
                raise SystemExit(f"[bench] {name} ran at lr {used}, not {lr}")
            scores[params][used] = (s["final_accuracy"], s["final_loss"], s["seconds"])
    best = {params: pick_lr(row) for params, row in scores.items()}
    lines = [
        "## `zo`'s default learning rates: a sweep on SST-2 (MiniLM, 10 clients)",
        "",
        f"Machine: {machine()}.",
        "",
        "Setup: the `zo` benchmark's step (all-MiniLM-L6-v2, IID over 10 clients, 5 per round, 1",
        "local epoch of batch 32, sequence length 32, SPSA with one direction and eps 1e-3, `seeds`",
        f"mode) on a shorter budget: {SWEEP_ROWS:,} train rows (about 2 steps per client per round against",
        f"the benchmark's 6) and {SWEEP_ROUNDS} rounds against {ROUNDS}. Scored on a validation split that is",
        "not the benchmark's test set: `data.source` is SST-2's `train.csv` alone, so fedft holds out",
        f"`data.test_fraction` (20%) of its rows, seeded; {SWEEP_VALIDATION:,} of those are scored, and the",
        "train rows are drawn from the rest. SST-2's validation file (the benchmark's test set) is not",
        "read. Each row's learning rate is read back from the run's `config.yaml`. The pick (bold) is",
        "the lowest validation loss among the runs whose validation accuracy is within one standard",
        f"error ({SWEEP_VALIDATION:,} rows) of the best accuracy; `DEFAULT_LR` in",
        "`src/fedft/methods/zo/__init__.py` holds it. The grids are half-decade steps; the",
        "all-weights grid was extended upward (3e-3, then 1e-2) while its top value was the pick.",
        "",
        "| parameter set | lr | validation acc. | validation loss | run seconds |",
        "|---|---|---|---|---|",
    ]
    for params, row in scores.items():
        for lr, (acc, loss, seconds) in row.items():
            mark = "**" if lr == best[params] else ""
            lines.append(
                f"| {SWEEP_LABELS[params]} | {mark}{format_lr(lr)}{mark} | {mark}{100 * acc:.1f}%{mark} | "
                f"{loss:.4f} | {seconds:.0f} |"
            )
    lines += [
        "",
        "Picked: "
        + "; ".join(f"{SWEEP_LABELS[p]} {format_lr(lr)}" for p, lr in best.items())
        + ".",
        "",
        "Regenerate with `python benchmarks/run.py zo-sweep`.",
    ]
    body = "\n".join(lines)
    write_section("zo-sweep", body)
    return body


def pick_lr(row: dict[float, tuple[float, float, float]]) -> float:
    """The learning rate with the lowest validation loss among those whose validation accuracy is
    within one standard error of the best: at this budget accuracy barely separates them."""
    top = max(acc for acc, _, _ in row.values())
    se = math.sqrt(top * (1 - top) / SWEEP_VALIDATION)
    tied = [lr for lr, (acc, _, _) in row.items() if acc >= top - se]
    return min(tied, key=lambda lr: row[lr][1])


def rounds_to_within(metrics: list[dict], points: float = 0.02) -> int | None:
    """First round from which accuracy stays within `points` of the run's final accuracy."""
    evals = [m for m in metrics if m.get("test_accuracy") is not None]
    if not evals:
        return None
    final = evals[-1]["test_accuracy"]
    for i, m in enumerate(evals):
        if all(abs(e["test_accuracy"] - final) <= points for e in evals[i:]):
            return m["round"]
    return evals[-1]["round"]


def run(out_dir: Path) -> str:
    data = SHARED / "sst2"
    if not data.is_dir():
        raise SystemExit("benchmarks need ../shared/data/sst2 beside the project")
    results = {}
    for label, sets in RUNS.items():
        slug = label.replace(" ", "").replace("(", "-").replace(")", "").replace(",", "-")
        slug = slug.replace("=", "").lower()
        results[label] = run_job(f"zo-{slug}", out_dir, {**COMMON, "data.source": data, **sets})
    delta, _ = run_job("zo-lora-delta", out_dir, {**COMMON, "data.source": data, **DELTA})
    lr = {label: format_lr(s["lr"]) for label, (s, _) in results.items()}  # from each config.yaml
    lines = [
        "## Forward-only `zo` on SST-2 (MiniLM, 10 clients)",
        "",
        f"Machine: {machine()}.",
        "",
        f"Setup: all-MiniLM-L6-v2, 2,000 SST-2 train rows split IID over 10 clients, 5 per round, "
        f"{ROUNDS} rounds, 1 local epoch of batch 32 (about 6 steps), sequence length 32; test on the 872-row",
        "validation set. `zo` is seeded SPSA (one direction per step, eps 1e-3) in `seeds` mode at its",
        f"default learning rates, chosen by the sweep below: {lr['zo (all weights)']} on all weights,",
        f"{lr['zo (LoRA)']} on LoRA + head. DP clips each example's scalar to C = 2 and calibrates the",
        "noise per client over every round it could join (delta 1e-5, RDP). `lora` backprop is AdamW",
        f"at {lr['lora (backprop)']} with the same rounds and batches. The lr column is read back from",
        "each run's `config.yaml`.",
        "",
        "| run | lr | final acc. | best acc. | rounds to within 2 points of final | uplink / client / round | downlink / client / round | epsilon spent (worst client) | client peak RSS | s / round (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, (s, metrics) in results.items():
        eps = (s.get("privacy") or {}).get("epsilon_max")
        lines.append(
            f"| {label} | {lr[label]} | {100 * s['final_accuracy']:.1f}% | {100 * s['best_accuracy']:.1f}% | "
            f"{rounds_to_within(metrics)} | {s['bytes_up_per_client_per_round']:,.0f} B | "
            f"{s['bytes_down_per_client_per_round']:,.0f} B | {'-' if eps is None else f'{eps:.2f}'} | "
            f"{s['client_peak_rss_mb']:.0f} MB | {median_round_seconds(metrics):.1f} |"
        )
    seeds_up = results["zo (LoRA)"][0]["bytes_up_per_client_per_round"]
    lora_up = results["lora (backprop)"][0]["bytes_up_per_client_per_round"]
    delta_up = delta["bytes_up_per_client_per_round"]
    all_up = results["zo (all weights)"][0]["bytes_up_per_client_per_round"]
    lines += [
        "",
        "Uplink per client per round, counted from what was sent:",
        "",
        "| mode | uplink / client / round | against `seeds` |",
        "|---|---|---|",
        f"| `zo` seeds (LoRA parameter set) | {seeds_up:,.0f} B | 1x |",
        f"| `zo` seeds (all weights) | {all_up:,.0f} B | {all_up / seeds_up:.2f}x |",
        f"| `zo` delta (LoRA parameter set) | {delta_up:,.0f} B | {delta_up / seeds_up:,.0f}x |",
        f"| `lora` backprop | {lora_up:,.0f} B | {lora_up / seeds_up:,.0f}x |",
        "",
        "In `seeds` mode a client sends 12 bytes per step (an int64 seed and a float32 scalar) plus",
        "its scalars, whatever the parameter set; the downlink is the round records it missed.",
    ]
    plot = DOC.parent / "benchmarks_zo_sst2.png"
    plot_accuracy_vs_mb(
        {label: m for label, (_, m) in results.items()}, plot, "SST-2, MiniLM: zo against lora"
    )
    lines += ["", f"![accuracy against MB sent]({plot.name})", ""]
    lines.append("Regenerate with `python benchmarks/run.py zo` (about 20 minutes on 2 CPU cores).")
    body = "\n".join(lines)
    write_section("zo", body)
    return body
