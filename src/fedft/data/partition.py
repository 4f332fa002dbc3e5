"""Split the training rows across clients with flwr-datasets' partitioners, then give each client
a local train/test split.

Partitions are index lists into the training set, so a client costs a few integers, not a copy.
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    ExponentialPartitioner,
    IidPartitioner,
    LinearPartitioner,
    Partitioner,
    PathologicalPartitioner,
    SquarePartitioner,
)

from fedft.config import DataConfig
from fedft.errors import DataError

ROW = "__row__"
# size skew (client i's share grows as i+1, (i+1)^2, e^i), labels as they come
SIZED = {
    "linear": LinearPartitioner,
    "square": SquarePartitioner,
    "exponential": ExponentialPartitioner,
}


@dataclass(frozen=True)
class ClientSplit:
    train: np.ndarray
    test: np.ndarray

    @property
    def size(self) -> int:
        return len(self.train) + len(self.test)


def _partitioner(
    scheme: str, cfg: DataConfig, clients: int, num_labels: int, seed: int
) -> Partitioner:
    if scheme == "iid":
        return IidPartitioner(num_partitions=clients)
    if scheme in SIZED:
        return SIZED[scheme](num_partitions=clients)
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


def dirichlet_rows(
    labels: np.ndarray, clients: int, alpha: float, min_size: int, seed: int
) -> list[np.ndarray]:
    """Label skew by a Dirichlet over clients per class (as flwr-datasets' DirichletPartitioner
    draws it), made to succeed for any population the rows can fill: clients left under
    `min_size` rows take them from the clients with the most, a random row of the donor's at a
    time, so the donors' label mixes (the skew) stay as drawn. flwr-datasets' partitioner
    redraws instead and gives up after 10 tries, which at thousands of clients (a few rows
    each) it always does."""
    rng = np.random.default_rng(seed)
    owner = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
        for client, part in enumerate(np.split(rows, cuts)):
            owner[part] = client
    parts = [list(rng.permutation(np.flatnonzero(owner == c))) for c in range(clients)]
    sizes = np.array([len(p) for p in parts])
    needy = [c for c in np.argsort(sizes, kind="stable") if sizes[c] < min_size]
    if needy:
        donors = [(-int(sizes[c]), int(c)) for c in range(clients) if sizes[c] > min_size]
        heapq.heapify(donors)
        for client in needy:
            while len(parts[client]) < min_size:
                size, donor = heapq.heappop(donors)
                parts[client].append(parts[donor].pop())
                if -size - 1 > min_size:
                    heapq.heappush(donors, (size + 1, donor))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def shard_rows(labels: np.ndarray, clients: int, shards: int, seed: int) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: rows sorted by label (shuffled within a label), cut
    into clients x shards contiguous shards of near-equal size, `shards` random ones a client.
    flwr-datasets' ShardPartitioner cuts equal shards and drops the remainder (62 of 1,000 rows
    at 8 x 2); here every row lands once."""
    rng = np.random.default_rng(seed)
    by_label = np.lexsort((rng.random(len(labels)), labels))
    pieces = np.array_split(by_label, clients * shards)
    order = rng.permutation(clients * shards)
    return [
        np.sort(np.concatenate([pieces[i] for i in order[c * shards : (c + 1) * shards]]))
        for c in range(clients)
    ]


def column_rows(values: list[str], clients: int | None, column: str) -> list[np.ndarray]:
    """Natural clients: the rows of each distinct value of a column (an author, a topic, a site),
    as FedLLM-Bench splits by user. One client per value (`clients` None: as many as there are
    values), in sorted order of the values; with more values than clients, values are grouped:
    largest first, each onto the client that holds the fewest rows so far (so sizes stay even
    and a value is never split). flwr-datasets' NaturalIdPartitioner gives one partition per
    value and cannot group, so it is not used."""
    names, inverse = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    clients = len(names) if clients is None else clients
    if len(names) < clients:
        raise DataError(
            f"data.partition=column: column '{column}' has {len(names)} values "
            f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}) for "
            f"federation.clients={clients}; set federation.clients={len(names)} (one client a "
            "value) or fewer"
        )
    counts = np.bincount(inverse, minlength=len(names))
    if len(names) == clients:
        owner = np.arange(clients)
    else:
        owner = np.empty(len(names), dtype=np.int64)
        loads = [(0, c) for c in range(clients)]
        for value in np.argsort(-counts, kind="stable"):
            size, client = heapq.heappop(loads)
            owner[value] = client
            heapq.heappush(loads, (size + int(counts[value]), client))
    client_of_row = owner[inverse]
    return [np.flatnonzero(client_of_row == c).astype(np.int64) for c in range(clients)]


def partition_rows(
    labels: list[int], cfg: DataConfig, clients: int, num_labels: int, seed: int
) -> list[np.ndarray]:
    """Row indices per client; every row lands in exactly one partition."""
    if clients > len(labels):
        raise DataError(
            f"federation.clients={clients} is more than the {len(labels)} training rows; use fewer clients or more data"
        )
    scheme = cfg.partition if cfg.partition != "auto" else ("dirichlet" if num_labels else "iid")
    if scheme == "dirichlet":
        if clients * cfg.min_partition_size > len(labels):
            raise DataError(
                f"dirichlet partition: {clients} clients x data.min_partition_size="
                f"{cfg.min_partition_size} rows is more than the {len(labels)} training rows; "
                "lower data.min_partition_size or use fewer clients"
            )
        return dirichlet_rows(np.asarray(labels), clients, cfg.alpha, cfg.min_partition_size, seed)
    if scheme == "shard":
        if not num_labels:
            raise DataError("data.partition=shard sorts rows by label; this data has no labels")
        return shard_rows(np.asarray(labels), clients, cfg.shards_per_client, seed)
    order = np.arange(len(labels))
    if scheme in SIZED:  # they cut the rows in order: shuffled first, so only sizes differ
        order = np.random.default_rng(seed).permutation(len(labels))
    table = datasets.Dataset.from_dict(
        {"label": np.asarray(labels)[order].tolist(), ROW: order.tolist()}
    )
    partitioner = _partitioner(scheme, cfg, clients, num_labels, seed)
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
                f"{scheme} partition failed ({str(exc).splitlines()[0]}); use fewer clients"
            ) from exc
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(
            f"{scheme} partition left clients {empty[:5]} without data; use fewer clients or another partition"
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
