"""Where the rows come from: the built-in demo set, local files or folders, or a hub dataset.

Whatever the source, the result is a `RawData` with a `label` column of integer class ids and
either a `text` column (text tasks) or a `pixels` column (image tasks), so the rest of the
pipeline never looks at file formats.

Each local file is read into a checked table (`fedft.data.files`), and a hub split is made one,
so that every check on columns, row counts and labels (`fedft.data.labels`) runs on each file
before a test split is held out, and a message names the file and the line (or row) at fault.
The rules checked here, each refused with a `DataError`:

- Columns: the label column, and the text column or `pixel_*` columns, in every file; pixel values
  are numbers.
- Rows: a held-out test split (no test file) needs enough rows that `data.test_fraction` of them
  (rounded up) is at least one and at least one stays for training.

For a generation task (a causal LM) the columns say what the rows are (`RawData.generation`):

- `sft`: a response column (`task.response_column`, else the first of output, response,
  completion, answer) and a prompt: `task.prompt_column`, else `instruction` followed by
  `task.input_column` when a row has one (the Alpaca/Dolly convention), else `prompt`. Every row
  needs a response. The label column is optional here: when present it names a class per row
  (checked as a classification label) that label-skewed partitions split by.
- `labels`: a text and a label column, as for classification: the model answers the label's word.
- `lm`: a text column alone: language modelling on the whole text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np

from fedft.config import DataConfig, TaskConfig
from fedft.data.demo import LABEL_NAMES, demo_splits
from fedft.data.files import DATA_SUFFIXES, Table, find_file, read_label_names, read_table
from fedft.data.labels import check_labels, check_test_labels, class_ids
from fedft.errors import DataError

RESPONSE_COLUMNS = ("output", "response", "completion", "answer")
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
    generation: Literal["sft", "labels", "lm"] | None = None  # None: a classification task

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def load_raw(cfg: DataConfig, seed: int, task: TaskConfig | None = None) -> RawData:
    """The run's rows; `task` given: rows for a generation task (see the module's docstring)."""
    if cfg.source == "demo":
        raw = _demo()
        if task is not None:
            raw.generation = "labels"
    else:
        path = Path(cfg.source).expanduser()
        if path.exists():
            raw = _local(path, cfg, seed, task)
        elif looks_like_path(cfg.source):
            raise DataError(
                f"data path {cfg.source} does not exist; give a csv/jsonl/parquet file or a folder holding train.* (and test.*)"
            )
        else:
            raw = _hub(cfg, seed, task)
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


def _local(path: Path, cfg: DataConfig, seed: int, task: TaskConfig | None) -> RawData:
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
    names = read_label_names(labels_txt)
    train = read_table(train_file)
    test = read_table(test_file) if test_file is not None else None
    if task is not None:
        return _generation(train, test, cfg, task, names, origin=str(path), seed=seed)
    return _normalise(train, test, cfg, names, origin=str(path), seed=seed)


def _hub(cfg: DataConfig, seed: int, task: TaskConfig | None) -> RawData:
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
    feature = loaded["train"].features.get(cfg.label_column)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def table(split: str) -> Table:
        ds = loaded[split]
        used = [
            c
            for c in ds.column_names
            if task is not None  # a generation task may read any column
            or c in (cfg.label_column, cfg.text_column, cfg.partition_column)
            or c.startswith("pixel")
        ]
        return Table(
            f"hub dataset '{cfg.source}' {split} split",
            {c: list(ds[c]) for c in used},
            names=list(ds.column_names),
        )

    test = table(test_name) if test_name is not None else None
    if task is not None:
        return _generation(table("train"), test, cfg, task, names, origin=cfg.source, seed=seed)
    return _normalise(table("train"), test, cfg, names, origin=cfg.source, seed=seed)


def _pixel_columns(table: Table, label_column: str) -> list[str]:
    return [c for c in table.names if c != label_column and c.startswith("pixel")]


def _check_columns(table: Table, cfg: DataConfig, kind: str | None) -> str:
    """The table's kind (text or image; `kind` when the train table already set it), refused if
    it lacks the label column or the inputs, or holds a pixel value that is not a number."""
    shown = ", ".join(table.names[:8]) + (", ..." if len(table.names) > 8 else "")
    if cfg.label_column not in table.columns:
        raise DataError(
            f"{table.name}: no label column '{cfg.label_column}' (columns: {shown}); "
            "set data.label_column"
        )
    pixels = _pixel_columns(table, cfg.label_column)
    if kind != "image" and cfg.text_column in table.columns:
        return "text"
    if kind == "image" and not pixels:
        raise DataError(
            f"{table.name}: no pixel columns (columns: {shown}); the train file's images are "
            "pixel_0..pixel_N"
        )
    if kind == "text" or not pixels:
        raise DataError(
            f"{table.name}: no text column '{cfg.text_column}' (columns: {shown}); "
            "set data.text_column"
        )
    for column in pixels:
        for i, v in enumerate(table.columns[column]):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise DataError(
                    f"{table.where(i)} has {v!r} in pixel column '{column}'; pixel values are "
                    "numbers"
                )
    return "image"


def _split(table: Table, fraction: float, seed: int) -> tuple[Table, Table]:
    """Hold out `fraction` of the rows as the test split, refused when too few rows are left on
    either side. The rows are `datasets`' own seeded split, so a file splits as it did before."""
    n = len(table)
    n_test = math.ceil(fraction * n)
    if n_test < 1 or n - n_test < 1:
        need = next(k for k in range(2, 10**6) if k - math.ceil(fraction * k) >= 1)
        raise DataError(
            f"{table.name} has {n} row{'s' if n != 1 else ''}: too few to hold out a test split "
            f"(data.test_fraction={fraction}) and train on the rest; give at least {need} rows "
            "or a test file (data.test_file)"
        )
    index = datasets.Dataset.from_dict({"row": list(range(n))})
    split = index.train_test_split(test_size=fraction, seed=seed)
    return table.select(split["train"]["row"]), table.select(split["test"]["row"])


def _normalise(
    train: Table,
    test: Table | None,
    cfg: DataConfig,
    label_names: list[str] | None,
    origin: str,
    seed: int,
) -> RawData:
    """Check columns, labels and row counts of each file before anything splits it, hold out a
    test split if there is no test table, then map labels to ids and check the classes."""
    col = cfg.label_column
    kind = _check_columns(train, cfg, None)
    if test is not None:
        _check_columns(test, cfg, kind)
    pixel_cols = _pixel_columns(train, col) if kind == "image" else []
    if test is not None and kind == "image":
        missing = [c for c in pixel_cols if c not in test.columns]
        if missing or len(_pixel_columns(test, col)) != len(pixel_cols):
            raise DataError(
                f"{origin}: train has {len(pixel_cols)} pixel columns, test has "
                f"{len(_pixel_columns(test, col))}" + (f" (no '{missing[0]}')" if missing else "")
            )
    label_kind = check_labels(train, col, label_names)
    if test is None:
        train, test = _split(train, cfg.test_fraction, seed)
    else:
        check_test_labels(test, train, col, label_names, label_kind)
    train_ids, test_ids, vocab = class_ids(train, test, col, label_names, label_kind, origin)

    def rebuild(table: Table, ids: list[int]) -> datasets.Dataset:
        if kind == "text":
            texts = ["" if t is None else str(t) for t in table.columns[cfg.text_column]]
            return with_group(datasets.Dataset.from_dict({"text": texts, "label": ids}), table, cfg)
        pixels = np.stack(
            [np.asarray(table.columns[c], dtype=np.float32) for c in pixel_cols], axis=1
        )
        rows = datasets.Dataset.from_dict({"pixels": pixels.tolist(), "label": ids})
        return with_group(rows, table, cfg)

    return RawData(kind, rebuild(train, train_ids), rebuild(test, test_ids), list(vocab), origin)


GROUP = "__group__"  # data.partition=column: each row's value of data.partition_column, as text


def with_group(rows: datasets.Dataset, table: Table, cfg: DataConfig) -> datasets.Dataset:
    """The rows with their `data.partition_column` values (partition=column), which the
    partition reads; other partitions carry nothing extra."""
    if cfg.partition != "column":
        return rows
    column = cfg.partition_column
    if column not in table.columns:
        raise DataError(
            f"{table.name}: no column '{column}' to partition by (columns: {_shown(table)}); "
            "set data.partition_column"
        )
    return rows.add_column(GROUP, ["" if v is None else str(v) for v in table.columns[column]])


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
        raw.generation,
    )


# --- generation rows -------------------------------------------------------------------------
def _shown(table: Table) -> str:
    return ", ".join(table.names[:8]) + (", ..." if len(table.names) > 8 else "")


def generation_columns(
    table: Table, cfg: DataConfig, task: TaskConfig
) -> tuple[Literal["sft", "labels", "lm"], list[str], str | None]:
    """What a table's rows are for generation: (kind, prompt columns, response column)."""
    columns = table.columns
    for wanted, what in ((task.response_column, "response"), (task.prompt_column, "prompt")):
        if wanted is not None and wanted not in columns:
            raise DataError(
                f"{table.name}: no {what} column '{wanted}' (columns: {_shown(table)}); "
                f"set task.{what}_column"
            )
    response = task.response_column or next((c for c in RESPONSE_COLUMNS if c in columns), None)
    if response is not None:
        if task.prompt_column is not None:
            prompt = [task.prompt_column]
        elif "instruction" in columns:
            prompt = ["instruction"] + ([task.input_column] if task.input_column in columns else [])
        elif "prompt" in columns:
            prompt = ["prompt"]
        else:
            raise DataError(
                f"{table.name}: a response column '{response}' but no prompt (columns: "
                f"{_shown(table)}); name it instruction or prompt, or set task.prompt_column"
            )
        return "sft", prompt, response
    if cfg.text_column in columns:
        return ("labels" if cfg.label_column in columns else "lm"), [cfg.text_column], None
    raise DataError(
        f"{table.name}: nothing to generate from (columns: {_shown(table)}); give instruction/"
        f"input/output or prompt/response columns, a text column with labels, or a text column "
        "alone (set task.prompt_column, task.response_column or data.text_column)"
    )


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _prompt_of(table: Table, row: int, columns: list[str]) -> str:
    """The user's content of a row: its instruction, then its input (when it has one)."""
    parts = [_text(table.columns[c][row]).strip() for c in columns]
    return "\n\n".join(p for p in parts if p)


def _generation(
    train: Table,
    test: Table | None,
    cfg: DataConfig,
    task: TaskConfig,
    label_names: list[str] | None,
    origin: str,
    seed: int,
) -> RawData:
    """Rows for a causal LM. Classification rows (text + label) keep the classification checks;
    prompt/response rows need a response in every row and may carry a class column."""
    kind, prompts, response = generation_columns(train, cfg, task)
    if kind == "labels":
        raw = _normalise(train, test, cfg, label_names, origin=origin, seed=seed)
        raw.generation = "labels"
        return raw
    if test is not None and generation_columns(test, cfg, task)[0] != kind:
        raise DataError(f"{origin}: the train and test files hold different columns")
    classes = kind == "sft" and cfg.label_column in train.columns
    if classes:
        label_kind = check_labels(train, cfg.label_column, label_names)
    if test is None:
        train, test = _split(train, cfg.test_fraction, seed)
    elif classes:
        if cfg.label_column not in test.columns:
            raise DataError(
                f"{test.name}: no class column '{cfg.label_column}' as in the train file"
            )
        check_test_labels(test, train, cfg.label_column, label_names, label_kind)
    if classes:
        train_ids, test_ids, vocab = class_ids(
            train, test, cfg.label_column, label_names, label_kind, origin
        )
    else:
        train_ids, test_ids, vocab = [0] * len(train), [0] * len(test), []

    def rebuild(table: Table, ids: list[int]) -> datasets.Dataset:
        if kind == "lm":
            texts = [_text(t) for t in table.columns[cfg.text_column]]
            return with_group(datasets.Dataset.from_dict({"text": texts, "label": ids}), table, cfg)
        assert response is not None
        answers = []
        for i, value in enumerate(table.columns[response]):
            if value is None or not str(value).strip():
                raise DataError(
                    f"{table.where(i)} has no response (column '{response}' is empty there); "
                    "every row needs the answer to learn"
                )
            answers.append(str(value).strip())
        rows = range(len(table))
        out = datasets.Dataset.from_dict(
            {
                "prompt": [_prompt_of(table, i, prompts) for i in rows],
                "response": answers,
                "label": ids,
            }
        )
        return with_group(out, table, cfg)

    return RawData(
        "text", rebuild(train, train_ids), rebuild(test, test_ids), list(vocab), origin, kind
    )
