"""Reading one data file into a checked table: a csv, jsonl/json or parquet file, or a labels.txt.

Local csv and jsonl files are parsed here with the standard library (parquet with pyarrow), not
by `datasets`' loaders, so that a bad file is refused in one line that names the file, the line
(csv, jsonl) or row (parquet, hub splits, counted from 1) and what is wrong, instead of a parser's
traceback. A file is refused with a `DataError` unless it is: not empty, not a header (or blank
lines) alone, UTF-8 (a byte-order mark is fine), every csv row with as many fields as the header
(blank lines are skipped), every jsonl line a JSON object (a `.json` file may instead hold one JSON
list of objects). A `labels.txt` lists each class name once.

What the columns must hold, and what the labels mean, is checked on the `Table` by the callers
(`fedft.data.sources`, `fedft.data.labels`), which is why a table keeps the line each row came from.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from fedft.errors import DataError

DATA_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# A csv cell that is a number, as a spreadsheet (or pandas, which read these files before) sees it.
_INT = re.compile(r"\s*[+-]?\d+\s*", re.ASCII)
NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", re.ASCII)
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


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
    if filled and all(NUMBER.fullmatch(c) for c in filled):
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
