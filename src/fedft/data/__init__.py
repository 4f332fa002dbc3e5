"""Data: sources, the built-in demo set, partitioning, encoding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from fedft.config import RunConfig
from fedft.data.encode import TensorData
from fedft.data.partition import ClientSplit, column_rows, local_splits, partition_rows
from fedft.data.sources import GROUP, RawData, load_raw
from fedft.errors import DataError

Encoder = Callable[[RawData], tuple[TensorData, TensorData]]


@dataclass
class FederatedData:
    """The training rows as tensors, each client's share of them, and the server's test set."""

    train: TensorData
    test: TensorData
    clients: list[ClientSplit]
    label_names: list[str]
    kind: str
    partition: str = "dirichlet"  # the partition used (data without classes is split IID)
    validation: TensorData | None = None  # the server's own rows (data.server_rows), or None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def check_fits(raw: RawData, input_kind: str, model_name: str) -> None:
    if raw.kind != input_kind:
        raise DataError(
            f"model '{model_name}' takes {input_kind} input but the data {raw.origin} is {raw.kind}; pick a matching model"
        )


def partition_of(cfg: RunConfig, raw: RawData) -> str:
    """The partition to use. `auto` is Dirichlet where the data has classes; data without them
    (generation rows without a class column) has no label mix to skew, so it is split IID, and a
    label-skewed split of it is refused."""
    if cfg.data.partition != "auto":
        if raw.num_labels == 0 and cfg.data.partition not in ("iid", "column"):
            raise DataError(
                f"data.partition={cfg.data.partition} splits by class, but {raw.origin} has no "
                f"class column '{cfg.data.label_column}'; set data.label_column (e.g. topic) or "
                "data.partition=iid"
            )
        return cfg.data.partition
    return "dirichlet" if raw.num_labels > 0 else "iid"


def hold_out_server_rows(raw: RawData, count: int, seed: int) -> tuple[RawData, RawData | None]:
    """Take `count` seeded training rows away from the clients for the server's validation split
    (at most a fifth of them, so the clients keep most). The test split is never touched: what is
    chosen on these rows is then measured on rows nothing was chosen on."""
    count = min(count, len(raw.train) // 5)
    if count <= 0:
        return raw, None
    order = np.random.default_rng(seed + 7919).permutation(len(raw.train))
    held = raw.train.select(np.sort(order[:count]).tolist())
    kept = raw.train.select(np.sort(order[count:]).tolist())
    return replace(raw, train=kept), replace(raw, train=held, test=held)


def build_federated_data(
    cfg: RunConfig, raw: RawData, encoder: Encoder, server_rows: int = 0
) -> FederatedData:
    """Partition the training rows across clients and encode both splits with the task's
    encoder; `server_rows` of the training rows first go to the server's validation split."""
    raw, held = hold_out_server_rows(raw, server_rows, cfg.seed)
    # encoded before the clients' splits, so that what an encoder records per split (a
    # generation task's cut rows) ends with the run's own train and test
    validation = encoder(held)[0] if held is not None else None
    partition = partition_of(cfg, raw)
    if partition == "column":
        if GROUP not in raw.train.column_names:
            raise DataError(
                f"data.partition=column: {raw.origin} has no columns beyond text and label; "
                "give a file or folder with the column"
            )
        # federation.clients left at its default: one client per value
        clients = cfg.federation.clients if "clients" in cfg.federation.model_fields_set else None
        parts = column_rows(list(raw.train[GROUP]), clients, cfg.data.partition_column or "")
    else:
        labels = list(raw.train["label"])
        data_cfg = cfg.data.model_copy(update={"partition": partition})
        parts = partition_rows(labels, data_cfg, cfg.federation.clients, raw.num_labels, cfg.seed)
    clients = local_splits(parts, cfg.data.local_test_fraction, cfg.seed)
    train, test = encoder(raw)
    return FederatedData(
        train=train,
        test=test,
        clients=clients,
        label_names=raw.label_names,
        kind=raw.kind,
        partition=partition,
        validation=validation,
    )


__all__ = [
    "ClientSplit",
    "check_fits",
    "FederatedData",
    "RawData",
    "TensorData",
    "build_federated_data",
    "hold_out_server_rows",
    "load_raw",
]
