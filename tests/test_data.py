import json
from pathlib import Path

import pandas as pd
import pytest

from fedft.config import DataConfig
from fedft.data.demo import demo_splits
from fedft.data.sources import load_raw
from fedft.errors import DataError

from helpers import shared_dataset


def test_demo_is_deterministic_balanced_and_varied():
    train, test = demo_splits()
    assert demo_splits() == (train, test)
    labels = [y for _, y in train]
    assert sorted(set(labels)) == list(range(8))
    assert all(labels.count(k) == len(train) // 8 for k in range(8))
    train_texts, test_texts = {t for t, _ in train}, {t for t, _ in test}
    assert len(train_texts) > 0.9 * len(train)  # few repeated sentences
    assert len(train_texts & test_texts) < 0.05 * len(test)


def write_rows(path: Path, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        frame.to_parquet(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_local_files_with_custom_columns_and_string_labels(tmp_path: Path, suffix: str):
    rows = [{"sentence": f"row {i}", "y": ["cat", "dog", "emu"][i % 3]} for i in range(50)]
    write_rows(tmp_path / f"train{suffix}", rows)
    write_rows(tmp_path / f"test{suffix}", rows[:9])
    raw = load_raw(
        DataConfig(source=str(tmp_path), text_column="sentence", label_column="y"), seed=0
    )
    assert raw.label_names == ["cat", "dog", "emu"]
    assert len(raw.train) == 50 and len(raw.test) == 9
    assert raw.train["label"][:4] == [0, 1, 2, 0] and raw.train["text"][1] == "row 1"


def test_single_file_gets_a_held_out_test_split(tmp_path: Path):
    write_rows(tmp_path / "all.csv", [{"text": f"t{i}", "label": i % 2} for i in range(100)])
    raw = load_raw(DataConfig(source=str(tmp_path / "all.csv"), test_fraction=0.25), seed=0)
    assert (len(raw.train), len(raw.test)) == (75, 25)
    assert not set(raw.train["text"]) & set(raw.test["text"])


@pytest.mark.parametrize(
    ("rows", "cfg", "needle"),
    [
        ([{"text": "a", "label": 0}], {"text_column": "sentence"}, "no text column 'sentence'"),
        ([{"text": "a", "label": 0}], {"label_column": "y"}, "no label column 'y'"),
        ([{"text": "a", "label": 0}, {"text": "b", "label": 5}], {}, "has label 5, outside 0..1"),
        ([{"text": "a", "label": 0}, {"text": "b", "label": -1}], {}, "has label -1"),
    ],
)
def test_bad_files_say_what_to_fix(tmp_path: Path, rows, cfg, needle):
    write_rows(tmp_path / "train.csv", rows * 5)
    (tmp_path / "labels.txt").write_text("neg\npos\n")
    with pytest.raises(DataError) as info:
        load_raw(DataConfig(source=str(tmp_path), **cfg), seed=0)
    assert needle in str(info.value)


def test_missing_path_and_offline_hub_name():
    with pytest.raises(DataError, match="does not exist"):
        load_raw(DataConfig(source="./no/such/folder"), seed=0)
    with pytest.raises(
        DataError, match="could not load hub dataset 'someone/no-such-dataset'.*offline"
    ):
        load_raw(DataConfig(source="someone/no-such-dataset"), seed=0)


def test_real_sst2_folder_with_labels_txt_and_subset():
    path = shared_dataset("sst2")
    raw = load_raw(DataConfig(source=str(path), max_train_samples=500), seed=0)
    assert raw.label_names == ["negative", "positive"]
    assert len(raw.train) == 500 and len(raw.test) == 872  # validation.csv is the test split
    assert set(raw.train["label"]) == {0, 1}


def test_real_optdigits_is_an_image_task():
    path = shared_dataset("optdigits")
    raw = load_raw(DataConfig(source=str(path), max_train_samples=100), seed=0)
    assert raw.kind == "image" and raw.num_labels == 10 and len(raw.train[0]["pixels"]) == 64
