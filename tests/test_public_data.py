"""Public data is public: the demo set's public split shares no row with the clients' splits, and
`fedpft` and `fedpt` refuse public data that is the clients' training data (the same source, a
copy of its rows, or some of its rows)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedft.config import DataConfig
from fedft.data.demo import DEMO_PUBLIC_SIZE, demo_public_texts, demo_splits
from fedft.data.public import PublicDataOptions, check_not_clients_data
from fedft.data.public import _texts as public_texts
from fedft.errors import ConfigError
from fedft.federation.engine import build_task
from fedft.federation.training import read_state

from helpers import tiny_config

# each method's smallest setting that reads the public data
METHODS = {
    "fedpft": {"method.keep_layers": [0], "method.distill_steps": 2, "method.realign_every": 0},
    "fedpt": {"method.small_layers": 1, "method.distill_steps": 2},
}
SMALL = {"method.public_rows": 40, "method.public_heldout": 10}


def test_the_demo_public_split_shares_no_text_with_the_demo_train_or_test_rows():
    public = demo_public_texts()
    assert public == demo_public_texts()  # fixed
    assert len(public) == len(set(public)) == DEMO_PUBLIC_SIZE
    train, test = demo_splits()
    assert not set(public) & {t for t, _ in train}
    assert not set(public) & {t for t, _ in test}
    check_not_clients_data("demo", public, DataConfig(source="demo"), seed=0)  # not refused


def clients_folder(tmp_path: Path) -> Path:
    """A text data set the clients train on: some demo train rows as train.csv, and a test.csv."""
    train, test = demo_splits()
    folder = tmp_path / "clients"
    folder.mkdir()
    frame = pd.DataFrame(train[:300], columns=["text", "label"])
    frame.to_csv(folder / "train.csv", index=False)
    pd.DataFrame(test[:60], columns=["text", "label"]).to_csv(folder / "test.csv", index=False)
    return folder


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("public", ["same folder", "same file", "copy"])
def test_fedpft_and_fedpt_refuse_public_data_that_is_the_clients_data(
    tmp_path: Path, method: str, public: str
):
    folder = clients_folder(tmp_path)
    copy = tmp_path / "elsewhere" / "public.jsonl"  # the same rows, re-saved in another format
    copy.parent.mkdir()
    pd.read_csv(folder / "train.csv")[["text"]].to_json(copy, orient="records", lines=True)
    path = {"same folder": folder, "same file": folder / "train.csv", "copy": copy}[public]
    sets = {**METHODS[method], **SMALL, "data.source": str(folder), "method.public_data": str(path)}
    task = build_task(tiny_config(tmp_path, method, **sets))
    initial = read_state(task.model, task.method.trainable_names)
    with pytest.raises(ConfigError) as caught:
        task.method.make_server(task.cfg, initial)
    message = str(caught.value)
    assert "\n" not in message and "set method.public_data to another source" in message
    if public == "copy":
        assert "all of its 300 rows are also training rows of data.source" in message
    else:
        assert "the clients' training data" in message


def test_a_public_source_sharing_some_rows_is_refused_with_their_count(tmp_path: Path):
    folder = clients_folder(tmp_path)
    clients = DataConfig(source=str(folder), max_train_samples=50)
    train = pd.read_csv(folder / "train.csv")["text"].tolist()
    # rows past the run's max_train_samples are still the clients' data; whitespace is no cover
    public = demo_public_texts()[:100] + [f"  {t}  " for t in train[-7:]]
    with pytest.raises(ConfigError, match="7 of its 107 rows are also training rows"):
        check_not_clients_data("public.csv", public, clients, seed=0)
    check_not_clients_data("public.csv", public[:100], clients, seed=0)  # disjoint: accepted
    with pytest.raises(ConfigError, match="the clients' training data"):  # the same hub name
        check_not_clients_data("someone/dataset", [], DataConfig(source="someone/dataset"), 0)


def test_the_demo_default_reads_the_public_split():
    """`method.public_data` defaults to 'demo', which is the public split, not the train rows."""
    assert PublicDataOptions().public_data == "demo"
    assert public_texts("demo", "text") == demo_public_texts()
