"""The QA pass on data files, through the real CLI: labels that do not mean what they say and
files that cannot be read end in one line naming the file, the line and what is wrong, exit code
2, no traceback and nothing written; classes without training rows are warned in one line.

Every refusal here happens while the data is read, before a model is loaded or data is split."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fedft.cli import main

ROWS = [f"row {i},{i % 2}" for i in range(20)]  # a good body: 20 rows, classes 0 and 1


def fedft_run(capsys, tmp_path: Path, data: Path, *sets: str) -> tuple[int, str, str]:
    args = ["run", "--model", "tiny-bert", "--data", str(data)]
    for setting in (
        f"output_dir={tmp_path / 'runs'}",
        "federation.clients=2",
        "federation.rounds=1",
        "train.max_steps=1",
        "model.max_length=16",
        "data.partition=iid",
        *sets,
    ):
        args += ["--set", setting]
    code = main([*args, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_refused(capsys, tmp_path: Path, data: Path, *needles: str, sets=()) -> str:
    """One or two lines on stderr, exit code 2, no traceback, the needles (the file's name and
    what is wrong) in the message, and no run folder or any other file made."""
    before = files_under(tmp_path)
    code, _, err = fedft_run(capsys, tmp_path, data, *sets)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert 1 <= len(lines) <= 2 and lines[0].startswith("fedft: error:"), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "runs").exists(), err
    assert files_under(tmp_path) == before
    return err


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# --- labels mean what they say ------------------------------------------------------------------
LABELS = {
    "non-integer ids": (
        "text,label\na,0\nb,1.7\nc,1\n" + "\n".join(ROWS),
        "label column 'label' holds non-integer numbers (1.7 in line 3)",
    ),
    "mixed ids and names": (
        "text,label\na,0\nb,pos\n" + "\n".join(ROWS),
        "mixes numbers and names (0 in line 2, 'pos' in line 3)",
    ),
    "one class": (
        "text,label\n" + "\n".join(f"r{i},spam" for i in range(20)),
        "only one class ('spam') in label column 'label'; a classifier needs two",
    ),
    "an empty label": (
        "text,label\na,0\nb,\n" + "\n".join(ROWS),
        "line 3 has no label (column 'label' is empty there)",
    ),
    "a negative id": ("text,label\na,0\nb,-1\n" + "\n".join(ROWS), "line 3 has label -1"),
}


@pytest.mark.parametrize("case", list(LABELS))
def test_labels_that_do_not_mean_what_they_say_are_refused(capsys, tmp_path: Path, case: str):
    text, needle = LABELS[case]
    data = write(tmp_path / "data.csv", text)
    assert_refused(capsys, tmp_path, data, str(data), needle)


def test_mixed_ids_and_names_in_jsonl_and_floats_in_parquet_are_refused(capsys, tmp_path: Path):
    rows = [{"text": f"r{i}", "label": i % 2} for i in range(20)]
    data = write(tmp_path / "mixed.jsonl", jsonl([*rows, {"text": "x", "label": "pos"}]))
    assert_refused(capsys, tmp_path, data, str(data), "mixes numbers and names", "line 21")
    data = tmp_path / "floats.parquet"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0.0, 2.5, 1.0]}).to_parquet(data)
    assert_refused(capsys, tmp_path, data, str(data), "non-integer numbers (2.5 in row 2)")


def test_ids_in_train_and_names_in_test_are_refused(capsys, tmp_path: Path):
    write(tmp_path / "d" / "train.csv", "text,label\n" + "\n".join(ROWS))
    write(tmp_path / "d" / "test.csv", "text,label\na,neg\nb,pos\n")
    assert_refused(
        capsys, tmp_path, tmp_path / "d", "train.csv gives class ids but", "test.csv gives"
    )


def test_labels_txt_is_the_list_of_classes(capsys, tmp_path: Path):
    folder = tmp_path / "d"
    write(folder / "train.csv", "text,label\na,neg\nb,pos\nc,meh\n" + "\n".join(ROWS))
    write(folder / "labels.txt", "neg\npos\n")
    assert_refused(
        capsys, tmp_path, folder, "train.csv line 4 has label 'meh'", "classes in labels.txt"
    )
    write(folder / "labels.txt", "neg\npos\nneg\n")
    assert_refused(capsys, tmp_path, folder, "labels.txt lists class 'neg' twice (lines 1 and 3)")


def test_training_rows_of_one_class_once_the_test_split_is_held_out(capsys, tmp_path: Path):
    data = write(tmp_path / "data.csv", "text,label\n" + "\n".join(["a,0", "b,0", "c,1"]))
    assert_refused(
        capsys,
        tmp_path,
        data,
        str(data),
        "once the test split is held out, the training rows hold only one class",
        sets=["data.test_fraction=0.5"],
    )


def test_classes_without_training_rows_are_warned_in_one_line(capsys, caplog, tmp_path: Path):
    # (the CLI prints a warning as `fedft: <message>` on stderr; under pytest caplog holds it)
    folder = tmp_path / "d"
    write(folder / "train.csv", "text,label\n" + "\n".join(f"r{i},{['a', 'b'][i % 2]}" for i in range(20)))  # fmt: skip
    write(folder / "test.csv", "text,label\nx,a\ny,b\nz,c\n")
    write(folder / "labels.txt", "a\nb\nc\nd\n")

    def warned() -> list[str]:
        found = [r.getMessage() for r in caplog.records if "no training rows" in r.getMessage()]
        caplog.clear()
        return found

    code, _, err = fedft_run(capsys, tmp_path, folder)
    assert code == 0, err
    assert warned() == [
        f"{folder}: 2 of the 4 classes have no training rows ('c', 'd'); the model "
        "cannot learn them and their test rows count as errors"
    ]
    # without labels.txt, a class seen only in the test file is one of the classes, and warned
    (folder / "labels.txt").unlink()
    code, _, err = fedft_run(capsys, tmp_path, folder, "name=again")
    assert code == 0, err
    assert [m.split(": ", 1)[1][:40] for m in warned()] == [
        "1 of the 3 classes has no training rows "
    ]


# --- files that cannot be read ------------------------------------------------------------------
FILES = {
    "empty.csv": (b"", "is empty"),
    "header-only.csv": ("text,label\n\n", "has a header (text,label) but no rows"),
    "empty.jsonl": ("\n\n", "is empty"),
    "empty.parquet": (None, "has no rows"),
    "not-a.parquet": (b"PAR1 but not really", "could not be read as parquet"),
    "latin1.csv": ("text,label\ncafé,0\nb,1\n".encode("latin-1"), "line 2 is not UTF-8 (byte 0xe9)"),
    "utf16.csv": ("text,label\na,0\nb,1\n".encode("utf-16"), "is UTF-16, not UTF-8"),
    "too-many.csv": ("text,label\na,0\nb, c,1\n", "line 3 has 3 fields but the header has 2"),
    "too-few.csv": ("text,label\na,0\nb\nc,1\n", "line 3 has 1 field but the header has 2"),
    "unclosed.csv": ('text,label\na,0\n"b,1\nc,0\n', "a quote opened on line 3 is not closed"),
    "bad.jsonl": ('{"text": "a", "label": 0}\n{"text": "b" "label": 1}\n', "line 2 is not valid JSON"),
    "list.jsonl": ('{"text": "a", "label": 0}\n\n[1, 2]\n', "line 3 holds a JSON list, not an object"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FILES))
def test_unreadable_files_say_which_file_which_line_and_what(capsys, tmp_path: Path, name: str):
    content, needle = FILES[name]
    data = tmp_path / name
    if content is None:
        pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=int)}).to_parquet(data)  # fmt: skip
    else:
        write(data, content)
    assert_refused(capsys, tmp_path, data, str(data), needle)


def test_a_bad_test_file_is_named_too(capsys, tmp_path: Path):
    folder = tmp_path / "d"
    write(folder / "train.csv", "text,label\n" + "\n".join(ROWS))
    write(folder / "test.csv", "text,label\n")
    assert_refused(capsys, tmp_path, folder, str(folder / "test.csv"), "but no rows")


def test_columns_and_row_count_are_checked_before_anything_splits(capsys, tmp_path: Path):
    # one row with the wrong columns: the columns are named, not a splitter's traceback
    data = write(tmp_path / "one.csv", "sentence,y\nhello,0\n")
    assert_refused(capsys, tmp_path, data, str(data), "no label column 'label' (columns: sentence, y)")  # fmt: skip
    data = write(tmp_path / "one-good.csv", "text,label\nhello,0\n")
    assert_refused(
        capsys,
        tmp_path,
        data,
        str(data),
        "has 1 row: too few to hold out a test split (data.test_fraction=0.2)",
        "give at least 2 rows",
    )
