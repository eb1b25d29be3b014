"""The shapes every data set takes once it is loaded and split across clients.

Data are plain NumPy arrays: features ``x`` (float32 for tabular and image data, uint8
character ids for text) and integer labels ``y`` (int64). Clients convert them to
tensors once and keep them, so nothing here depends on a training framework.
:func:`data_path` is how the builders that read files find ``data.path``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedloom.config import ConfigError, DataConfig

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
    #: ``data`` config keys that every site of a deployment must share and that this
    #: data set derived from its own files (a CSV's schema): the server pins them in the
    #: config it sends to clients when the user did not set them.
    pinned: dict[str, Any] = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def pooled_train(self) -> ArrayDataset:
        """All clients' training data in one set: the centralized-training baseline."""
        return ArrayDataset.concat([c.train for c in self.clients])

    def client_sizes(self) -> np.ndarray:
        return np.array([len(c.train) for c in self.clients], dtype=np.int64)


def data_path(cfg: DataConfig, *, directory: bool, hint: str) -> Path:
    """``data.path`` with ``~`` expanded, which must be an existing directory or file.

    Otherwise a one-line :class:`ConfigError` says what is wrong and ends with ``hint``
    (what to point ``data.path`` at).
    """
    if cfg.path is None:
        raise ConfigError(f"data.path is not set; {hint}")
    path = Path(cfg.path).expanduser()
    if path.is_dir() if directory else path.is_file():
        return path
    if directory:
        what = "is not a directory" if path.exists() else "does not exist"
    else:
        what = "is a directory" if path.is_dir() else "does not exist"
    raise ConfigError(f"data.path '{cfg.path}' {what}; {hint}")
