"""LoRA aggregation strategies side by side: `mean` (FedAvg of A and B) against `exact` (the factor
means plus a dense residual, FedEx-LoRA), with one rank and with clients of ranks 4, 8 and 16;
SST-2, MiniLM, 10 clients, Dirichlet 0.5; 3 seeds each (mean ± std)."""

from __future__ import annotations

import statistics
from pathlib import Path

from common import SHARED, machine, run_job, write_section

SEEDS = (0, 1, 2)
COMMON = {
    "model.name": "minilm",
    "model.max_length": 48,
    "data.max_train_samples": 2000,
    "federation.clients": 10,
    "federation.rounds": 5,
    "federation.sample_fraction": 0.5,
    "federation.eval_every": 5,
    "data.partition": "dirichlet",
    "data.alpha": 0.5,
    "train.batch_size": 16,
    "train.epochs": 1,
    "method.name": "lora",
}
STRATEGIES = {  # row label: settings
    "mean, r = 8": {"method.aggregation": "mean", "method.r": 8},
    "exact, r = 8": {"method.aggregation": "exact", "method.r": 8},
    "mean, ranks 4/8/16": {
        "method.aggregation": "mean",
        "method.r": 16,
        "method.client_ranks": "[4,8,16]",
    },  # fmt: skip
    "exact, ranks 4/8/16": {
        "method.aggregation": "exact",
        "method.r": 16,
        "method.client_ranks": "[4,8,16]",
    },  # fmt: skip
}


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _verdict(what: str, mean: tuple[list, list], exact: tuple[list, list]) -> str:
    """`exact` against `mean` on the same seeds: the paired difference against its spread."""
    diffs = [e - m for e, m in zip(exact[0], mean[0], strict=True)]
    avg = statistics.mean(diffs)
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    beyond = abs(avg) > spread
    return (
        f"- {what}: `exact` {100 * statistics.mean(exact[0]):.1f}% against `mean` "
        f"{100 * statistics.mean(mean[0]):.1f}%; paired by seed, `exact` - `mean` = "
        f"{100 * avg:+.1f} ± {100 * spread:.1f} points, "
        f"{'beyond' if beyond else 'within'} the seeds' spread. `mean` drops "
        f"{100 * statistics.mean(mean[1]):.1f}% of the clients' mean weight change a round "
        f"(last round); `exact` carries it in the residual at the cost of the downlink above."
    )


def run(out: Path) -> str:
    data = SHARED / "sst2"
    if not data.is_dir():
        raise SystemExit("benchmarks need ../shared/data/sst2 beside the project")
    rows = [
        "| strategy | client ranks | accuracy (%, 3 seeds) | factor gap, last round | "
        "uplink / client / round | downlink / client / round | total MB (up + down) |",
        "|---|---|---|---|---|---|---|",
    ]
    results = {}
    for label, sets in STRATEGIES.items():
        runs = []
        for seed in SEEDS:
            name = f"sst2-lora-{label.replace(', ', '-').replace(' = ', '').replace('/', '-')}"
            name = f"{name.replace(' ', '-')}-seed{seed}"
            runs.append(run_job(name, out, {**COMMON, **sets, "data.source": data, "seed": seed}))
        accs = [s["final_accuracy"] for s, _ in runs]
        gaps = [m[-1]["lora_factor_gap"] for _, m in runs]
        up = statistics.mean(s["bytes_up_per_client_per_round"] for s, _ in runs)
        down = statistics.mean(
            statistics.mean(line["bytes_down_per_client"] for line in m) for _, m in runs
        )
        total = statistics.mean(s["total_mb"] for s, _ in runs)
        results[label] = (accs, gaps)
        ranks = sets.get("method.client_ranks", f"all {sets['method.r']}")
        rows.append(
            f"| {label.split(',')[0]} | {ranks} | {_mean_std(accs)} | "
            f"{_mean_std(gaps, 100, 1)}% | {up / 1e3:,.1f} kB | {down / 1e3:,.1f} kB | "
            f"{total:,.1f} |"
        )
    body = f"""
## LoRA aggregation: FedAvg of the factors against the exact mean

Machine: {machine()}.

Setup: all-MiniLM-L6-v2 with LoRA on query/value (alpha 16) and the classifier head, a fixed
2,000-row SST-2 subset over 10 clients (Dirichlet 0.5), 5 a round, 5 rounds of one local epoch
(batch 16, AdamW 1e-3); test on the 872-row validation set; seeds {", ".join(map(str, SEEDS))}
(partition, sampling and training all follow the seed). `mean` averages A and B apart;
`exact` keeps those means and sends every client a dense residual per adapted weight (384 x 384
floats each, 12 of them) so that the global model is the clients' weighted mean. Ranks 4/8/16:
client c trains rank 4, 8 or 16 by c mod 3, zero-padded in a rank-16 global adapter, each slot
averaged over the clients that hold it. Factor gap: ‖mean(s·B·A) − s·mean(B)·mean(A)‖ / ‖mean(s·B·A)‖
over the adapted weights (the clients' whole weight change; `mean` drops this share, `exact`
carries it in the residual).

{chr(10).join(rows)}

{_verdict("One rank", results["mean, r = 8"], results["exact, r = 8"])}
{_verdict("Ranks 4/8/16", results["mean, ranks 4/8/16"], results["exact, ranks 4/8/16"])}

Why the gaps differ: clients start each round from the same A, and a round of local training
moves A little, so with one rank mean(B)·mean(A) stays close to mean(B·A). With mixed ranks the
slots only the rank-16 clients hold are averaged over fewer clients, so the factor means weigh
those clients' updates more than their share of the rows.

Regenerate with `python benchmarks/run.py lora-aggregation` (12 runs of MiniLM).
"""
    write_section("lora-aggregation", body)
    return body


SMOLLM2 = {
    "model.name": "smollm2",
    "model.max_length": 64,
    "task.system_prompt": "",  # an empty system turn: SmolLM2's default one costs 16 tokens a row
    "data.max_train_samples": 800,
    "data.max_test_samples": 200,
    "data.partition": "dirichlet",
    "data.alpha": 0.5,
    "federation.clients": 10,
    "federation.sample_count": 5,
    "federation.rounds": 3,
    "federation.eval_every": 3,
    "train.batch_size": 8,
    "train.max_steps": 10,
    "method.name": "lora",
    "method.r": 8,
}


def run_smollm2(out: Path) -> str:
    """The two one-rank strategies on a generative model: SST-2 as label words on SmolLM2."""
    data = SHARED / "sst2"
    if not data.is_dir():
        raise SystemExit("benchmarks need ../shared/data/sst2 beside the project")
    rows = [
        "| strategy | accuracy | factor gap, per round | uplink / client / round | "
        "downlink / client / round | s / round |",
        "|---|---|---|---|---|---|",
    ]
    found = {}
    for strategy in ("mean", "exact"):
        sets = {**SMOLLM2, "data.source": data, "method.aggregation": strategy}
        summary, lines = run_job(f"smollm2-lora-{strategy}", out, sets)
        found[strategy] = summary["final_accuracy"]
        gaps = ", ".join(f"{100 * m['lora_factor_gap']:.1f}%" for m in lines)
        down = statistics.mean(m["bytes_down_per_client"] for m in lines)
        seconds = statistics.median(m["round_seconds"] - m["eval_seconds"] for m in lines)
        rows.append(
            f"| {strategy} | {100 * summary['final_accuracy']:.1f}% | {gaps} | "
            f"{summary['bytes_up_per_client_per_round'] / 1e6:.2f} MB | {down / 1e6:.2f} MB | "
            f"{seconds:.0f} |"
        )
    body = f"""
## LoRA aggregation on a generative model (SmolLM2, SST-2 as label words)

Machine: {machine()}.

Setup: SmolLM2-135M-Instruct with LoRA r = 8 on q/v (alpha 16), SST-2 as label words, 800
train rows over 10 clients (Dirichlet 0.5), 5 a round, 3 rounds of 10 steps of batch 8, AdamW
1e-3; 200 validation rows; one seed (a SmolLM2 run takes minutes here). `exact` adds a dense
residual per adapted weight (576 x 576 for q, 192 x 576 for v, 30 blocks) to each downlink.

{chr(10).join(rows)}

`exact` against `mean`: {100 * found["exact"]:.1f}% against {100 * found["mean"]:.1f}% (one seed).

Regenerate with `python benchmarks/run.py lora-aggregation-smollm2`.
"""
    write_section("lora-aggregation-smollm2", body)
    return body
