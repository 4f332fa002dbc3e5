"""The server's public unlabeled inputs for distillation: read the way `data.source` is, but only
the inputs; labels are neither needed nor read (text sources may have no label column).

Public means that no client holds it. A server that distils on the clients' own rows would read
the data federated learning keeps on the clients, so `load_public` refuses a source that is the
clients' training data: the same file or folder as `data.source` (paths resolved), the same hub
name, or any row that is also a training row of `data.source` (all of its training split, before
`data.max_train_samples`; texts compared with their whitespace collapsed, images by their
pixels). The rule is strict: one shared row is refused, with the count, because the server
cannot tell a chance duplicate from a client's row. The built-in default, `demo`, is the demo
set's own public split, which no client holds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from pydantic import BaseModel, Field

from fedft.config import DataConfig, TaskConfig
from fedft.data.demo import demo_public_texts
from fedft.data.encode import TensorData, encode
from fedft.data.files import find_file, read_file
from fedft.data.sources import TRAIN_STEMS, load_raw, looks_like_path
from fedft.errors import ConfigError, DataError
from fedft.models.backbone import Preprocess


class PublicDataOptions(BaseModel):
    """The options of a method that distils on the server's public inputs."""

    public_data: str = Field(
        "demo",
        description="public unlabeled inputs for distillation, read like data.source; never the "
        "clients' data ('demo': the demo set's public split, which no client holds)",
    )
    public_text_column: str = Field("text", description="text column of public_data")
    public_rows: int = Field(1000, ge=1, description="public rows used to distil")
    public_heldout: int = Field(
        100, ge=1, description="further public rows only scored (the loss before and after)"
    )

    def load_public(
        self, pre: Preprocess, clients: DataConfig, seed: int, task: TaskConfig | None = None
    ) -> PublicInputs:
        """The public inputs, refused if they are (or share a row with) `clients`' training data
        (`task`: the clients' rows are generation rows)."""
        return load_public(
            self.public_data, self.public_text_column, self.public_rows, self.public_heldout,
            pre, seed, clients, task,
        )  # fmt: skip

    def load_public_texts(
        self, clients: DataConfig, seed: int, task: TaskConfig | None = None
    ) -> PublicTexts:
        """The public texts as they are (a causal LM frames them as prompts), refused like
        `load_public`'s; `public_rows` to distil on, then up to `public_heldout` only scored."""
        texts = _texts(self.public_data, self.public_text_column)
        check_not_clients_data(self.public_data, texts, clients, seed, task)
        if len(texts) < 2:
            raise DataError(
                f"method.public_data: {self.public_data} has {len(texts)} rows; distillation "
                "needs more"
            )
        order, held = _picked(len(texts), self.public_rows, self.public_heldout, seed)
        picked = [texts[i] for i in order]
        return PublicTexts(train=picked[held:], heldout=picked[:held])


@dataclass
class PublicTexts:
    """Public prompts for a causal LM's distillation: it writes the continuations itself."""

    train: list[str]
    heldout: list[str]


@dataclass
class PublicInputs:
    data: TensorData
    train: torch.Tensor  # row indices used to distil
    heldout: torch.Tensor  # row indices only scored, to report the loss before and after


def _texts(source: str, column: str) -> list[str]:
    if source == "demo":
        return demo_public_texts()
    path = Path(source).expanduser()
    if not path.exists() and looks_like_path(source):
        raise DataError(f"method.public_data: {source} does not exist; name a text file or folder")
    if path.is_dir():
        found = find_file(path, TRAIN_STEMS)
        if found is None:
            raise DataError(f"method.public_data: folder {path} has no train.csv/.jsonl/.parquet")
        ds = read_file(found)
    elif path.exists():
        ds = read_file(path)
    else:
        try:
            ds = datasets.load_dataset(source, split="train")
        except Exception as exc:
            raise DataError(
                f"method.public_data: '{source}' is not a local file or folder, and the hub did "
                f"not give it ({str(exc).splitlines()[0][:120]}); name a local text file"
            ) from exc
    if column not in ds.column_names:
        raise DataError(
            f"method.public_data: {source} has no text column '{column}' (columns: "
            f"{', '.join(ds.column_names[:8])}); set method.public_text_column"
        )
    return ["" if t is None else str(t) for t in ds[column]]


def _train_file(source: str) -> Path | None:
    """The file a source's training rows come from (a folder's train.*), resolved; None for the
    demo set and hub names."""
    if source == "demo":
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        found = find_file(path, TRAIN_STEMS)
        return found.resolve() if found else path.resolve()
    return path.resolve() if path.exists() else None


def _fingerprint(row: object) -> bytes:
    """A short hash of a row: a text with its whitespace collapsed, or an image's float32 pixels
    (so a copy of the clients' rows matches however it was re-saved)."""
    if isinstance(row, str):
        raw = " ".join(row.split()).encode()
    else:
        raw = np.asarray(row, dtype=np.float32).tobytes()
    return hashlib.blake2b(raw, digest_size=16).digest()


def check_not_clients_data(
    source: str,
    public_rows: list[object],
    clients: DataConfig,
    seed: int,
    task: TaskConfig | None = None,
) -> None:
    """Refuse public inputs that are the clients' training data: the same source, or any row
    in common with `clients`' whole training split (see the module's docstring for the rule)."""
    change = (
        "distillation must use data no client holds: set method.public_data to another source "
        "(the default 'demo' is a public split no client holds)"
    )
    same_file = _train_file(source)
    same_name = source == clients.source and source != "demo"  # demo's public split is its own
    if same_name or (same_file is not None and same_file == _train_file(clients.source)):
        raise ConfigError(
            f"method.public_data: {source} is data.source {clients.source}, the clients' "
            f"training data; {change}"
        )  # fmt: skip
    full = clients.model_copy(update={"max_train_samples": None, "max_test_samples": None})
    train = load_raw(full, seed, task).train
    columns = [c for c in ("text", "prompt", "response") if c in train.column_names] or ["pixels"]
    theirs = {_fingerprint(row) for column in columns for row in train[column]}
    shared = sum(_fingerprint(row) in theirs for row in public_rows)
    if shared:
        what = "all" if shared == len(public_rows) else f"{shared:,}"
        raise ConfigError(
            f"method.public_data: {what} of its {len(public_rows):,} rows are also training rows of "
            f"data.source {clients.source} (the clients' data); {change}, or remove those rows"
        )


def _picked(available: int, rows: int, heldout: int, seed: int) -> tuple[np.ndarray, int]:
    """Up to `rows` + `heldout` row indices in a seeded order, and how many of the first are held
    out (at most a tenth, at least one)."""
    order = np.random.default_rng(seed).permutation(available)[: rows + heldout]
    return order, min(heldout, max(1, len(order) // 10))


def load_public(
    source: str,
    column: str,
    rows: int,
    heldout: int,
    pre: Preprocess,
    seed: int,
    clients: DataConfig,
    task: TaskConfig | None = None,
) -> PublicInputs:
    """Up to `rows` + `heldout` inputs from `source`, in a seeded order; refused if they are the
    clients' training data (`clients`; `task`: they are generation rows)."""
    if pre.kind == "text":
        texts = _texts(source, column)
        table = datasets.Dataset.from_dict({"text": texts, "label": [0] * len(texts)})
    else:
        raw = load_raw(DataConfig(source=source), seed)
        if raw.kind != "image":
            raise DataError(
                f"method.public_data: the model takes images but {source} is {raw.kind}; "
                "name an image source"
            )
        table = raw.train
    check_not_clients_data(
        source, table["text" if pre.kind == "text" else "pixels"], clients, seed, task
    )
    if len(table) < 2:
        raise DataError(
            f"method.public_data: {source} has {len(table)} rows; distillation needs more"
        )
    order, held = _picked(len(table), rows, heldout, seed)
    data = encode(table.select(order.tolist()), pre)
    index = torch.arange(len(order))
    return PublicInputs(data, index[held:], index[:held])
