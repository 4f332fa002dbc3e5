"""Where the rows come from: the built-in demo set, local files or folders, or a hub dataset.

Whatever the source, the result is a `RawData` with a `label` column of integer class ids and
either a `text` column (text tasks) or a `pixels` column (image tasks), so the rest of the
pipeline never looks at file formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np

from fedft.config import DataConfig
from fedft.data.demo import LABEL_NAMES, demo_splits
from fedft.errors import DataError

DATA_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TRAIN_STEMS = ("train",)
TEST_STEMS = ("test", "validation", "valid", "dev")

datasets.disable_progress_bars()


@dataclass
class RawData:
    kind: Literal["text", "image"]
    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str]
    origin: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def load_raw(cfg: DataConfig, seed: int) -> RawData:
    if cfg.source == "demo":
        raw = _demo()
    else:
        path = Path(cfg.source).expanduser()
        if path.exists():
            raw = _local(path, cfg, seed)
        elif looks_like_path(cfg.source):
            raise DataError(
                f"data path {cfg.source} does not exist; give a csv/jsonl/parquet file or a folder holding train.* (and test.*)"
            )
        else:
            raw = _hub(cfg, seed)
    return _subset(raw, cfg, seed)


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in DATA_SUFFIXES


def _demo() -> RawData:
    train, test = demo_splits()

    def to_ds(rows: list[tuple[str, int]]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"text": [t for t, _ in rows], "label": [y for _, y in rows]}
        )

    return RawData("text", to_ds(train), to_ds(test), list(LABEL_NAMES), "demo")


def find_file(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in DATA_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def read_file(path: Path) -> datasets.Dataset:
    fmt = DATA_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(DATA_SUFFIXES)}")
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # the datasets library raises many kinds for unreadable files
        raise DataError(f"{path}: could not be read as {fmt}: {str(exc).splitlines()[0]}") from exc


def _local(path: Path, cfg: DataConfig, seed: int) -> RawData:
    if path.is_dir():
        train_file = find_file(path, TRAIN_STEMS)
        if train_file is None:
            raise DataError(f"folder {path} has no train.csv, train.jsonl or train.parquet")
        test_file = Path(cfg.test_file) if cfg.test_file else find_file(path, TEST_STEMS)
        labels_txt = path / "labels.txt"
    else:
        train_file = path
        test_file = Path(cfg.test_file) if cfg.test_file else None
        labels_txt = path.parent / "labels.txt"
    if test_file is not None and not test_file.is_file():
        raise DataError(f"test file {test_file} does not exist")
    train = read_file(train_file)
    if test_file is not None:
        test = read_file(test_file)
    else:
        split = train.train_test_split(test_size=cfg.test_fraction, seed=seed)
        train, test = split["train"], split["test"]
    names = (
        [line.strip() for line in labels_txt.read_text().splitlines() if line.strip()]
        if labels_txt.is_file()
        else None
    )
    return _normalise(train, test, cfg, names, origin=str(path))


def _hub(cfg: DataConfig, seed: int) -> RawData:
    try:
        loaded = datasets.load_dataset(cfg.source)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"could not load hub dataset '{cfg.source}' ({first}); offline, give a local file or folder instead"
        ) from exc
    splits = list(loaded.keys())
    if "train" not in loaded:
        raise DataError(
            f"hub dataset '{cfg.source}' has no train split (it has {', '.join(splits)})"
        )
    test_name = next((s for s in TEST_STEMS if s in loaded), None)
    train = loaded["train"]
    if test_name is None:
        split = train.train_test_split(test_size=cfg.test_fraction, seed=seed)
        train, test = split["train"], split["test"]
    else:
        test = loaded[test_name]
    feature = train.features.get(cfg.label_column)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return _normalise(train, test, cfg, names, origin=cfg.source)


def _pixel_columns(ds: datasets.Dataset, label_column: str) -> list[str]:
    return [c for c in ds.column_names if c != label_column and c.startswith("pixel")]


def _normalise(
    train: datasets.Dataset,
    test: datasets.Dataset,
    cfg: DataConfig,
    label_names: list[str] | None,
    origin: str,
) -> RawData:
    """Rename to text/pixels + label, map string labels to ids, check labels are in range."""
    for split_name, ds in (("train", train), ("test", test)):
        if cfg.label_column not in ds.column_names:
            raise DataError(
                f"{origin}: {split_name} split has no label column '{cfg.label_column}' "
                f"(columns: {', '.join(ds.column_names[:8])}); set data.label_column"
            )
    pixel_cols = _pixel_columns(train, cfg.label_column)
    if cfg.text_column in train.column_names:
        kind = "text"
    elif pixel_cols:
        kind = "image"
    else:
        raise DataError(
            f"{origin}: no text column '{cfg.text_column}' (columns: {', '.join(train.column_names[:8])}); set data.text_column"
        )
    if kind == "text" and cfg.text_column not in test.column_names:
        raise DataError(
            f"{origin}: test split has no text column '{cfg.text_column}'; set data.text_column"
        )

    train_labels = list(train[cfg.label_column])
    test_labels = list(test[cfg.label_column])
    if any(isinstance(y, str) for y in train_labels + test_labels):
        vocab = label_names or sorted({str(y) for y in train_labels})
        index = {name: i for i, name in enumerate(vocab)}
        unknown = sorted({str(y) for y in test_labels + train_labels} - set(index))
        if unknown:
            raise DataError(
                f"{origin}: labels {unknown[:5]} are not among the classes {vocab[:10]}"
            )
        train_ids = [index[str(y)] for y in train_labels]
        test_ids = [index[str(y)] for y in test_labels]
        label_names = vocab
    else:
        try:
            train_ids = [int(y) for y in train_labels]
            test_ids = [int(y) for y in test_labels]
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"{origin}: label column '{cfg.label_column}' holds values that are not class ids: {exc}"
            ) from exc
        num = len(label_names) if label_names else max(train_ids) + 1
        for split_name, ids in (("train", train_ids), ("test", test_ids)):
            bad = next(((i, y) for i, y in enumerate(ids) if not 0 <= y < num), None)
            if bad is not None:
                raise DataError(
                    f"{origin}: {split_name} row {bad[0]} has label {bad[1]}, outside 0..{num - 1}"
                    + (" (labels.txt lists the classes)" if label_names else "")
                )
        label_names = label_names or [str(i) for i in range(num)]
    if len(label_names) < 2:
        raise DataError(
            f"{origin}: classification needs at least 2 classes, found {len(label_names)}"
        )

    def rebuild(ds: datasets.Dataset, ids: list[int]) -> datasets.Dataset:
        if kind == "text":
            texts = ["" if t is None else str(t) for t in ds[cfg.text_column]]
            return datasets.Dataset.from_dict({"text": texts, "label": ids})
        cols = _pixel_columns(ds, cfg.label_column)
        if len(cols) != len(pixel_cols):
            raise DataError(
                f"{origin}: train has {len(pixel_cols)} pixel columns, test has {len(cols)}"
            )
        pixels = np.stack([np.asarray(ds[c], dtype=np.float32) for c in pixel_cols], axis=1)
        return datasets.Dataset.from_dict({"pixels": pixels.tolist(), "label": ids})

    return RawData(
        kind, rebuild(train, train_ids), rebuild(test, test_ids), list(label_names), origin
    )


def _subset(raw: RawData, cfg: DataConfig, seed: int) -> RawData:
    def take(ds: datasets.Dataset, n: int | None) -> datasets.Dataset:
        if n is None or n >= len(ds):
            return ds
        return ds.shuffle(seed=seed).select(range(n))

    return RawData(
        raw.kind,
        take(raw.train, cfg.max_train_samples),
        take(raw.test, cfg.max_test_samples),
        raw.label_names,
        raw.origin,
    )
