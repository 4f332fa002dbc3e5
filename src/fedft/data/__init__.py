"""Data: sources, the built-in demo set, partitioning, encoding."""

from __future__ import annotations

from dataclasses import dataclass

from fedft.config import RunConfig
from fedft.data.encode import TensorData, encode, pixel_scale_of
from fedft.data.partition import ClientSplit, local_splits, partition_rows
from fedft.data.sources import RawData, load_raw
from fedft.errors import DataError
from fedft.models.backbone import Preprocess


@dataclass
class FederatedData:
    """The training rows as tensors, each client's share of them, and the server's test set."""

    train: TensorData
    test: TensorData
    clients: list[ClientSplit]
    label_names: list[str]
    kind: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def check_fits(raw: RawData, pre: Preprocess, model_name: str) -> None:
    if raw.kind != pre.kind:
        raise DataError(
            f"model '{model_name}' takes {pre.kind} input but the data {raw.origin} is {raw.kind}; pick a matching model"
        )


def build_federated_data(cfg: RunConfig, raw: RawData, pre: Preprocess) -> FederatedData:
    check_fits(raw, pre, cfg.model.name)
    labels = list(raw.train["label"])
    parts = partition_rows(labels, cfg.data, cfg.federation.clients, raw.num_labels, cfg.seed)
    clients = local_splits(parts, cfg.data.local_test_fraction, cfg.seed)
    scale = pixel_scale_of(raw.train) if raw.kind == "image" else None
    return FederatedData(
        train=encode(raw.train, pre, scale),
        test=encode(raw.test, pre, scale),
        clients=clients,
        label_names=raw.label_names,
        kind=raw.kind,
    )


__all__ = [
    "ClientSplit",
    "FederatedData",
    "RawData",
    "TensorData",
    "build_federated_data",
    "load_raw",
]
