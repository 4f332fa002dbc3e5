"""What labels mean: class ids or class names, checked on each file and mapped to class ids.

A file's labels are checked before a test split is held out of it, so that a message names the
row at fault in the file the user has to fix. The rules, each refused with a `DataError` unless
marked *warned*:

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

import logging
import math
from typing import Any, Literal

from fedft.data.files import NUMBER, Table
from fedft.errors import DataError

LabelKind = Literal["ids", "names"]

log = logging.getLogger("fedft")


def check_labels(table: Table, column: str, names: list[str] | None) -> LabelKind:
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
            if not names and NUMBER.fullmatch(y):
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


def check_test_labels(
    test: Table, train: Table, column: str, names: list[str] | None, train_kind: LabelKind
) -> None:
    """Check the test table's labels as the train table's were, refused if they are of the other
    kind: ids in one file and names in the other would not say which class is which."""
    if check_labels(test, column, names) != train_kind:
        raise DataError(
            f"{train.name} gives class {train_kind} but {test.name} gives class "
            f"{'names' if train_kind == 'ids' else 'ids'}; give the same kind in both"
        )


def class_ids(
    train: Table,
    test: Table,
    column: str,
    names: list[str] | None,
    kind: LabelKind,
    origin: str,
) -> tuple[list[int], list[int], list[str]]:
    """Each train and test row's class id and the class names in id order, once the classes are
    checked. Names are numbered by labels.txt, else sorted over both tables, so that the ids do not
    depend on which rows came first; ids are kept as they are."""
    train_labels, test_labels = train.columns[column], test.columns[column]
    if kind == "names":
        vocab = names or sorted({str(y) for y in train_labels + test_labels})
        index = {name: i for i, name in enumerate(vocab)}
        train_ids = [index[str(y)] for y in train_labels]
        test_ids = [index[str(y)] for y in test_labels]
    else:
        train_ids = [int(y) for y in train_labels]
        test_ids = [int(y) for y in test_labels]
        num = len(names) if names else max(train_ids + test_ids) + 1
        vocab = names or [str(i) for i in range(num)]
    check_classes(train, test, train_ids, test_ids, vocab, column, origin)
    return train_ids, test_ids, vocab


def check_classes(
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
