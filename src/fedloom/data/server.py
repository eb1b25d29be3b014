"""The server's own examples, and the slices server-side stages reserve from them.

Some defences need data the server holds itself (FLTrust's root data set, Cao et al.
2021). In simulation the server's examples are the held-out test set; a stage that
trained on part of it would inflate the accuracy the run reports, so a reserved slice
leaves the central evaluation set: the run evaluates on :meth:`ServerData.evaluation_set`.
Reservations are seeded draws, so a resumed run reserves the same examples.
"""

from __future__ import annotations

import numpy as np

from fedloom.config import ConfigError
from fedloom.data.base import ArrayDataset
from fedloom.seeding import SERVER_DATA, derive_rng


class ServerData:
    """The server's examples; stages reserve disjoint seeded slices, evaluation gets the rest."""

    def __init__(self, examples: ArrayDataset, *, seed: int) -> None:
        self.examples = examples
        self.seed = seed
        self._free = np.ones(len(examples), dtype=bool)
        self._tags = 0

    def reserve(self, n: int, *, who: str) -> ArrayDataset:
        """``n`` examples drawn uniformly (seeded by the run and the reservation's order)
        from those nobody reserved yet; they no longer count for central evaluation.

        At least one example must stay for evaluation, else a one-line ConfigError names
        ``who`` (the option that asked).
        """
        free = np.flatnonzero(self._free)
        if n < 1 or n > len(free) - 1:
            raise ConfigError(
                f"{who} = {n}: the server holds {len(free)} unreserved examples (its test set) "
                f"and needs at least one left to evaluate on; choose 1..{max(len(free) - 1, 0)}"
            )
        self._tags += 1
        rng = derive_rng(self.seed, SERVER_DATA, self._tags)
        pick = np.sort(rng.choice(free, size=n, replace=False))
        self._free[pick] = False
        return self.examples.subset(pick)

    @property
    def reserved(self) -> int:
        return int(len(self._free) - self._free.sum())

    def evaluation_set(self) -> ArrayDataset:
        """The examples no stage reserved: what the server evaluates the global model on."""
        if self._free.all():
            return self.examples
        return self.examples.subset(np.flatnonzero(self._free))
