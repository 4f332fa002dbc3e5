import numpy as np
import pytest

from fedft.config import DataConfig
from fedft.data.partition import local_splits, partition_rows
from fedft.errors import DataError

LABELS = [i % 4 for i in range(1000)]


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(partition="iid"),
        DataConfig(partition="dirichlet", alpha=0.3, min_partition_size=5),
        DataConfig(partition="pathological", classes_per_client=2),
    ],
    ids=["iid", "dirichlet", "pathological"],
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
