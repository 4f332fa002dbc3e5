"""`fedpft` against `lora` on the full model and against Offsite-Tuning's plain layer-drop
emulator, on SST-2 with MiniLM and 10 clients.

Accuracy is the full model's at the end (the LoRA and head learned on the sub-model plugged back
in); the sub-model's own accuracy is given beside it. Client peak memory is measured in a fresh
process that builds only the client's model and runs one client's local epoch (the local engine's
process also holds the server's models, so its figure would not be a client's); the median of
several such processes is quoted.
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
PROXY = {
    "method.name": "fedpft",
    "method.keep": 0.25,
    "method.public_data": SHARED / "ag_news",  # public, unlabeled, another domain
}
EMULATOR = {
    "method.name": "fedpft",
    "method.compression": "layer_drop",
    "method.keep": 0.5,
    "method.distill_steps": 0,
    "method.realign_every": 0,
}
RUNS = [
    ("lora on the full model", "lora", {"method.name": "lora"}),
    ("fedpft (FFN 25%, distilled, re-aligned every 2 rounds)", "fedpft", PROXY),
    (
        "fedpft without distillation or re-alignment",
        "fedpft-plain",
        {**PROXY, "method.distill_steps": 0, "method.realign_every": 0},
    ),
    ("layer-drop emulator (2 of 4 middle blocks, no distillation)", "emulator", EMULATOR),
]


def run(out_dir: Path) -> str:
    for folder in ("sst2", "ag_news"):
        if not (SHARED / folder).is_dir():
            raise SystemExit(f"benchmarks need ../shared/data/{folder} beside the project")
    data = {"data.source": SHARED / "sst2"}
    lines = [
        "## Proxy fine-tuning on a compressed sub-model (`fedpft`) on SST-2 (MiniLM, 10 clients)",
        "",
        f"Machine: {machine()}.",
        "",
        f"Setup: all-MiniLM-L6-v2 (6 blocks, FFN width 1,536), a fixed {ROWS:,}-row subset of the",
        f"SST-2 training set (seed 0), IID over 10 clients; each round 5 clients train; {ROUNDS} rounds;",
        "batch 16, 1 local epoch, AdamW at the lr column's rate (LoRA's default); LoRA r = 8 on query/value + head in",
        "every run. `fedpft`: blocks 1-4 keep the 25% most salient FFN neurons (blocks 0 and 5 whole);",
        "200 steps of layer-level distillation on 1,000 AG News training texts (public, unlabeled,",
        "another domain; 100 more texts score the loss); every 2 rounds clients report mean |activation|",
        "per neuron and the server re-distils the less used half (50 steps). The emulator drops blocks",
        "1 and 3 whole (as many parameters as the FFN cut removes) and is not distilled.",
        "Accuracy: the full model with the learned LoRA and head plugged in, on the 872-row validation",
        "set; the sub-model's own accuracy beside it. Client peak RSS: a fresh process holding only",
        "the client's model runs one client's local epoch (median of 3 processes).",
        "",
        "| run | lr | full-model acc. | sub-model acc. | client model MB | client peak RSS | LoRA MB / round | one-time MB / client | re-alignment MB (run) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    distill_notes = []
    for label, tag, sets in RUNS:
        job = {**COMMON, **data, **sets}
        summary, metrics = run_job(f"fedpft-{tag}", out_dir, job)
        peak, held = client_memory(job)
        proxy = summary.get("fedpft") or {}
        lora_mb = statistics.median(
            m.get("parameter_bytes", m["bytes_up"] + m["bytes_down"]) for m in metrics
        )
        one_time = proxy.get("submodel_download_bytes", 0) / 1e6
        realign = sum(m.get("realign_bytes", 0) for m in metrics) / 1e6
        sub_acc = summary.get("submodel_final_accuracy")
        lines.append(
            f"| {label} | {format_lr(summary['lr'])} | {100 * summary['final_accuracy']:.1f}% | "
            + (f"{100 * sub_acc:.1f}%" if sub_acc is not None else "-")
            + f" | {held:.1f} | {peak:.0f} MB | {lora_mb / 1e6:.2f} | "
            + (f"{one_time:.1f}" if proxy else "- (has the model)")
            + f" | {realign:.2f} |"
        )
        if "distill" in proxy:
            d = proxy["distill"]
            steps = ", ".join(
                f"{r['heldout_before']:.3f} → {r['heldout_after']:.3f}"
                for r in proxy.get("realign", [])
            )
            distill_notes.append(
                f"- {label}: held-out hidden-state loss {d['heldout_before']:.3f} → "
                f"{d['heldout_after']:.3f} by distillation ({d['seconds']:.0f} s)"
                + (f"; re-alignments {steps}" if steps else "")
                + "."
            )
    lines += [
        "",
        "LoRA MB / round: LoRA + head, both ways, summed over the round's 5 clients (median over",
        "rounds). One-time MB: the sub-model a client downloads at its first round (everything but",
        "LoRA + head); the full model is "
        f"{summary.get('fedpft', {}).get('full_model_bytes', 0) / 1e6:.1f} MB. Re-alignment MB: the",
        "slices sent to clients plus the activity reports they sent, over the whole run.",
        "",
        *distill_notes,
        "",
        "Regenerate with `python benchmarks/run.py fedpft` (about 12 minutes on 2 CPU cores).",
    ]
    body = "\n".join(lines)
    write_section("fedpft", body)
    return body
