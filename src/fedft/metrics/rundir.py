"""The run folder: resolved config, metrics lines, checkpoints, summary.

Every file is written to a temporary name, flushed to disk and moved into place, so a run that
dies mid-write leaves the last good checkpoint and summary as they were. A folder is a run folder
only if fedft made it (it carries `MARKER` with a run id): `--overwrite` deletes nothing else.
One process at a time writes a run folder: it holds an OS lock on `LOCK` while it runs, which the
OS releases if the process dies.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedft import __version__
from fedft.config import RunConfig, config_to_yaml
from fedft.errors import FedftError

log = logging.getLogger("fedft")

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.safetensors"
PLOT = "accuracy.png"
PLOTS = (PLOT, "rouge_l.png", "perplexity.png")  # one per headline metric
STOPPED = "stopped.txt"
MARKER = ".fedft-run"
LOCK = ".lock"
RUN_FILES = {CONFIG, METRICS, SUMMARY, CHECKPOINT, *PLOTS, STOPPED, MARKER, LOCK}


def plot_name(headline: str) -> str:
    """The plot of a run's headline metric against rounds and megabytes."""
    return f"{headline}.png"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp_name(path)
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def default_run_name(method: str, data_source: str) -> str:
    stem = Path(data_source.rstrip("/")).stem if data_source != "demo" else "demo"
    return f"{method}-{stem}".replace(" ", "_")


# --- what a run folder is --------------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def holds_results(path: Path) -> bool:
    """Whether a run folder holds anything of value: a checkpoint or a metrics line."""
    return (path / CHECKPOINT).exists() or bool((path / METRICS).exists() and read_metrics(path))


def foreign_entries(path: Path) -> list[str]:
    """What in a run folder fedft did not write there (its own files and their temporaries)."""
    own = RUN_FILES | {_tmp_name(path / f).name for f in RUN_FILES}
    return sorted(p.name for p in path.iterdir() if p.name not in own)


def remove_run_dir(path: Path, root: Path) -> None:
    """Delete a run folder, only if fedft made it, it lies inside `root` (never `root` itself or
    above it) and it holds nothing fedft did not write there."""
    target, base = path.resolve(), root.resolve()
    if target == base or target in base.parents or base not in target.parents:
        raise FedftError(f"{path} is not a run folder inside output_dir {root}; nothing deleted")
    if not is_run_dir(path):
        raise FedftError(
            f"{path} was not made by fedft (no {MARKER} in it); nothing deleted: "
            "pick another --name, or move that folder away yourself"
        )
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise FedftError(
            f"{path} holds files fedft did not write ({shown}); nothing deleted: "
            "move them out or pick another --name"
        )
    shutil.rmtree(path)


# --- one writer per run folder ---------------------------------------------------------------
class RunLock:
    """An exclusive OS lock on a run folder, held while a process writes it. `flock` locks die
    with their process, so a killed run never leaves its folder locked."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FedftError(
                f"run folder {self.path} is in use by process {holder}; wait for it to end "
                "(or stop it) before running, resuming or overwriting this folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def check_output_dir(output_dir: str) -> Path:
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise FedftError(
            f"output_dir {root} is a file, not a folder; give a folder for run folders"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedftError(
            f"output_dir {root} cannot be created ({exc.strerror}); give another"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise FedftError(f"output_dir {root} is not writable; give a folder you can write to")
    return root


def choose_run_dir(output_dir: str, name: str | None, default_name: str, overwrite: bool) -> Path:
    """The folder for a new run. An explicit name that exists needs --overwrite; a default name
    that exists gets a number instead, so nothing earlier is ever written over by accident. A
    run folder that holds no results (its run died before its first checkpoint) is reused."""
    root = check_output_dir(output_dir)
    if name is not None:
        path = root / name
        if path.exists() and not overwrite and not _reusable(path):
            raise FedftError(
                f"run folder {path} exists; pass --overwrite to replace it, --resume {path} to continue it, or pick another --name"
            )
        return path
    path = root / default_name
    number = 2
    while path.exists() and not overwrite and not _reusable(path):
        path = root / f"{default_name}-{number}"
        number += 1
    return path


def _reusable(path: Path) -> bool:
    return is_run_dir(path) and not holds_results(path) and not foreign_entries(path)


def start_run_dir(path: Path, config_yaml: str, overwrite: bool) -> RunLock:
    """Create a run folder (replacing the one there with `overwrite`, or one that holds no
    results), locked by this process until the lock is released or the process ends."""
    if path.exists():
        if not (overwrite or _reusable(path)):
            raise FedftError(f"run folder {path} exists; pass --overwrite to replace it")
        with RunLock(path):  # refuses a folder another process is writing
            remove_run_dir(path, path.parent)
    try:
        path.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise FedftError(
            f"run folder {path} was just created by another run; pick another --name"
        ) from None
    lock = RunLock(path).acquire()
    _atomic_write_text(
        path / MARKER,
        json.dumps({"run_id": uuid.uuid4().hex, "fedft": __version__}) + "\n",
    )
    _atomic_write_text(path / CONFIG, config_yaml)
    return lock


def new_run_dir(cfg: RunConfig, overwrite: bool, suffix: str = "") -> tuple[Path, RunLock]:
    """Choose, create and fill in the folder of a new run (the resolved config goes in first)."""
    default = default_run_name(cfg.method.name, cfg.data.source) + suffix
    path = choose_run_dir(cfg.output_dir, cfg.name, default, overwrite)
    return path, start_run_dir(path, config_to_yaml(cfg), overwrite)


def clean_temporaries(path: Path) -> None:
    """Remove what a killed write left behind (`.name.tmp` files)."""
    for entry in path.glob(".*.tmp"):
        entry.unlink(missing_ok=True)


def write_config(path: Path, cfg: RunConfig) -> None:
    _atomic_write_text(path / CONFIG, config_to_yaml(cfg))


def append_metrics(path: Path, line: dict[str, Any]) -> None:
    with (path / METRICS).open("a") as fh:
        fh.write(json.dumps(line) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metrics lines. A last line that a killed write left half-written is dropped; a broken
    line anywhere else is damage that is refused."""
    file = path / METRICS
    if not file.exists():
        return []
    text = file.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                log.warning("%s: dropped a half-written last line", file)
                break
            raise FedftError(
                f"{file} line {number} is not valid JSON; the run folder is damaged"
            ) from None
    return out


def truncate_metrics(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Drop lines past the checkpointed round (a run may die between the two writes), and a torn
    last line."""
    kept = [m for m in read_metrics(path) if m["round"] <= last_round]
    _atomic_write_text(path / METRICS, "".join(json.dumps(m) + "\n" for m in kept))
    return kept


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order: what a checkpoint must hold."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _checkpoint_digest(tensors: dict[str, torch.Tensor], meta_text: str) -> str:
    """Covers the tensors and the meta (ledgers, client versions): a change to either is damage."""
    return hashlib.sha256(f"{tensors_digest(tensors)}|{meta_text}".encode()).hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    text = json.dumps(meta)
    tmp = _tmp_name(path / CHECKPOINT)
    save_file(
        tensors,
        str(tmp),
        metadata={"fedft": text, "fedft_sha256": _checkpoint_digest(tensors, text)},
    )
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path / CHECKPOINT)
    _fsync_dir(path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's tensors and meta, after checking they are what was written."""
    file = path / CHECKPOINT
    if not file.exists():
        raise FedftError(
            f"{path} has no {CHECKPOINT}; it is not a fedft run folder or it stopped before its first round"
        )
    damaged = f"{file} is damaged"
    try:
        with safe_open(str(file), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(file))
        meta = json.loads(header["fedft"])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise FedftError(f"{damaged} ({reason}); it cannot be resumed") from None
    expected = header.get("fedft_sha256")
    if expected is None:
        raise FedftError(f"{file} has no checksum (an older fedft wrote it); it cannot be resumed")
    if _checkpoint_digest(tensors, header["fedft"]) != expected:
        raise FedftError(f"{damaged}: its contents fail their checksum; it cannot be resumed")
    return tensors, meta


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    _atomic_write_text(path / SUMMARY, json.dumps(summary, indent=2) + "\n")
