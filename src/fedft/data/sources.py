"""Where the rows come from: the built-in demo set, local files or folders, or a hub dataset.

Whatever the source, the result is a `RawData` with a `label` column of integer class ids and
either a `text` column (text tasks) or a `pixels` column (image tasks), so the rest of the
pipeline never looks at file formats.

Local csv and jsonl files are parsed here with the standard library (parquet with pyarrow), not
by `datasets`' loaders, so that a bad file is refused in one line that names the file, the line
(csv, jsonl) or row (parquet, hub splits, counted from 1) and what is wrong; and every check on
columns, row counts and labels runs on each file before a test split is held out. The rules, each
refused with a `DataError` unless marked *warned*:

- A file: not empty, not a header (or blank lines) alone, UTF-8 (a byte-order mark is fine),
  every csv row with as many fields as the header (blank lines are skipped), every jsonl line a
  JSON object (a `.json` file may instead hold one JSON list of objects).
- Columns: the label column, and the text column or `pixel_*` columns, in every file; pixel values
  are numbers.
- Rows: a held-out test split (no test file) needs enough rows that `data.test_fraction` of them
  (rounded up) is at least one and at least one stays for training.
- Labels: every row has one, and a column gives either class ids or class names, never both. Ids
  are whole numbers (`1.0` is 1, `1.7` is refused) from 0, below the number of classes in
  `labels.txt` when there is one (else the classes are 0 to the largest id). Names are those of
  `labels.txt` (which lists each once) when there is one, else the distinct names sorted. A csv
  column whose every value is a number holds ids, as in any spreadsheet.
- Classes: training rows of a single class are refused (a classifier needs two); a class with no
  training rows (listed in `labels.txt`, found only in the test rows, or an id skipped) is
  *warned* in one line, since the model cannot learn it and its test rows count as errors.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np

from fedft.config import DataConfig
from fedft.data.demo import LABEL_NAMES, demo_splits
from fedft.errors import DataError

DATA_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TRAIN_STEMS = ("train",)
TEST_STEMS = ("test", "validation", "valid", "dev")

datasets.disable_progress_bars()
log = logging.getLogger("fedft")

# A csv cell that is a number, as a spreadsheet (or pandas, which read these files before) sees it.
_INT = re.compile(r"\s*[+-]?\d+\s*", re.ASCII)
_FLOAT = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", re.ASCII)
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


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


@dataclass
class Table:
    """One file's (or hub split's) rows as columns of plain values, with where each row came from,
    so a message can name the file and the line the user has to fix."""

    name: str
    columns: dict[str, list[Any]]
    lines: list[int] | None = None  # the line each row starts on (csv, jsonl); None: count rows
    names: list[str] = field(default_factory=list)  # every column's name, in file order

    def __post_init__(self) -> None:
        if not self.names:
            self.names = list(self.columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def at(self, row: int) -> str:
        """Where a row is in its file: 'line N' as an editor counts (csv, jsonl), else 'row N'."""
        return f"line {self.lines[row]}" if self.lines is not None else f"row {row + 1}"

    def where(self, row: int) -> str:
        return f"{self.name} {self.at(row)}"

    def select(self, rows: Iterable[int]) -> Table:
        rows = list(rows)
        return Table(
            self.name,
            {k: [v[i] for i in rows] for k, v in self.columns.items()},
            None if self.lines is None else [self.lines[i] for i in rows],
            list(self.names),
        )

    def to_dataset(self) -> datasets.Dataset:
        """The rows as a `datasets.Dataset`; a column whose values Arrow cannot hold as one type
        (a jsonl key that is a number in one line and a word in the next) becomes text."""
        import pyarrow as pa

        columns = {}
        for key, values in self.columns.items():
            try:
                pa.array(values)
                columns[key] = values
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                columns[key] = [None if v is None else str(v) for v in values]
        return datasets.Dataset.from_dict(columns)


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
    """A local data file as a `datasets.Dataset`, refused in one line if it is not readable (see
    the module's docstring for what a file must be)."""
    return read_table(path).to_dataset()


def read_table(path: Path) -> Table:
    """A local csv, jsonl/json or parquet file, checked as it is read: one line naming the file,
    the line and what is wrong, instead of a parser's traceback."""
    fmt = DATA_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(DATA_SUFFIXES)}")
    try:
        if fmt == "csv":
            return _read_csv(path)
        if fmt == "json":
            return _read_json(path)
        return _read_parquet(path)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path) from exc
    except OSError as exc:
        raise DataError(f"{path}: could not be read ({exc.strerror or exc})") from exc


def _not_utf8(path: Path) -> DataError:
    """The message for a file that is not UTF-8, naming the first line that does not decode
    (a newline byte is never inside a UTF-8 character, so lines can be checked one by one)."""
    with path.open("rb") as f:
        if f.read(2) in _UTF16_BOMS:
            return DataError(f"{path} is UTF-16, not UTF-8; re-encode the file as UTF-8")
        f.seek(0)
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return DataError(
                    f"{path} line {number} is not UTF-8 (byte 0x{line[exc.start]:02x}); "
                    "re-encode the file as UTF-8"
                )
    return DataError(f"{path} is not UTF-8; re-encode the file as UTF-8")


def _header_names(row: list[str]) -> list[str]:
    """Column names as pandas gave them when it read these files: an empty name is `Unnamed: i`,
    a repeated one gets `.1`, `.2`, ... (so a file that worked before names the same columns)."""
    names: list[str] = []
    for i, raw in enumerate(row):
        base = raw if raw.strip() else f"Unnamed: {i}"
        name, k = base, 0
        while name in names:
            k += 1
            name = f"{base}.{k}"
        names.append(name)
    return names


def _csv_column(cells: list[str]) -> list[Any]:
    """A csv column's cells as values: all numbers (empty cells aside) become ints, or floats if
    any has a fraction or exponent; otherwise text. Empty cells are None either way."""
    filled = [c for c in cells if c != ""]
    if filled and all(_INT.fullmatch(c) for c in filled):
        return [int(c) if c != "" else None for c in cells]
    if filled and all(_FLOAT.fullmatch(c) for c in filled):
        return [float(c) if c != "" else None for c in cells]
    return [c if c != "" else None for c in cells]


def _read_csv(path: Path) -> Table:
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a long text is not an error
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        start = 1
        try:
            for row in reader:
                blank = not row or (len(row) == 1 and not row[0].strip())
                if blank:
                    pass
                elif header is None:
                    header = row
                elif len(row) != len(header):
                    raise _ragged(path, start, reader.line_num, len(row), len(header))
                else:
                    rows.append(row)
                    lines.append(start)
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataError(f"{path} line {start}: not readable as csv ({exc})") from exc
    if header is None:
        raise DataError(f"{path} is empty; a csv file needs a header line and rows")
    if not rows:
        raise DataError(f"{path} has a header ({','.join(header)[:80]}) but no rows")
    names = _header_names(header)
    columns = {name: _csv_column([r[i] for r in rows]) for i, name in enumerate(names)}
    return Table(str(path), columns, lines)


def _ragged(path: Path, start: int, end: int, fields: int, width: int) -> DataError:
    """A csv row with more or fewer fields than the header, with the likely cause."""
    if fields > width:
        hint = " (quote a field that holds a comma)"
    elif end > start:  # the row ran over several lines: a quote that never closed took them
        hint = f" (a quote opened on line {start} is not closed)"
    else:
        hint = ""
    return DataError(
        f"{path} line {start} has {fields} field{'s' if fields != 1 else ''} but the header has "
        f"{width}{hint}"
    )


def _read_json(path: Path) -> Table:
    """JSON lines (one object per line, blank lines skipped), or one JSON list of objects; a key
    missing from a row is None there."""
    text = path.read_text(encoding="utf-8-sig")
    lines = text.split("\n")  # not splitlines(): U+2028 and friends may sit inside a JSON string
    if text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            first = next(line for line in lines if line.strip())
            if not _parses(first):  # a JSON document, not JSON lines that are lists
                raise DataError(
                    f"{path} line {exc.lineno} is not valid JSON ({exc.msg}, column {exc.colno})"
                ) from exc
        else:
            if isinstance(doc, list):
                for i, obj in enumerate(doc):
                    if not isinstance(obj, dict):
                        raise DataError(
                            f"{path}: item {i + 1} of its list is a JSON {_json_kind(obj)}, "
                            "not an object of column: value"
                        )
                return _json_table(path, doc, None)
    records: list[dict[str, Any]] = []
    numbers: list[int] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {number} is not valid JSON ({exc.msg}, column {exc.colno})"
            ) from exc
        if not isinstance(obj, dict):
            raise DataError(
                f"{path} line {number} holds a JSON {_json_kind(obj)}, not an object of "
                "column: value"
            )
        records.append(obj)
        numbers.append(number)
    return _json_table(path, records, numbers)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _json_table(path: Path, records: list[dict[str, Any]], lines: list[int] | None) -> Table:
    if not records:
        raise DataError(f"{path} is empty; it needs one JSON object (a row) per line")
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    columns = {name: [r.get(name) for r in records] for name in names}
    return Table(str(path), columns, lines)


def _read_parquet(path: Path) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, ValueError) as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: could not be read as parquet ({first})") from exc
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows")
    return Table(str(path), {name: table.column(name).to_pylist() for name in table.column_names})


def read_label_names(path: Path) -> list[str] | None:
    """The class names of a `labels.txt`, one per line (blank lines skipped); None if it is not
    there. A name listed twice is refused: it would give one class two ids."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path) from exc
    names: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            raise DataError(
                f"{path} lists class '{name}' twice (lines {seen[name]} and {number}); "
                "give each class once"
            )
        seen[name] = number
        names.append(name)
    return names


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
    names = read_label_names(labels_txt)
    train = read_table(train_file)
    test = read_table(test_file) if test_file is not None else None
    return _normalise(train, test, cfg, names, origin=str(path), seed=seed)


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
    feature = loaded["train"].features.get(cfg.label_column)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def table(split: str) -> Table:
        ds = loaded[split]
        used = [
            c
            for c in ds.column_names
            if c in (cfg.label_column, cfg.text_column) or c.startswith("pixel")
        ]
        return Table(
            f"hub dataset '{cfg.source}' {split} split",
            {c: list(ds[c]) for c in used},
            names=list(ds.column_names),
        )

    test = table(test_name) if test_name is not None else None
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


def _check_labels(table: Table, column: str, names: list[str] | None) -> Literal["ids", "names"]:
    """Whether the table's labels are class ids or class names, refused (naming the first row at
    fault) if one is missing, a number that is not whole, an id out of range, a name that
    labels.txt does not list, or if the column mixes numbers and names."""
    first_number: tuple[int, Any] | None = None  # (row, value) of the first id-like label
    first_name: tuple[int, str] | None = None
    known = set(names or ())
    for i, y in enumerate(table.columns[column]):
        if y is None or (isinstance(y, str) and not y.strip()):
            raise DataError(
                f"{table.where(i)} has no label (column '{column}' is empty there); "
                "every row needs its class"
            )
        if isinstance(y, float):
            if not (math.isfinite(y) and y.is_integer()):
                raise DataError(
                    f"{table.name}: label column '{column}' holds non-integer numbers ({y:g} in "
                    f"{table.at(i)}); give class ids (0, 1, ...) or class names"
                )
            y = int(y)
        if isinstance(y, int):  # bool too: true/false are 1/0, as before
            y = int(y)
            if y < 0:
                raise DataError(f"{table.where(i)} has label {y}; class ids count from 0")
            if names and y >= len(names):
                raise DataError(
                    f"{table.where(i)} has label {y}, outside 0..{len(names) - 1} "
                    "(labels.txt lists the classes)"
                )
            first_number = first_number or (i, y)
        elif isinstance(y, str):
            if names and y not in known:
                listed = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
                raise DataError(
                    f"{table.where(i)} has label {y!r}, not one of the classes in labels.txt "
                    f"({listed})"
                )
            if not names and _FLOAT.fullmatch(y):
                first_number = first_number or (i, y)
            else:
                first_name = first_name or (i, y)
        else:
            raise DataError(
                f"{table.where(i)} has label {y!r} (a {type(y).__name__}), neither a class id "
                "nor a class name"
            )
        if first_number is not None and first_name is not None:
            (rn, number), (rs, name) = first_number, first_name
            raise DataError(
                f"{table.name}: label column '{column}' mixes numbers and names ({number} in "
                f"{table.at(rn)}, {name!r} in {table.at(rs)}); give all class ids or all class "
                "names"
            )
    if first_number is None or isinstance(first_number[1], str):
        return "names"  # numbers written as JSON strings ("0", "1") stay names, as before
    return "ids"


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
    label_kind = _check_labels(train, col, label_names)
    if test is None:
        train, test = _split(train, cfg.test_fraction, seed)
    elif _check_labels(test, col, label_names) != label_kind:
        raise DataError(
            f"{train.name} gives class {label_kind} but {test.name} gives class "
            f"{'names' if label_kind == 'ids' else 'ids'}; give the same kind in both"
        )

    train_labels, test_labels = train.columns[col], test.columns[col]
    if label_kind == "names":
        vocab = label_names or sorted({str(y) for y in train_labels + test_labels})
        index = {name: i for i, name in enumerate(vocab)}
        train_ids = [index[str(y)] for y in train_labels]
        test_ids = [index[str(y)] for y in test_labels]
    else:
        train_ids = [int(y) for y in train_labels]
        test_ids = [int(y) for y in test_labels]
        num = len(label_names) if label_names else max(train_ids + test_ids) + 1
        vocab = label_names or [str(i) for i in range(num)]
    _check_classes(train, test, train_ids, test_ids, vocab, col, origin)

    def rebuild(table: Table, ids: list[int]) -> datasets.Dataset:
        if kind == "text":
            texts = ["" if t is None else str(t) for t in table.columns[cfg.text_column]]
            return datasets.Dataset.from_dict({"text": texts, "label": ids})
        pixels = np.stack(
            [np.asarray(table.columns[c], dtype=np.float32) for c in pixel_cols], axis=1
        )
        return datasets.Dataset.from_dict({"pixels": pixels.tolist(), "label": ids})

    return RawData(kind, rebuild(train, train_ids), rebuild(test, test_ids), list(vocab), origin)


def _check_classes(
    train: Table,
    test: Table,
    train_ids: list[int],
    test_ids: list[int],
    vocab: list[str],
    column: str,
    origin: str,
) -> None:
    """Refuse training rows of one class; warn, in one line, of classes with no training rows."""
    seen = set(train_ids)
    if len(seen) < 2:
        only = vocab[next(iter(seen))]
        if len(seen | set(test_ids)) < 2:
            raise DataError(
                f"{origin}: only one class ({only!r}) in label column '{column}'; "
                "a classifier needs two"
            )
        if test.name == train.name:  # the held-out split took every row of the others
            raise DataError(
                f"{train.name}: once the test split is held out, the training rows hold only one "
                f"class ({only!r}); a classifier needs two (give more rows, or a test file)"
            )
        raise DataError(
            f"{train.name} holds only one class ({only!r}); the others are only in {test.name}; "
            "a classifier needs two to learn"
        )
    absent = [name for i, name in enumerate(vocab) if i not in seen]
    if absent:
        shown = ", ".join(repr(a) for a in absent[:5]) + (", ..." if len(absent) > 5 else "")
        log.warning(
            "%s: %d of the %d classes %s no training rows (%s); the model cannot learn them "
            "and their test rows count as errors",
            origin,
            len(absent),
            len(vocab),
            "has" if len(absent) == 1 else "have",
            shown,
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
