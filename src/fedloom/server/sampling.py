"""Which clients take part in a round."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedloom.config import ServerConfig


def clients_per_round(num_clients: int, fraction: float, min_clients: int) -> int:
    """``max(min_clients, round(fraction * n))``, never more than ``n``."""
    return min(num_clients, max(min_clients, round(fraction * num_clients)))


def sample_clients(
    num_clients: int,
    fraction: float,
    min_clients: int,
    rng: np.random.Generator,
    cohort_size: Callable[[int], int] | None = None,
) -> np.ndarray:
    """Fixed-size uniform sampling without replacement (McMahan et al. 2017, Algorithm 1).

    ``cohort_size`` maps the wanted k to how many are drawn (over-selection). Returned
    ids are sorted so that aggregation order, and therefore the float result, does not
    depend on the order in which clients finish.
    """
    k = clients_per_round(num_clients, fraction, min_clients)
    if cohort_size is not None:
        k = min(num_clients, cohort_size(k))
    return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int64)


def poisson_sample_clients(num_clients: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson sampling: each client takes part independently with probability ``rate``.

    The sampling of DP-FedAvg (McMahan et al. 2018, Algorithm 1: "C^t ← (sample users
    with probability q)"), whose privacy amplification the accountant's
    ``PoissonSampledDpEvent`` describes. The round's size is Binomial(N, q) and may be 0.
    Sorted ids, like :func:`sample_clients`.
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"sampling rate must be in (0, 1], got {rate}")
    return np.flatnonzero(rng.random(num_clients) < rate).astype(np.int64)


def select_clients(
    cfg: ServerConfig,
    num_clients: int,
    rng: np.random.Generator,
    cohort_size: Callable[[int], int] | None = None,
) -> np.ndarray:
    """The round's clients under ``server.sampling`` ("fixed" or "poisson").

    ``cohort_size`` (over-selection) applies to fixed-size sampling only; the
    configuration refuses it with Poisson sampling.
    """
    if cfg.sampling == "poisson":
        return poisson_sample_clients(num_clients, cfg.fraction_fit, rng)
    return sample_clients(num_clients, cfg.fraction_fit, cfg.min_fit_clients, rng, cohort_size)


def expected_clients_per_round(cfg: ServerConfig, num_clients: int) -> float:
    """k for fixed-size sampling, q·N for Poisson sampling (``min_fit_clients`` unused)."""
    if cfg.sampling == "poisson":
        return cfg.fraction_fit * num_clients
    return float(clients_per_round(num_clients, cfg.fraction_fit, cfg.min_fit_clients))
