"""Which clients take part in a round."""

from __future__ import annotations

import numpy as np


def clients_per_round(num_clients: int, fraction: float, min_clients: int) -> int:
    """``max(min_clients, round(fraction * n))``, never more than ``n``."""
    return min(num_clients, max(min_clients, round(fraction * num_clients)))


def sample_clients(
    num_clients: int, fraction: float, min_clients: int, rng: np.random.Generator
) -> np.ndarray:
    """Fixed-size uniform sampling without replacement (McMahan et al. 2017, Algorithm 1).

    Returned ids are sorted so that aggregation order, and therefore the float result,
    does not depend on the order in which clients finish.
    """
    k = clients_per_round(num_clients, fraction, min_clients)
    return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int64)
