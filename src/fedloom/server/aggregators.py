"""Aggregators: combine client updates into one update.

An aggregator sees the updates as rows of a k×d matrix and returns one d-vector; it is
looked up by name (``server.aggregator``) in :data:`fedloom.registry.AGGREGATORS`,
where a user's own aggregator registers the same way. Results are independent of the
order in which clients finished, because the round loop sorts updates by client id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedloom.registry import AGGREGATORS


def weighted_mean(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σ_k n_k Δ_k / Σ_k n_k, the FedAvg aggregate (McMahan et al. 2017, Algorithm 1).

    Accumulates in float64 so that thousands of small float32 updates do not lose
    precision, and returns float32 like every vector in fedloom.
    """
    if len(updates) == 0:
        raise ValueError("cannot aggregate zero updates")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    total = float(np.sum(weights, dtype=np.float64))
    if total <= 0.0:
        raise ValueError("aggregation weights must sum to a positive number")
    shares = [float(weight) / total for weight in weights]
    flat = [np.asarray(update).reshape(-1) for update in updates]
    if len({f.size for f in flat}) != 1:
        raise ValueError(f"updates of different lengths: {sorted({f.size for f in flat})}")
    out = np.empty(flat[0].size, dtype=np.float32)
    # Block by block, so the float64 sum and its temporaries are a block long, not a
    # model long: the extra memory of a mean of a large model is its float32 result.
    for start in range(0, out.size, _BLOCK):
        end = min(start + _BLOCK, out.size)
        acc = np.zeros(end - start, dtype=np.float64)
        for update, share in zip(flat, shares, strict=True):
            acc += share * update[start:end].astype(np.float64)
        out[start:end] = acc
    return out.reshape(np.shape(updates[0]))


#: Elements per block of :func:`weighted_mean` (8 MiB of float64).
_BLOCK = 1 << 20


@dataclass(kw_only=True)
class AggregationInput:
    """A round's usable updates as an aggregator sees them.

    In the clear, ``updates`` is the k×d matrix of the contributors' update vectors (rows
    in client-id order) and ``weights`` their example counts. Under secure aggregation the
    server never sees rows: ``updates`` is None and ``total`` is their (unweighted) sum.
    The matrix is read-only: its rows are the contributors' own vectors (the round holds
    each update once), so an aggregator that works in place copies it first.
    """

    round: int
    dimension: int
    updates: np.ndarray | None
    weights: np.ndarray
    total: np.ndarray | None = None
    count: int = 0
    metrics: Sequence[Mapping[str, float]] = ()
    #: The contributors' client ids, in row order (robust aggregators report which
    #: clients they excluded or down-weighted as ``excluded_clients``).
    client_ids: Sequence[int] = ()
    #: The global model the round's clients trained from (a server-side reference update,
    #: as FLTrust's, starts there); None where the caller has none.
    global_weights: np.ndarray | None = None
    #: How many clients the round's sample was drawn from (the connected ones in a
    #: deployment), and how many it drew; None when unknown. A privacy accountant counts
    #: the round at this sampling, not at the configured one.
    pool_size: int | None = None
    sample_size: int | None = None


class RoundRefusedError(Exception):
    """A stage cannot release this round's result (it would not be finite, or a privacy
    accountant cannot afford it). The strategy records the round as not aggregated, with
    this message as the cause, and the global model stays as it was."""


class Aggregator(Protocol):
    """Combine a round's updates into one vector (plus fields for the round record)."""

    #: True for aggregators that need every client's update (robust statistics); such an
    #: aggregator cannot run under secure aggregation, and the strategy refuses the pair.
    needs_individual_updates: bool
    #: True when the aggregator must release a result every round, whatever the number of
    #: usable updates (central DP: skipping would make the release depend on who answered).
    aggregates_every_round: bool

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]: ...

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None: ...


class MeanAggregator:
    """The example-weighted mean of McMahan et al. 2017 (Algorithm 1) in the clear; the
    plain mean of a secure sum (each client counts once)."""

    needs_individual_updates = False
    aggregates_every_round = False

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        if inp.updates is None:
            if inp.total is None:
                raise ValueError("mean of nothing: no updates and no secure sum")
            return (inp.total / max(inp.count, 1)).astype(np.float32), {}
        return weighted_mean(list(inp.updates), inp.weights.tolist()), {}

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        return None


@AGGREGATORS.register("mean")
def make_mean(settings: Any, context: Any) -> MeanAggregator:
    return MeanAggregator()
