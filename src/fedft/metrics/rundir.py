"""The run folder: resolved config, metrics lines, checkpoints, summary.

Every file is written to a temporary name and moved into place, so a run that dies mid-write
leaves the last good checkpoint and summary as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedft.config import RunConfig, config_to_yaml
from fedft.errors import FedftError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.safetensors"
PLOT = "accuracy.png"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_run_name(method: str, data_source: str) -> str:
    stem = Path(data_source.rstrip("/")).stem if data_source != "demo" else "demo"
    return f"{method}-{stem}".replace(" ", "_")


def choose_run_dir(output_dir: str, name: str | None, default_name: str, overwrite: bool) -> Path:
    """The folder for a new run. An explicit name that exists needs --overwrite; a default name
    that exists gets a number instead, so nothing earlier is ever written over by accident."""
    root = Path(output_dir)
    if name is not None:
        path = root / name
        if path.exists() and not overwrite:
            raise FedftError(
                f"run folder {path} exists; pass --overwrite to replace it, --resume {path} to continue it, or pick another --name"
            )
        return path
    path = root / default_name
    number = 2
    while path.exists() and not overwrite:
        path = root / f"{default_name}-{number}"
        number += 1
    return path


def start_run_dir(path: Path, config_yaml: str, overwrite: bool) -> None:
    if path.exists() and overwrite:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=False)
    _atomic_write_text(path / CONFIG, config_yaml)


def new_run_dir(cfg: RunConfig, overwrite: bool, suffix: str = "") -> Path:
    """Choose, create and fill in the folder of a new run (the resolved config goes in first)."""
    default = default_run_name(cfg.method.name, cfg.data.source) + suffix
    path = choose_run_dir(cfg.output_dir, cfg.name, default, overwrite)
    start_run_dir(path, config_to_yaml(cfg), overwrite)
    return path


def write_config(path: Path, cfg: RunConfig) -> None:
    _atomic_write_text(path / CONFIG, config_to_yaml(cfg))


def append_metrics(path: Path, line: dict[str, Any]) -> None:
    with (path / METRICS).open("a") as fh:
        fh.write(json.dumps(line) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    file = path / METRICS
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Drop lines past the checkpointed round (a run may die between the two writes)."""
    kept = [m for m in read_metrics(path) if m["round"] <= last_round]
    _atomic_write_text(path / METRICS, "".join(json.dumps(m) + "\n" for m in kept))
    return kept


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tmp = path / f".{CHECKPOINT}.tmp"
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(tmp),
        metadata={"fedft": json.dumps(meta)},
    )
    os.replace(tmp, path / CHECKPOINT)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    file = path / CHECKPOINT
    if not file.exists():
        raise FedftError(
            f"{path} has no {CHECKPOINT}; it is not a fedft run folder or it stopped before its first round"
        )
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("fedft", "{}"))
    return load_file(str(file)), meta


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    _atomic_write_text(path / SUMMARY, json.dumps(summary, indent=2) + "\n")
