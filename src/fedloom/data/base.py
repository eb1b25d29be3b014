"""The shapes every data set takes once it is loaded and split across clients.

Data are plain NumPy arrays: features ``x`` (float32 for tabular and image data, uint8
character ids for text) and integer labels ``y`` (int64). Clients convert them to
tensors once and keep them, so nothing here depends on a training framework.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

DataKind = Literal["tabular", "image", "sequence"]


@dataclass(frozen=True)
class ArrayDataset:
    """Examples ``x`` with labels ``y``; ``len(x) == len(y)``."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.x[index], self.y[index])

    @staticmethod
    def concat(parts: list[ArrayDataset]) -> ArrayDataset:
        return ArrayDataset(
            np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
        )


@dataclass(frozen=True)
class ClientData:
    """One client's private data. ``client_id`` is its index, ``name`` a human label."""

    client_id: int
    name: str
    train: ArrayDataset
    test: ArrayDataset | None = None


@dataclass
class FederatedDataset:
    """A data set split across clients, plus the server's held-out test set."""

    name: str
    kind: DataKind
    clients: list[ClientData]
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]
    vocab: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def pooled_train(self) -> ArrayDataset:
        """All clients' training data in one set: the centralized-training baseline."""
        return ArrayDataset.concat([c.train for c in self.clients])

    def client_sizes(self) -> np.ndarray:
        return np.array([len(c.train) for c in self.clients], dtype=np.int64)
