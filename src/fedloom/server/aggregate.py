"""Aggregators: combine client updates into one update.

An aggregator sees the updates as rows of an implicit k×d matrix and returns one
d-vector. Results are independent of the order in which clients finished, because the
round loop sorts updates by client id before aggregating.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
    acc = np.zeros(updates[0].shape, dtype=np.float64)
    for update, weight in zip(updates, weights, strict=True):
        acc += (float(weight) / total) * update.astype(np.float64, copy=False)
    return acc.astype(np.float32)
