"""What a resumed run must share with the run it continues.

A checkpoint records the resolved config (all but `federation.rounds` and where the folder lives),
the identity of the data (its source and a digest of the rows the run encoded and how they were
split), the model's (its name and a digest of its starting weights) and fedft's version.
`--resume` recomputes them and refuses a run that would silently continue something else: an
edited `config.yaml`, data that changed on disk, another model, another fedft.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from fedft import __version__
from fedft.config import RunConfig
from fedft.errors import FedftError
from fedft.metrics.rundir import tensors_digest

FREE_ON_RESUME = (("federation", "rounds"), ("name",), ("output_dir",))


def comparable_config(cfg: RunConfig) -> dict[str, Any]:
    tree = cfg.model_dump(mode="json")
    for path in FREE_ON_RESUME:
        node = tree
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1], None)
    return tree


def _data_digest(task: Any) -> str:
    digest = hashlib.sha256()
    for part in (task.data.train, task.data.test):
        digest.update(tensors_digest({**part.features, "labels": part.labels}).encode())
    for split in task.data.clients:
        digest.update(split.train.astype("int64").tobytes() + b"|")
        digest.update(split.test.astype("int64").tobytes() + b"/")
    return digest.hexdigest()


def _model_digest(model: torch.nn.Module) -> str:
    return tensors_digest(dict(model.state_dict()))


def run_fingerprint(task: Any) -> dict[str, Any]:
    """The fingerprint of a task as built, before any round ran."""
    return {
        "config": comparable_config(task.cfg),
        "data": {"source": task.cfg.data.source, "rows": _data_digest(task)},
        "model": {"name": task.cfg.model.name, "weights": _model_digest(task.model)},
        "fedft": __version__,
    }


def _differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now), key=lambda k: (k != "name", k)):
            where = f"{prefix}.{key}" if prefix else str(key)
            out += _differences(saved.get(key), now.get(key), where)
        return out
    return [] if saved == now else [f"{prefix} {saved!r} -> {now!r}"]


def check_fingerprint(saved: dict[str, Any] | None, now: dict[str, Any], run_dir: Any) -> None:
    """Refuse to resume `run_dir` with a task whose fingerprint differs from the checkpoint's."""
    if saved is None:
        raise FedftError(
            f"--resume {run_dir}: its checkpoint has no fingerprint (an older fedft wrote it); "
            "start a new run"
        )
    problems = []
    if saved.get("fedft") != now["fedft"]:
        problems.append(f"fedft {saved.get('fedft')} wrote it, this is fedft {now['fedft']}")
    changed = _differences(saved.get("config"), now["config"])
    if changed:
        shown = "; ".join(changed[:4]) + ("; ..." if len(changed) > 4 else "")
        problems.append(f"the config changed ({shown})")
    if saved.get("data") != now["data"]:
        problems.append(f"the data differ from the rows the run read ({now['data']['source']})")
    if saved.get("model") != now["model"]:
        problems.append(f"the model differs from the one the run started ({now['model']['name']})")
    if problems:
        raise FedftError(
            f"--resume {run_dir}: this is not the same run: {', '.join(problems)}; "
            "undo the change, or start a new run"
        )
