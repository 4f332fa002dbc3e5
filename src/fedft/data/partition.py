"""Split the training rows across clients with flwr-datasets' partitioners, then give each client
a local train/test split.

Partitions are index lists into the training set, so a client costs a few integers, not a copy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from fedft.config import DataConfig
from fedft.errors import DataError

ROW = "__row__"


@dataclass(frozen=True)
class ClientSplit:
    train: np.ndarray
    test: np.ndarray

    @property
    def size(self) -> int:
        return len(self.train) + len(self.test)


def _partitioner(cfg: DataConfig, clients: int, num_labels: int, seed: int) -> Partitioner:
    scheme = cfg.partition
    if scheme == "auto":  # Dirichlet where there are classes to skew
        scheme = "dirichlet" if num_labels > 0 else "iid"
    if scheme == "iid":
        return IidPartitioner(num_partitions=clients)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions=clients,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if cfg.classes_per_client > num_labels:
        raise DataError(
            f"data.classes_per_client={cfg.classes_per_client} but the data has only {num_labels} classes"
        )
    if clients * cfg.classes_per_client < num_labels:
        raise DataError(
            f"pathological partition: {clients} clients x {cfg.classes_per_client} classes cannot cover "
            f"{num_labels} classes; raise data.classes_per_client or federation.clients"
        )
    # 'first-deterministic' gives every class to at least one client, so no row is dropped.
    return PathologicalPartitioner(
        num_partitions=clients,
        partition_by="label",
        num_classes_per_partition=cfg.classes_per_client,
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=seed,
    )


def partition_rows(
    labels: list[int], cfg: DataConfig, clients: int, num_labels: int, seed: int
) -> list[np.ndarray]:
    """Row indices per client; every row lands in exactly one partition."""
    if clients > len(labels):
        raise DataError(
            f"federation.clients={clients} is more than the {len(labels)} training rows; use fewer clients or more data"
        )
    table = datasets.Dataset.from_dict({"label": labels, ROW: list(range(len(labels)))})
    partitioner = _partitioner(cfg, clients, num_labels, seed)
    partitioner.dataset = table
    with warnings.catch_warnings():
        try:
            warnings.simplefilter("ignore", UserWarning)  # its retries warn; a failure raises below
            parts = [
                np.asarray(partitioner.load_partition(i)[ROW], dtype=np.int64)
                for i in range(clients)
            ]
        except ValueError as exc:
            raise DataError(
                f"{cfg.partition} partition failed ({str(exc).splitlines()[0]}); "
                "lower data.min_partition_size, raise data.alpha, or use fewer clients"
            ) from exc
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(
            f"{cfg.partition} partition left clients {empty[:5]} without data; use fewer clients or another partition"
        )
    return parts


def local_splits(parts: list[np.ndarray], test_fraction: float, seed: int) -> list[ClientSplit]:
    """Each client's rows, shuffled with its own seed, with a local test share (at least one row
    stays for training)."""
    splits = []
    for cid, rows in enumerate(parts):
        rng = np.random.default_rng([seed, cid])
        shuffled = rows[rng.permutation(len(rows))]
        n_test = min(int(round(len(rows) * test_fraction)), len(rows) - 1)
        splits.append(
            ClientSplit(train=np.sort(shuffled[n_test:]), test=np.sort(shuffled[:n_test]))
        )
    return splits
