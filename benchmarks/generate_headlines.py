"""FedPEFT on a generative model: SmolLM2-135M-Instruct writing AG News headlines, 10 clients split
by topic (Dirichlet 0.5), each method that applies to a Llama beside the untuned model and a
centralized `lora` reference (section `generate`); and a client's peak memory and seconds per
step for SmolLM2 with each method, each in a fresh process that holds only the client's model
(section `generate-memory`)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import (
    DOC,
    ROOT,
    SHARED,
    format_lr,
    machine,
    median_round_seconds,
    run_job,
    run_lr,
    write_section,
)

ROUNDS, PER_ROUND, STEPS, BATCH = 3, 3, 4, 8
COMMON = {
    "model.name": "smollm2",
    "model.max_length": 96,
    "task.system_prompt": "",  # an empty system turn: SmolLM2's default one costs 16 tokens a row
    "data.source": str(SHARED / "ag_news_headlines"),
    "data.label_column": "topic",
    "data.partition": "dirichlet",
    "data.alpha": 0.5,
    "data.max_train_samples": 800,
    "data.max_test_samples": 60,
    "task.eval_generations": 30,
    "task.max_new_tokens": 20,
    "task.client_eval_generations": 0,
    "federation.clients": 10,
    "federation.sample_count": PER_ROUND,
    "federation.rounds": ROUNDS,
    "federation.eval_every": ROUNDS,
    "train.batch_size": BATCH,
    "train.max_steps": STEPS,
}
RUNS = {
    "full": {"method.name": "full"},
    "lora": {"method.name": "lora"},
    "lora (all linear layers)": {"method.name": "lora", "method.target_modules": "all-linear"},
    "prompt": {"method.name": "prompt"},
    "adapter": {"method.name": "adapter"},
    # zo's default (3e-3, swept on MiniLM classification) would wreck an LM's weights; MeZO tunes
    # OPT's weights at 1e-6 to 1e-7
    "zo (all weights)": {"method.name": "zo", "train.lr": 1e-6},
}
# one client holding all the rows, taking as many steps a round as the federated round's clients
CENTRAL = {
    "method.name": "lora",
    "federation.clients": 1,
    "federation.sample_count": 1,
    "data.partition": "iid",
    "train.max_steps": STEPS * PER_ROUND,
}


def run(out: Path) -> str:
    for label, sets in RUNS.items():
        run_job(_slug(label), out, {**COMMON, **sets})
    run_job("central-lora", out, {**COMMON, **CENTRAL})
    return render(out)


def _load(out: Path, name: str) -> tuple[dict, list[dict]]:
    """A finished run's summary (with the lr it used) and metrics lines, read back from its folder."""
    folder = out / name
    summary = json.loads((folder / "summary.json").read_text())
    summary["lr"] = run_lr(folder)
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return summary, lines


def render(out: Path) -> str:
    """Write the section from the runs in `out` (`run` makes them)."""
    results = {label: _load(out, _slug(label)) for label in RUNS}
    central = _load(out, "central-lora")
    untuned = results["lora"][0]["initial"]  # LoRA starts at B = 0: the model itself
    rows = [
        "| run | lr | Rouge-L | test loss (perplexity) | uplink / client / round | total MB | "
        "client peak RSS | s / round |",
        "|---|---|---|---|---|---|---|---|",
        f"| untuned SmolLM2 | - | {100 * untuned['test_rouge_l']:.1f} | "
        f"{untuned['test_loss']:.3f} ({untuned['test_perplexity']:.1f}) | - | - | - | - |",
    ]
    for label, (summary, metrics) in [*results.items(), ("centralized lora", central)]:
        rows.append(
            f"| {label} | {format_lr(summary['lr'])} | {100 * summary['final_rouge_l']:.1f} | "
            f"{summary['final_loss']:.3f} ({summary['final_perplexity']:.1f}) | "
            f"{_bytes(summary['bytes_up_per_client_per_round'])} | {summary['total_mb']:.1f} | "
            f"{summary['client_peak_rss_mb']:.0f} MB | {median_round_seconds(metrics):.0f} |"
        )
    lora = results["lora"][0]
    backprop = {k: v[0] for k, v in results.items() if not k.startswith("zo")}
    above = [k for k, v in backprop.items() if v["final_rouge_l"] > untuned["test_rouge_l"]]
    below = [k for k in backprop if k not in above]
    losses = sorted(v["final_loss"] for v in backprop.values())
    full_up = results["full"][0]["bytes_up_per_client_per_round"]
    zo = results["zo (all weights)"][0]
    fell = ", ".join(f"{backprop[k]['final_loss']:.3f}" for k in below)
    reading = f"""
How to read it. One run each (one seed): the test loss, over every headline token of the
{COMMON["data.max_test_samples"]} test rows, is the steadier figure; Rouge-L on {COMMON["task.eval_generations"]} greedy answers moves a few points with
the luck of a few headlines. Every backprop method lowers the test loss from the untuned
{untuned["test_loss"]:.3f} to between {losses[0]:.3f} and {losses[-1]:.3f} in {ROUNDS * PER_ROUND * STEPS} client steps. Rouge-L rises above
the untuned {100 * untuned["test_rouge_l"]:.1f} for {", ".join(above) or "none"}{f"; it does not for {', '.join(below)}, though their loss fell too ({fell}): at this budget the greedy answers lag the likelihood" if below else ""}.
A `lora` client sends {100 * lora["bytes_up_per_client_per_round"] / full_up:.2f}% of what a `full` client sends
({_bytes(lora["bytes_up_per_client_per_round"])} against {_bytes(full_up)}), a `prompt` client
{_bytes(results["prompt"][0]["bytes_up_per_client_per_round"])}, a `zo` client 12 bytes a step. `zo` at
1e-6 barely moves the model in {ROUNDS * PER_ROUND * STEPS} steps (loss {zo["final_loss"]:.3f}): forward-only tuning
needs thousands of steps, which this section does not afford. Centralized `lora`, the same rows
and steps on one client, reaches a test loss of {central[0]["final_loss"]:.3f} against the federated
{lora["final_loss"]:.3f}: the gap is what averaging {PER_ROUND} clients' short, topic-skewed rounds costs (its
Rouge-L, {100 * central[0]["final_rouge_l"]:.1f}, is within the noise said above).

![test loss against MB sent](benchmarks_generate.png)
"""
    plot(results, central, untuned, DOC.parent / "benchmarks_generate.png")
    body = f"""
## FedPEFT on a generative model (SmolLM2-135M, AG News headlines)

Machine: {machine()}.

Setup: SmolLM2-135M-Instruct (the bundled Q4_1 GGUF, dequantized) writes the headline of an AG
News article (`../shared/data/ag_news_headlines`, instruction + article -> title, in its chat
template with an empty system turn). Subsampled to fit this machine: {COMMON["data.max_train_samples"]} train rows (seeded) split over
10 clients by `topic` (Dirichlet 0.5), {COMMON["data.max_test_samples"]} test rows, prompt + response cut at
{COMMON["model.max_length"]} tokens (the prompt's end goes first: {lora.get("data_cut", {}).get("train_prompts_cut", 0)} train rows lost some of their
article, no headline was cut). {PER_ROUND} clients a round, {ROUNDS} rounds, {STEPS} local steps of batch {BATCH}
(batches grouped by length), each method at its default learning rate but `zo`, at 1e-6 (MeZO's
range for an LM's weights; its default 3e-3 was swept on MiniLM classification). The lr column is
read back from each run's `config.yaml`; none was swept for SmolLM2. Rouge-L: F-measure (stemmed) of
greedy answers (at most {COMMON["task.max_new_tokens"]} tokens) to the same {COMMON["task.eval_generations"]} seeded test rows, before round 1
(the untuned row: the `lora` run's, whose adapters start at zero) and after the last. Test loss:
mean per headline token over the {COMMON["data.max_test_samples"]} test rows. Client peak RSS is the local engine's
figure (the process also holds the server's copy of what trains; the next section has a client
alone). `bias` and `head` do not apply: a Llama has no bias terms, and SmolLM2's LM head is the
input embedding matrix. Centralized `lora`: one client with all {COMMON["data.max_train_samples"]} rows taking
{STEPS * PER_ROUND} steps a round (the federated round's {PER_ROUND} x {STEPS}), the same rows and step count. The
`lora` row is the run `examples/generate-cpu.yaml` gives (README).

{chr(10).join(rows)}
{reading}
Regenerate with `python benchmarks/run.py generate` (about 15 minutes on 2 CPU cores).
"""
    write_section("generate", body)
    return body


def plot(results: dict, central: tuple, untuned: dict, path: Path) -> None:
    """Each run's final test loss against the MB it sent (log scale), the untuned loss as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, (summary, _) in [*results.items(), ("centralized lora", central)]:
        mb = max(summary["total_mb"], 1e-3)
        ax.scatter([mb], [summary["final_loss"]])
        ax.annotate(label, (mb, summary["final_loss"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.axhline(untuned["test_loss"], color="grey", linestyle="--", linewidth=1, label="untuned")
    ax.set_xscale("log")
    ax.set_xlabel("MB sent in the run, up + down (log scale)")
    ax.set_ylabel("test loss per headline token")
    ax.set_title("SmolLM2-135M on AG News headlines, 10 clients")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slug(label: str) -> str:
    return "gen-" + "".join(c if c.isalnum() else "-" for c in label).strip("-").replace("--", "-")


def _bytes(value: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


# --- a client alone: peak memory and seconds per step ------------------------------------------
KINDS = ("inference", "lora", "prompt", "full", "zo")
MEM_BATCH, MEM_LENGTH, STEPS_MEASURED, REPEATS = 8, 64, 3, 3


def one_client(kind: str) -> dict:
    """Runs inside the child process: SmolLM2 with the method attached, one warm-up step, then
    three measured steps on a batch of 8 rows of 64 tokens."""
    import torch

    from fedft.config import build_config
    from fedft.federation.engine import build_task
    from fedft.federation.training import make_optimizer, parameters_by_name
    from fedft.methods.zo.directions import decayed_mask
    from fedft.methods.zo.spsa import zo_step
    from fedft.metrics.measure import measure

    torch.set_num_threads(2)
    method = {"inference": "lora"}.get(kind, kind)
    cfg = build_config(
        base={
            **{k: v for k, v in COMMON.items() if k.startswith(("model.", "data.", "task."))},
            "model.max_length": MEM_LENGTH,
            "data.max_train_samples": 64,
            "data.partition": "iid",
            "federation.clients": 1,
            "method.name": method,
            "train.batch_size": MEM_BATCH,
        }
    )
    task = build_task(cfg)
    model, data = task.model, task.data.train
    full_rows = [i for i in range(len(data)) if data.lengths[i] == MEM_LENGTH][:MEM_BATCH]
    batch = data.batch(full_rows)
    assert batch["input_ids"].shape == (MEM_BATCH, MEM_LENGTH), batch["input_ids"].shape
    params = list(parameters_by_name(model, task.method.trainable_names).values())
    optimizer = (
        make_optimizer(params, cfg.train, 1e-5) if kind in ("lora", "prompt", "full") else None
    )
    decayed = decayed_mask(params)

    def step(seed: int) -> None:
        if kind == "inference":
            model.eval()
            with torch.inference_mode():
                model.task.loss(model(batch), batch)
        elif kind == "zo":
            model.eval()
            zo_step(model, params, decayed, batch, [seed], 1e-3, 1e-6, 0.0)
        else:
            model.train()
            loss = model.task.loss(model(batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    step(0)  # warm-up: lazy allocations and the optimizer's state
    seconds, peak = [], 0
    for i in range(STEPS_MEASURED):
        with measure() as m:
            step(i + 1)
        seconds.append(m.seconds)
        peak = max(peak, m.peak_rss_bytes)
    trained = sum(p.numel() for p in params)
    return {
        "kind": kind,
        "peak_rss_mb": peak / 1e6,
        "seconds": statistics.median(seconds),
        "trained": trained,
    }


def probe(kind: str) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import generate_headlines as g; "
        f"print(json.dumps(g.one_client({kind!r})))"
    )
    env_vars = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    import os

    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env_vars},
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"[bench] {kind} probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(out: Path) -> str:
    rows = [
        "| client step | trained parameters | peak RSS (median) | seconds / step (median) |",
        "|---|---|---|---|",
    ]
    for kind in KINDS:
        found = [probe(kind) for _ in range(REPEATS)]
        print(f"[bench] generate-memory {kind}: {found}", flush=True)
        peak = statistics.median(r["peak_rss_mb"] for r in found)
        secs = statistics.median(r["seconds"] for r in found)
        trained = "-" if kind == "inference" else f"{found[0]['trained']:,}"
        label = {
            "inference": "inference only (forward, no gradient)",
            "zo": "zo (all weights; two forwards)",
        }.get(kind, f"{kind} (backprop, AdamW)")
        rows.append(f"| {label} | {trained} | {peak:.0f} MB | {secs:.2f} |")
    body = f"""
## A SmolLM2 client alone: memory and seconds per step

Machine: {machine()}.

Each row is one client step of SmolLM2-135M-Instruct (float32, 538 MB of weights) on {MEM_BATCH} rows of
{MEM_LENGTH} tokens of the headline data, in a fresh process that holds only the client's model
(`benchmarks/generate_headlines.py: one_client`): one warm-up step (lazy allocations, the
optimizer's state), then {STEPS_MEASURED} measured steps; peak RSS is the process's high-water mark
during them, seconds the median step. Each process was run {REPEATS} times; the table gives the
medians. The loss is the response loss of the generation task (next-token logits only where a
target is predicted).

{chr(10).join(rows)}

How to read it: what a client device must hold and how long it computes per step. `zo` needs no
gradient, no optimizer state and no activations kept for a backward pass, so it stays at
inference's memory; `full` keeps a gradient and two AdamW moments of every weight. `zo`'s step
is two forward passes plus three passes that regenerate its random direction over all 134.5M
weights (perturb, perturb back, update), which is what makes it slower than a LoRA step here.

Regenerate with `python benchmarks/run.py generate-memory`.
"""
    write_section("generate-memory", body)
    return body
