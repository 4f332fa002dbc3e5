"""The server's public unlabeled inputs for distillation: read the way `data.source` is, but only
the inputs; labels are neither needed nor read (text sources may have no label column)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from pydantic import BaseModel, Field

from fedft.config import DataConfig
from fedft.data.demo import demo_splits
from fedft.data.encode import TensorData, encode
from fedft.data.sources import TRAIN_STEMS, find_file, load_raw, looks_like_path, read_file
from fedft.errors import DataError
from fedft.models.backbone import Preprocess


class PublicDataOptions(BaseModel):
    """The options of a method that distils on the server's public inputs."""

    public_data: str = Field(
        "demo", description="public unlabeled inputs for distillation (read like data.source)"
    )
    public_text_column: str = Field("text", description="text column of public_data")
    public_rows: int = Field(1000, ge=1, description="public rows used to distil")
    public_heldout: int = Field(
        100, ge=1, description="further public rows only scored (the loss before and after)"
    )

    def load_public(self, pre: Preprocess, seed: int) -> PublicInputs:
        return load_public(
            self.public_data, self.public_text_column, self.public_rows, self.public_heldout,
            pre, seed,
        )  # fmt: skip


@dataclass
class PublicInputs:
    data: TensorData
    train: torch.Tensor  # row indices used to distil
    heldout: torch.Tensor  # row indices only scored, to report the loss before and after


def _texts(source: str, column: str) -> list[str]:
    if source == "demo":
        train, _ = demo_splits()
        return [text for text, _ in train]
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


def load_public(
    source: str, column: str, rows: int, heldout: int, pre: Preprocess, seed: int
) -> PublicInputs:
    """Up to `rows` + `heldout` inputs from `source`, in a seeded order."""
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
    if len(table) < 2:
        raise DataError(
            f"method.public_data: {source} has {len(table)} rows; distillation needs more"
        )
    order = np.random.default_rng(seed).permutation(len(table))[: rows + heldout]
    held = min(heldout, max(1, len(order) // 10))
    data = encode(table.select(order.tolist()), pre)
    index = torch.arange(len(order))
    return PublicInputs(data, index[held:], index[:held])
