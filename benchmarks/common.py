"""Shared benchmark plumbing: run fedft jobs in fresh processes, describe the machine, and write
one section of docs/benchmarks.md without touching the others."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SHARED = ROOT.parent / "shared" / "data"


def machine() -> str:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{date.today().isoformat()}; {cpu}, {os.cpu_count()} cores, GPU: {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )


def minilm_iid_setup(rows: int, rounds: int) -> dict[str, object]:
    """MiniLM on a fixed `rows`-row subset, IID over 10 clients, 5 per round, 1 local epoch of
    batch 16, evaluated once at the end: the setting the method comparisons share."""
    return {
        "model.name": "minilm",
        "model.max_length": 48,
        "data.max_train_samples": rows,
        "federation.clients": 10,
        "federation.rounds": rounds,
        "federation.sample_fraction": 0.5,
        "federation.eval_every": rounds,
        "data.partition": "iid",
        "train.batch_size": 16,
        "train.epochs": 1,
    }


def _same_setting(recorded: object, value: object) -> bool:
    """A recorded config value against a wanted one, compared as YAML reads them; a path under
    ../shared/data by its place there (a record may come from another clone of the project)."""
    import yaml

    if isinstance(value, Path) and value.is_relative_to(SHARED):
        return str(recorded).endswith("/shared/data/" + value.relative_to(SHARED).as_posix())
    wanted = yaml.safe_load(str(value)) if value != "" else ""
    return recorded == wanted or str(recorded) == str(value)


def finished_with(run_dir: Path, sets: dict[str, object]) -> bool:
    """A finished run whose config.yaml holds every one of `sets`."""
    import yaml

    if not (run_dir / "summary.json").exists() or not (run_dir / "config.yaml").exists():
        return False
    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    resolved_lr = json.loads((run_dir / "summary.json").read_text()).get("lr")
    for key, value in sets.items():
        node = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if key == "train.lr" and node is None:
            node = resolved_lr  # left to the method's default, which came to this lr
        if not _same_setting(node, value):
            return False
    return True


RECORDS = ROOT / "benchmarks" / "records"
PER_CLIENT_KEYS = ("per_client", "epsilon_per_client")  # left out of a record: grow with clients


def keep_record(run_dir: Path, record_dir: Path) -> None:
    """Copy a finished run's config, summary and metrics (without the per-client entries) into
    `record_dir`: small enough to commit, so that a section whose runs take longer than one
    sitting can be finished later, and each table can be traced to the runs that made it."""
    record_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        lines.append(json.dumps({k: v for k, v in entry.items() if k not in PER_CLIENT_KEYS}))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["lr"] = run_lr(run_dir)
    for key in PER_CLIENT_KEYS:
        (summary.get("privacy") or {}).pop(key, None)
    (record_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (record_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    # last: a summary marks a whole record
    (record_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def run_job(
    name: str, out_dir: Path, sets: dict[str, object], records: Path | None = None
) -> tuple[dict, list[dict]]:
    """One `fedft run` in its own process (so memory is its own); returns summary and metrics.
    With FEDFT_BENCH_REUSE=1 a finished run of the same name and settings is read back instead
    of run again (to finish an interrupted section; the table is the same either way), from
    `out_dir` or, where given, from the committed `records` folder, where each new run is kept."""
    run_dir = out_dir / name
    reuse = os.environ.get("FEDFT_BENCH_REUSE") == "1"
    for kept in (run_dir, *([records / name] if records else [])):
        if reuse and finished_with(kept, sets):
            print(f"[bench] {name}: reusing the finished run in {kept}", flush=True)
            summary = json.loads((kept / "summary.json").read_text())
            summary["lr"] = run_lr(kept)
            lines = (kept / "metrics.jsonl").read_text().splitlines()
            return summary, [json.loads(line) for line in lines]
    args = [
        sys.executable,
        "-m",
        "fedft",
        "run",
        "--name",
        name,
        "--overwrite",
        "--quiet",
        "--set",
        f"output_dir={out_dir}",
    ]
    for key, value in sets.items():  # values are YAML: an empty text must be quoted
        args += ["--set", f"{key}={value if value != '' else repr('')}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print(f"[bench] {name}: {' '.join(f'{k}={v}' for k, v in sets.items())}", flush=True)
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"[bench] {name} failed:\n{done.stderr[-2000:]}")
    if records:
        keep_record(run_dir, records / name)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["lr"] = run_lr(run_dir)  # older runs have none in summary.json
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    headline = summary.get("headline", "accuracy")
    print(
        f"[bench] {name}: {headline} {summary.get(f'final_{headline}')}, {summary['seconds']:.0f} s",
        flush=True,
    )
    return summary, metrics


def run_lr(run_dir: Path) -> float:
    """The client learning rate a finished run used: its summary.json's `lr`; for a run by an
    older fedft, which did not record it, from its config.yaml: `train.lr`, or where that is null
    the default of the run's method, resolved by fedft's method registry (a config with a field
    since renamed is read for its `method` and `train` sections only)."""
    import yaml

    from fedft.config import validate_config
    from fedft.errors import ConfigError
    from fedft.methods import get_method

    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("lr") is not None:  # what the run itself used (auto options resolved)
        return float(summary["lr"])
    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    try:
        cfg = validate_config(tree)
    except ConfigError:
        cfg = validate_config({key: tree[key] for key in ("method", "train") if key in tree})
    return get_method(cfg.method.name)(cfg.method_options()).lr(cfg)


def in_child(module: str, call: str) -> dict:
    """`module.call` (a benchmarks/ module, a call that returns JSON-able data) in a fresh
    Python process, so that its memory and imports are its own; what it returned."""
    code = (
        f"import json, sys; sys.path.insert(0, 'benchmarks'); import {module}; "
        f"print(json.dumps({module}.{call}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"[bench] {module}.{call} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_lr(lr: float) -> str:
    """A learning rate as a table shows it: 1e-3, 3e-4, 2.5e-5."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def median_round_seconds(metrics: list[dict]) -> float:
    return statistics.median(m["round_seconds"] for m in metrics)


def write_section(section: str, body: str) -> None:
    """Replace (or append) the block between this section's markers in docs/benchmarks.md."""
    start, end = f"<!-- section:{section} -->", f"<!-- /section:{section} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = (
        DOC.read_text()
        if DOC.exists()
        else "# Benchmarks\n\nMeasured by `python benchmarks/run.py` (see each section for its setup).\n"
    )
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def plot_accuracy_vs_mb(curves: dict[str, list[dict]], out: Path, title: str) -> None:
    """One line per run: global test accuracy against cumulative MB sent (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, metrics in curves.items():
        points = [m for m in metrics if m.get("test_accuracy") is not None]
        ax.plot(
            [m["total_mb"] for m in points],
            [100 * m["test_accuracy"] for m in points],
            marker="o",
            label=label,
        )
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MB sent, up + down (log scale)")
    ax.set_ylabel("global test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def client_probe(sets: dict[str, object]) -> dict:
    """Runs inside a child process: build only the client's model, run one client's local epoch,
    and measure it."""
    import ctypes
    import gc

    import torch

    from fedft.config import build_config
    from fedft.federation.engine import build_task
    from fedft.federation.training import train_locally
    from fedft.metrics.measure import measure

    torch.set_num_threads(2)
    task = build_task(build_config(base=sets))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what building the client's model dropped
    rows = task.data.clients[0].train
    with measure() as m:
        train_locally(
            task.model, task.method.trainable_names, task.data.train, rows, task.cfg.train,
            task.method.lr(task.cfg), 0, task.device,
        )  # fmt: skip
    held = sum(p.numel() * p.element_size() for p in task.model.parameters())
    return {"peak_rss_mb": m.peak_rss_bytes / 1e6, "model_mb": held / 1e6}


def client_memory(sets: dict[str, object], repeats: int = 3) -> tuple[float, float]:
    """(median peak RSS MB of one client's local epoch, each in a fresh process that holds only
    the client's model; MB of parameters that model holds). The local engine's own figure also
    counts whatever the server holds in the same process."""
    payload = json.dumps(json.dumps(sets, default=str))
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import common; "
        f"print(json.dumps(common.client_probe(json.loads({payload}))))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    peaks, held = [], 0.0
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"[bench] memory probe failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        peaks.append(result["peak_rss_mb"])
        held = result["model_mb"]
    return statistics.median(peaks), held
