"""`fedpt` on SST-2 and AG News: the large model zero-shot, the small model tuned federatedly,
the proxy-tuned large model with and without server-side distillation, and `lora` on the large
model itself as the upper reference.

Large = all-MiniLM-L6-v2 (6 blocks) with a zero-shot head (cosine similarity of the mean-pooled
embedding to each label name's embedding); small = its first 2 blocks with the same kind of head.
One `fedpt` run gives three accuracies (large alone, small tuned alone, proxy-tuned large); client
peak memory is measured in a fresh process holding only the client's model.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from common import (
    SHARED,
    client_memory,
    format_lr,
    machine,
    minilm_iid_setup,
    run_job,
    write_section,
)

ROUNDS, ROWS = 5, 2000
COMMON = minilm_iid_setup(ROWS, ROUNDS)
DATASETS = [("sst2", "SST-2", "ag_news"), ("ag_news", "AG News", "sst2")]  # (data, label, public)


def run(out_dir: Path) -> str:
    for folder, _, _ in DATASETS:
        if not (SHARED / folder).is_dir():
            raise SystemExit(f"benchmarks need ../shared/data/{folder} beside the project")
    lines = [
        "## Federated proxy-tuning of a black-box large model (`fedpt`) on SST-2 and AG News",
        "",
        f"Machine: {machine()}.",
        "",
        f"Setup: 10 clients, IID over a fixed {ROWS:,}-row subset of each training set (seed 0); 5",
        f"clients per round; {ROUNDS} rounds; batch 16, 1 local epoch, AdamW (lr column); LoRA r = 8 on",
        "query/value + head. Large = all-MiniLM-L6-v2 with a zero-shot head (cosine similarity, scale",
        "20, to the label names' embeddings; never trained, only queried for logits). Small = its",
        "first 2 blocks with the same kind of head, which clients tune. Proxy-tuned: large + 1.0 ·",
        "(small tuned − small untuned). Distillation: after each round, 100 Adam steps (1e-3, batch 32)",
        "of KL at T = 2 from the proxy-tuned large model into the small one, on 1,000 texts of the",
        "other dataset (public, unlabeled; no client holds it). `lora` trains LoRA + a classifier on",
        "the large model. Accuracy on each test file (SST-2: 872 rows; AG News: 1,520) after the last",
        "round. `fedpt` scores what it deploys, the large model steered by the clients' aggregate of",
        "the last round, before that round's distillation; the distilled small model (which the next",
        "round's clients would start from) and its proxy are scored apart. Client peak RSS: a fresh",
        "process holding only the client's model runs one client's local epoch (median of 3).",
        "",
        "| data | model scored | lr | accuracy | client trains | client model MB | client peak RSS | MB / round | large-model queries |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for folder, label, public in DATASETS:
        data = {"data.source": SHARED / folder}
        plain = {
            **COMMON, **data, "method.name": "fedpt", "method.distill_steps": 0,
        }  # fmt: skip
        distilled = {**plain, "method.distill_steps": 100, "method.public_data": SHARED / public}
        reference = {**COMMON, **data, "method.name": "lora"}
        s_plain, m_plain = run_job(f"fedpt-{folder}-plain", out_dir, plain)
        s_dist, m_dist = run_job(f"fedpt-{folder}-distilled", out_dir, distilled)
        s_lora, m_lora = run_job(f"fedpt-{folder}-lora", out_dir, reference)
        small_peak, small_mb = client_memory(plain)
        large_peak, large_mb = client_memory(reference)

        def mb_round(metrics: list[dict]) -> float:
            return statistics.median(m["round_bytes"] for m in metrics) / 1e6

        def queries(summary: dict) -> str:
            proxy = summary["fedpt"]
            return f"{proxy['large_queries']:,} ({proxy['large_query_bytes'] / 1e6:.2f} MB)"

        last_plain, last_dist = m_plain[-1], m_dist[-1]
        small = f"small (2 blocks) | {small_mb:.1f} | {small_peak:.0f} MB"
        large = f"large (6 blocks) | {large_mb:.1f} | {large_peak:.0f} MB"
        lr_plain, lr_dist, lr_lora = (format_lr(s["lr"]) for s in (s_plain, s_dist, s_lora))
        lines += [
            f"| {label} | large model alone, zero-shot | - | {100 * last_plain['large_test_accuracy']:.1f}% | nothing | - | - | - | {queries(s_plain)} |",
            f"| {label} | small model tuned federatedly | {lr_plain} | {100 * last_plain['small_test_accuracy']:.1f}% | {small} | {mb_round(m_plain):.2f} | - |",
            f"| {label} | `fedpt`, proxy-tuned large | {lr_plain} | {100 * last_plain['test_accuracy']:.1f}% | {small} | {mb_round(m_plain):.2f} | {queries(s_plain)} |",
            f"| {label} | `fedpt` + distillation, proxy-tuned large (clients' aggregate) | {lr_dist} | {100 * last_dist['test_accuracy']:.1f}% (small alone {100 * last_dist['small_test_accuracy']:.1f}%) | {small} | {mb_round(m_dist):.2f} | {queries(s_dist)} |",
            f"| {label} | `fedpt` + distillation, proxy-tuned large (distilled small) | {lr_dist} | {100 * last_dist['distilled_test_accuracy']:.1f}% (small alone {100 * last_dist['distilled_small_test_accuracy']:.1f}%) | {small} | - | - |",
            f"| {label} | `lora` on the large model (upper reference) | {lr_lora} | {100 * s_lora['final_accuracy']:.1f}% | {large} | {mb_round(m_lora):.2f} | - |",
        ]
        kl = [
            f"{d['distill_kl_before']:.3f} → {d['distill_kl_after']:.3f}"
            for d in s_dist["fedpt"]["distillations"]
        ]
        lines.append(
            f"| {label} | held-out KL per round's distillation | | {'; '.join(kl)} | | | | | |"
        )
    lines += [
        "",
        "MB / round: the clients' bytes both ways, summed over the round's 5 clients (median over",
        "rounds): only the small model's LoRA and head for `fedpt`. Large-model queries: distinct",
        "inputs the large model was asked about in the whole run (it is frozen, so each input is asked",
        "once: the test texts, and the public texts when distilling), with the texts and logits they",
        "moved; they never involve a client.",
        "",
        "Regenerate with `python benchmarks/run.py fedpt` (about 15 minutes on 2 CPU cores).",
    ]
    body = "\n".join(lines)
    write_section("fedpt", body)
    return body
