import numpy as np
import pytest

from fedft.config import DataConfig
from fedft.data.partition import column_rows, local_splits, partition_rows
from fedft.errors import DataError

LABELS = [i % 4 for i in range(1000)]


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(partition="iid"),
        DataConfig(partition="dirichlet", alpha=0.3, min_partition_size=5),
        DataConfig(partition="pathological", classes_per_client=2),
        DataConfig(partition="shard", shards_per_client=2),
        DataConfig(partition="linear"),
        DataConfig(partition="square"),
    ],
    ids=["iid", "dirichlet", "pathological", "shard", "linear", "square"],
)
def test_partitions_cover_every_row_once(cfg: DataConfig):
    parts = partition_rows(LABELS, cfg, clients=8, num_labels=4, seed=3)
    assert len(parts) == 8
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert sorted(joined.tolist()) == list(range(len(LABELS)))


def test_dirichlet_is_skewed_and_respects_min_size():
    parts = partition_rows(
        LABELS, DataConfig(partition="dirichlet", alpha=0.2, min_partition_size=20), 6, 4, seed=0
    )
    assert min(len(p) for p in parts) >= 20
    shares = [np.bincount(np.asarray(LABELS)[p], minlength=4).max() / len(p) for p in parts]
    assert np.mean(shares) > 0.6  # most of a client's rows come from one class


def test_dirichlet_fills_any_population_the_rows_can_and_refuses_the_rest():
    """A skew so sharp that most clients draw nothing, and 10,000 clients of a few rows each:
    every client still gets its minimum, every row lands once, and the skew stays."""
    parts = partition_rows(
        LABELS, DataConfig(partition="dirichlet", alpha=0.05, min_partition_size=90), 10, 4, 0
    )
    assert min(len(p) for p in parts) >= 90
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    many = [i % 2 for i in range(30_000)]
    parts = partition_rows(
        many, DataConfig(partition="dirichlet", min_partition_size=2), 10_000, 2, 0
    )
    assert min(len(p) for p in parts) == 2 and sum(len(p) for p in parts) == 30_000
    assert len(np.unique(np.concatenate(parts))) == 30_000
    big = [p for p in parts if len(p) >= 6]
    mixed = np.mean([np.bincount(np.asarray(many)[p], minlength=2).max() / len(p) for p in big])
    assert mixed > 0.75  # here 0.84; binomial draws of the same sizes give about 0.67
    with pytest.raises(DataError, match=r"10 clients x data.min_partition_size=101 rows is more"):
        partition_rows(
            LABELS, DataConfig(partition="dirichlet", min_partition_size=101), 10, 4, seed=0
        )


def test_pathological_gives_each_client_its_classes():
    parts = partition_rows(
        LABELS, DataConfig(partition="pathological", classes_per_client=1), 4, 4, seed=0
    )
    for p in parts:
        assert len(set(np.asarray(LABELS)[p].tolist())) == 1


def test_shard_clients_hold_their_shards_labels():
    """Rows sorted by label, cut into 2 x 8 shards of near-equal size: each client holds 2, so at most
    2 labels plus one where a shard straddles a label boundary, and equal sizes."""
    labels = sorted(LABELS)
    parts = partition_rows(labels, DataConfig(partition="shard"), 8, 4, seed=1)
    assert all(124 <= len(p) <= 126 for p in parts)  # 16 shards of 62 or 63 rows
    held = [len(set(np.asarray(labels)[p].tolist())) for p in parts]
    assert max(held) <= 3 and np.mean(held) <= 2.5


@pytest.mark.parametrize(("scheme", "grow"), [("linear", 1), ("square", 2)])
def test_size_partitions_grow_as_their_rule_with_every_label(scheme: str, grow: int):
    """Client i's share is (i+1)^grow of the total; the rows are shuffled first, so a label-sorted
    file still gives every large client every label."""
    labels = sorted(LABELS)
    parts = partition_rows(labels, DataConfig(partition=scheme), 5, 4, seed=2)
    weights = np.array([(i + 1) ** grow for i in range(5)], dtype=float)
    expected = weights / weights.sum() * len(labels)
    assert (
        np.abs(np.array([len(p) for p in parts]) - expected).max() <= 5
    )  # floors; the last takes the rest
    assert all(len(set(np.asarray(labels)[p].tolist())) == 4 for p in parts[1:])


def test_same_seed_same_partition():
    cfg = DataConfig(partition="dirichlet")
    a = partition_rows(LABELS, cfg, 5, 4, seed=1)
    b = partition_rows(LABELS, cfg, 5, 4, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_more_clients_than_rows_is_refused():
    with pytest.raises(DataError, match="more than the 10 training rows"):
        partition_rows(LABELS[:10], DataConfig(partition="iid"), 11, 4, seed=0)


def test_local_splits_are_disjoint_and_complete():
    parts = partition_rows(LABELS, DataConfig(partition="iid"), 4, 4, seed=0)
    for part, split in zip(parts, local_splits(parts, 0.2, seed=0), strict=True):
        assert set(split.train).isdisjoint(split.test)
        assert sorted(np.concatenate([split.train, split.test]).tolist()) == sorted(part.tolist())
        assert len(split.test) == round(0.2 * len(part))


def test_column_partition_gives_each_value_its_own_client_or_groups_values_whole():
    values = ["b", "a", "c", "a", "b", "a"]
    parts = column_rows(values, 3, "site")
    assert [p.tolist() for p in parts] == [[1, 3, 5], [0, 4], [2]]  # a, b, c in sorted order
    rng = np.random.default_rng(0)
    many = [f"user{int(u)}" for u in rng.zipf(1.5, size=2000) % 40]
    parts = column_rows(many, 5, "user")
    assert sorted(np.concatenate(parts).tolist()) == list(range(2000))
    owners = {}
    for client, rows in enumerate(parts):
        for row in rows:
            assert owners.setdefault(many[row], client) == client  # a value is never split
    sizes = sorted(len(p) for p in parts)
    biggest = max(many.count(v) for v in set(many))
    assert sizes[-1] - sizes[0] <= biggest  # greedy: even up to one value's rows
    with pytest.raises(DataError, match=r"column 'site' has 3 values \(a, b, c\) for federation"):
        column_rows(values, 4, "site")


@pytest.mark.parametrize("clients", [3, None], ids=["set", "one-a-value"])
def test_a_column_partition_of_a_file_gives_each_topic_a_client(tmp_path, clients):
    """With federation.clients set to the count, or left at its default (then the run's config
    takes one client a value)."""
    from fedft.config import validate_config
    from fedft.federation.engine import build_task

    from helpers import tiny_llama_config, write_generation_data

    data = write_generation_data(tmp_path / "data")
    sets = {"data.partition": "column", "data.partition_column": "topic", "federation.clients": 3}
    cfg = tiny_llama_config(tmp_path, "lora", **{"data.source": str(data), **sets})
    if clients is None:  # the same settings with federation.clients never given
        tree = cfg.model_dump()
        del tree["federation"]["clients"]
        cfg = validate_config(tree)
        assert cfg.federation.clients == 10
    task = build_task(cfg)
    import json

    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    topics = sorted({r["topic"] for r in rows})
    prompts = task.data.train  # encoded in file order: row i is the file's row i
    assert len(prompts) == len(rows)
    assert task.cfg.federation.clients == len(task.data.clients) == len(topics)
    for client, split in enumerate(task.data.clients):
        held = np.concatenate([split.train, split.test])
        assert {rows[i]["topic"] for i in held} == {topics[client]}
