"""Client peak memory of one step on MiniLM (batch 32, sequence length 64): `zo` on all weights,
`full` backprop, `lora` backprop, and plain inference.

Each kind runs in its own fresh process (so peaks do not mix), takes one warm-up step (the
optimizer's state exists in a steady-state step), then resets the kernel's high-water mark and
measures one more step. The figure is the process's peak RSS during that step: what a client
device must hold. Repeated, and the median quoted.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import SHARED, machine, write_section

KINDS = ("inference", "zo", "full", "lora")
BATCH, LENGTH, REPEATS = 32, 64, 3


def one_step(kind: str) -> dict:
    """Runs inside the child process."""
    import torch
    import torch.nn.functional as F

    from fedft.config import build_config
    from fedft.data import build_federated_data, load_raw
    from fedft.federation.training import make_optimizer, parameters_by_name
    from fedft.methods import get_method
    from fedft.methods.zo.directions import decayed_mask
    from fedft.methods.zo.spsa import zo_step
    from fedft.metrics.measure import measure
    from fedft.models.backbone import load_task_model

    torch.set_num_threads(2)
    method_name = {"inference": "head", "zo": "zo", "full": "full", "lora": "lora"}[kind]
    cfg = build_config(
        base={
            "data.source": str(SHARED / "sst2"),
            "data.max_train_samples": 256,
            "model.max_length": LENGTH,
            "method.name": method_name,
            "federation.clients": 1,
            "train.batch_size": BATCH,
        }
    )
    raw = load_raw(cfg.data, cfg.seed)
    model = load_task_model("minilm", raw.num_labels, LENGTH, cfg.seed)
    data = build_federated_data(cfg, raw, model.task.encode_splits)
    method = get_method(method_name)(cfg.method_options())
    names = method.prepare(model)
    params = list(parameters_by_name(model, names).values())
    batch = data.train.batch(data.clients[0].train[:BATCH])
    assert batch["input_ids"].shape == (BATCH, LENGTH), batch["input_ids"].shape
    optimizer = make_optimizer(params, cfg.train, 1e-5) if kind in ("full", "lora") else None
    decayed = decayed_mask(params)

    def step(seed: int) -> None:
        if kind == "inference":
            model.eval()
            with torch.inference_mode():
                model(batch)
        elif kind == "zo":
            model.eval()
            zo_step(model, params, decayed, batch, [seed], 1e-3, 1e-6, 0.0)
        else:
            model.train()
            loss = F.cross_entropy(model(batch), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    step(0)  # warm-up: lazy allocations and optimizer state
    with measure() as m:
        step(1)
    return {
        "kind": kind,
        "peak_rss_mb": m.peak_rss_bytes / 1e6,
        "seconds": m.seconds,
        "trainable": sum(p.numel() for p in params),
    }


def measure_kind(kind: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise SystemExit(f"[bench] memory {kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(out_dir: Path) -> str:
    if not (SHARED / "sst2").is_dir():
        raise SystemExit("benchmarks need ../shared/data/sst2 beside the project")
    samples: dict[str, list[dict]] = {k: [] for k in KINDS}
    for repeat in range(REPEATS):
        for kind in KINDS:  # interleaved, so drift on the machine hits every kind alike
            result = measure_kind(kind)
            samples[kind].append(result)
            print(
                f"[bench] memory {kind} #{repeat + 1}: {result['peak_rss_mb']:.0f} MB", flush=True
            )
    peak = {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in samples.items()}
    secs = {k: statistics.median(r["seconds"] for r in v) for k, v in samples.items()}
    trainable = {k: v[0]["trainable"] for k, v in samples.items()}
    rows = "\n".join(
        f"| {label} | {trainable[k]:,} | {peak[k]:.0f} | {peak[k] / peak['inference']:.2f} | "
        f"{peak[k] / peak['full']:.2f} | {secs[k]:.2f} |"
        for k, label in (
            ("inference", "plain inference (forward only)"),
            ("zo", "`zo` on all weights (2 forwards, seeded SPSA)"),
            ("lora", "`lora` backprop (AdamW)"),
            ("full", "`full` backprop (AdamW)"),
        )
    )
    zo_inf, zo_full = peak["zo"] / peak["inference"], peak["zo"] / peak["full"]
    body = f"""## Client memory of one step: forward-only `zo` against backprop

MiniLM (all-MiniLM-L6-v2), batch {BATCH}, sequence length {LENGTH}, SST-2 rows, CPU. Each kind in
a fresh process: one warm-up step, then the kernel's high-water mark (VmHWM) is reset and one
step measured; the figure is the whole process's peak RSS in that step (Python, torch, the
model, and what the step adds), median of {REPEATS} interleaved repeats. `python benchmarks/run.py zo-memory`.

Machine: {machine()}.

| step | trainable parameters | peak RSS (MB) | / inference | / full backprop | step seconds |
|---|---|---|---|---|---|
{rows}

`zo` on all weights peaks at **{zo_inf:.2f}x** plain inference (target at most 1.2x) and
**{zo_full:.2f}x** `full` backprop (target at most 0.6x). The whole difference is what backprop
keeps: gradients, the optimizer's two moments and the activations saved for the backward pass;
`zo` holds the model, one forward's activations and one 4 MB chunk of its random direction.
Outside the step, a `seeds`-mode client also keeps the trainable weights it last synced (to replay
missed records onto; under Flower in the node's `context.state`, on the local engine one copy that
all the process's clients share) and its starting weights (on disk).
"""
    write_section("zo-memory", body)
    return body


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        print(json.dumps(one_step(sys.argv[2])))
    else:
        print(run(Path("runs/bench/zo-memory")))
