"""When clients' results reach the server: the seam a simulated clock plugs into.

The loop runs every sampled client to completion; whether a result would have arrived in
time on a real fleet is decided here, after the fact, by an :class:`ArrivalModel`. The
default, :class:`InstantArrivals`, changes nothing (every result arrives, no simulated
time). The virtual clock (``fedloom.system.clock``) gives each client a duration from its
device profile and ends the round at a deadline or at the k-th arrival of an
over-selected cohort. Before the round, the model may add keys to one client's task
config (:meth:`ArrivalModel.task_config`): the clock's step budget, with which a device
that would miss the deadline does the steps that fit (partial work).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedloom.messages import ClientFailure, FitResult, Scalar


@dataclass
class Arrivals:
    """A round's outcomes as the server would have seen them."""

    outcomes: list[FitResult | ClientFailure]
    #: Results that would have arrived after the round ended (counted as stragglers).
    late: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    #: Simulated seconds each timed client took (late ones included), for selectors.
    durations: dict[int, float] = field(default_factory=dict)


class ArrivalModel(Protocol):
    def available(self, rnd: int, pool: np.ndarray) -> np.ndarray:
        """The clients of ``pool`` that can be sampled in round ``rnd``."""
        ...

    def cohort_size(self, wanted: int) -> int:
        """How many clients to sample so that ``wanted`` results are expected."""
        ...

    def task_config(self, rnd: int, client_id: int, *, down_bytes: int) -> dict[str, Scalar]:
        """Task config keys for this client alone (a step budget under a deadline)."""
        ...

    def arrive(
        self,
        rnd: int,
        outcomes: Sequence[FitResult | ClientFailure],
        *,
        down_bytes: int,
        wanted: int,
    ) -> Arrivals: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class InstantArrivals:
    """Every result arrives; the round has no simulated duration."""

    def available(self, rnd: int, pool: np.ndarray) -> np.ndarray:
        return pool

    def cohort_size(self, wanted: int) -> int:
        return wanted

    def task_config(self, rnd: int, client_id: int, *, down_bytes: int) -> dict[str, Scalar]:
        return {}

    def arrive(
        self,
        rnd: int,
        outcomes: Sequence[FitResult | ClientFailure],
        *,
        down_bytes: int,
        wanted: int,
    ) -> Arrivals:
        return Arrivals(list(outcomes))

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        return None
