"""Update monitors: stages that watch every client's update without making the aggregate.

A monitor sees each round's :class:`~fedloom.server.aggregators.AggregationInput` (the
same rows the aggregator gets, before it runs), writes fields into the round record,
keeps state across rounds (checkpointed with the strategy under ``mon/<name>/``), and
may narrow the pool of clients the next rounds sample from. Anomaly detection with a
reputation (:mod:`fedloom.server.anomaly`) is one; it works beside any aggregator.
Monitors are built by :mod:`fedloom.strategies` from
:data:`fedloom.registry.UPDATE_MONITORS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from fedloom.server.aggregators import AggregationInput


class UpdateMonitor(Protocol):
    """Watch a round's individual updates; optionally keep clients out of sampling."""

    #: Its prefix in checkpoints (``mon/<name>/…``).
    name: str
    #: True when it reads the rows (refused with secure aggregation, which hides them).
    needs_individual_updates: bool

    def observe(self, inp: AggregationInput) -> dict[str, Any]:
        """Fields for the round record, from the round's updates."""
        ...

    def eligible(self, rnd: int, pool: np.ndarray) -> np.ndarray:
        """The clients of ``pool`` (sorted ids) that round ``rnd`` may sample."""
        ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: Mapping[str, Any]) -> None: ...
