"""The shapes every data set takes once it is loaded and split across clients.

Data are plain NumPy arrays: features ``x`` (float32 for tabular and image data, uint8
character ids for text) and integer labels ``y`` (int64). Clients convert them to
tensors once and keep them, so nothing here depends on a training framework.
:func:`data_path` is how the builders that read files find ``data.path``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

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


class OnDemandClients(Sequence[ClientData]):
    """Clients whose data are made only when asked for, and forgotten soon after.

    With 100,000 simulated devices the data of all of them do not fit in memory, and a
    round touches only the sampled few. ``make(i)`` builds client ``i``'s data (e.g.
    generated from its own seed); the last ``keep`` clients asked for are kept, so a
    client's fit and evaluation in the same round build it once. Sizes are known up
    front (weights and scheduling need them without building anyone's data).
    """

    def __init__(
        self,
        train_sizes: np.ndarray,
        make: Callable[[int], ClientData],
        *,
        all_have_tests: bool,
        keep: int = 8,
    ) -> None:
        self.train_sizes = np.asarray(train_sizes, dtype=np.int64)
        self.all_have_tests = all_have_tests
        self.make = make
        self._keep = keep
        self._recent: OrderedDict[int, ClientData] = OrderedDict()

    def __len__(self) -> int:
        return len(self.train_sizes)

    @overload
    def __getitem__(self, index: int) -> ClientData: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[ClientData]: ...

    def __getitem__(self, index: int | slice) -> ClientData | Sequence[ClientData]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"client {index} does not exist ({len(self)} clients)")
        client = self._recent.get(i)
        if client is None:
            client = self.make(i)
            self._recent[i] = client
            if len(self._recent) > self._keep:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(i)
        return client

    def __iter__(self) -> Iterator[ClientData]:
        # Walking every client builds each in turn; only the last few stay in memory.
        return (self[i] for i in range(len(self)))


@dataclass
class FederatedDataset:
    """A data set split across clients, plus the server's held-out test set.

    ``clients`` is a list, or :class:`OnDemandClients` for data made when needed.
    """

    name: str
    kind: DataKind
    clients: Sequence[ClientData]
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
        if self.on_demand:
            raise ConfigError(
                "centralized training pools every client's data, which data.on_demand avoids "
                "making; run it with data.on_demand = false"
            )
        return ArrayDataset.concat([c.train for c in self.clients])

    def client_sizes(self) -> np.ndarray:
        if isinstance(self.clients, OnDemandClients):
            return self.clients.train_sizes.copy()
        return np.array([len(c.train) for c in self.clients], dtype=np.int64)

    @property
    def on_demand(self) -> bool:
        """Whether clients' data are made when asked for (walking them all is costly)."""
        return isinstance(self.clients, OnDemandClients)

    def clients_with_tests(self) -> Sequence[int]:
        """Ids of the clients that hold a local test set (federated evaluation)."""
        if isinstance(self.clients, OnDemandClients) and self.clients.all_have_tests:
            return range(len(self.clients))
        return [c.client_id for c in self.clients if c.test is not None and len(c.test)]


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
