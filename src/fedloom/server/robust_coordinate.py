"""Coordinate-wise robust aggregators: the median and the trimmed mean.

Both follow Yin, Chen, Ramchandran and Bartlett 2018, "Byzantine-robust distributed
learning: towards optimal statistical rates" (ICML): Definition 1 (coordinate-wise
median) and Definition 2 (coordinate-wise β-trimmed mean). Each coordinate of the
aggregate is a robust statistic of that coordinate's k client values, so one client
can be outvoted in some coordinates and kept in others: these rules exclude *values*,
not clients, and report ``excluded_clients = []``.

Robust aggregators ignore example counts (every client counts once): a weight is a
claim the client makes, and an attacker would simply claim a large one.

The helpers here (option checks, the median fallback) are shared with
:mod:`fedloom.server.robust_krum`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.base import StageContext
from fedloom.config import ConfigError
from fedloom.registry import AGGREGATORS
from fedloom.server.aggregators import AggregationInput

#: Default share of a round's updates assumed to come from attackers, when option ``f``
#: is not set: f = floor(DEFAULT_ATTACKER_SHARE · k).
DEFAULT_ATTACKER_SHARE = 0.2


# ------------------------------------------------------------------- shared helpers
def check_option_keys(name: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse option keys ``name`` does not know, in one line naming the key."""
    for key in options:
        if key not in allowed:
            what = ", ".join(allowed) if allowed else "no options"
            raise ConfigError(
                f"server.aggregator_options.{key}: unknown option for aggregator '{name}'; "
                f"allowed: {what}"
            )


def int_option(options: Mapping[str, Any], key: str, *, minimum: int, what: str) -> int | None:
    """An optional integer option ≥ ``minimum`` (None when unset); bools are refused."""
    if key not in options or options[key] is None:
        return None
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"server.aggregator_options.{key} must be an integer >= {minimum} ({what}); "
            f"got {value!r}"
        )
    return int(value)


def check_f_fits(name: str, f: int | None, *, need: int, rule: str, clients: int) -> None:
    """Refuse an ``f`` that no round can satisfy: the rule needs ``need`` updates (``rule``
    says how that follows from f) but the run has only ``clients`` clients. A round that
    merely happens to be short falls back to the median instead."""
    if f is not None and clients < need:
        raise ConfigError(
            f"server.aggregator_options.f = {f}: {name} needs at least {rule} = {need} updates per "
            f"round, but the run has {clients} clients; lower f"
        )


def default_f(k: int) -> int:
    """f = floor(0.2 · k): the attackers assumed among a round's k updates by default."""
    return math.floor(DEFAULT_ATTACKER_SHARE * k)


def rows_of(inp: AggregationInput) -> np.ndarray:
    """The k×d update matrix in float64; refuses a secure sum (no rows to be robust on)."""
    if inp.updates is None:
        raise ValueError(
            "robust aggregators need every client's update; secure aggregation hides them"
        )
    return np.asarray(inp.updates, dtype=np.float64).reshape(-1, inp.dimension)


def coordinate_median(rows: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of the rows (Yin et al. 2018, Definition 1), float64."""
    return np.asarray(np.median(rows, axis=0), dtype=np.float64)


def median_fallback(rows: np.ndarray, reason: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The coordinate-wise median, used when a round has too few updates for a rule.

    A round with too few updates must not crash a run; the median needs no assumption
    on k, and ``robust_fallback`` says in the round record why it was used.
    """
    return coordinate_median(rows).astype(np.float32), {
        "excluded_clients": [],
        "robust_fallback": reason,
    }


class StatelessRobust:
    """Robust aggregators keep nothing between rounds."""

    needs_individual_updates = True
    aggregates_every_round = False

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        return None


# ------------------------------------------------------------------------- median
class CoordinateMedian(StatelessRobust):
    """Coordinate-wise median (Yin et al. 2018, Definition 1): g_j = med{x_j^i : i ∈ [k]}.

    It has no parameter f: each coordinate stays within the range of the honest values
    as long as fewer than half of the k updates are Byzantine (f < k/2).
    """

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        rows = rows_of(inp)
        if rows.shape[0] == 0:
            return np.zeros(inp.dimension, dtype=np.float32), {"excluded_clients": []}
        return coordinate_median(rows).astype(np.float32), {"excluded_clients": []}


@AGGREGATORS.register("median")
def make_median(options: dict[str, Any], context: StageContext) -> CoordinateMedian:
    check_option_keys("median", options, ())
    return CoordinateMedian()


# ------------------------------------------------------------------- trimmed mean
class TrimmedMean(StatelessRobust):
    """Coordinate-wise β-trimmed mean (Yin et al. 2018, Definition 2).

    In each coordinate the b largest and the b smallest of the k values are removed and
    the remaining k − 2b averaged. Option ``beta`` (default 0.1, 0 ≤ β < 0.5) gives
    b = floor(β · k); option ``f`` (the number of attackers assumed per round; the paper
    needs β ≥ f/k) gives b = f directly and then needs k > 2f, else the round falls back
    to the median. Set one of them, not both.

    ``trimmed_per_client`` counts, per client id, how many of its coordinates were
    trimmed: a client trimmed in nearly every coordinate is an outlier everywhere.
    """

    def __init__(self, *, beta: float | None, f: int | None) -> None:
        self.beta = beta
        self.f = f

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        rows = rows_of(inp)
        k = rows.shape[0]
        if k == 0:
            return np.zeros(inp.dimension, dtype=np.float32), {"excluded_clients": []}
        if self.f is not None:
            b = self.f
            if k <= 2 * b:
                return median_fallback(
                    rows, f"trimmed_mean needs k > 2f = {2 * b} updates, got {k}"
                )
        else:
            b = math.floor((self.beta if self.beta is not None else 0.1) * k)
        order = np.argsort(rows, axis=0, kind="stable")
        kept = np.take_along_axis(rows, order[b : k - b], axis=0)
        aggregate = kept.mean(axis=0)
        trimmed = np.concatenate([order[:b], order[k - b :]]).ravel()
        counts = np.bincount(trimmed, minlength=k)
        ids = list(inp.client_ids) if len(inp.client_ids) == k else list(range(k))
        return aggregate.astype(np.float32), {
            "excluded_clients": [],
            "trimmed_per_end": b,
            "trimmed_per_client": {str(cid): int(c) for cid, c in zip(ids, counts, strict=True)},
        }


@AGGREGATORS.register("trimmed_mean")
def make_trimmed_mean(options: dict[str, Any], context: StageContext) -> TrimmedMean:
    check_option_keys("trimmed_mean", options, ("beta", "f"))
    f = int_option(options, "f", minimum=0, what="values trimmed from each end")
    beta: float | None = None
    if options.get("beta") is not None:
        value = options["beta"]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0.0 <= float(value) < 0.5
        ):
            raise ConfigError(
                "server.aggregator_options.beta must be a number in [0, 0.5) (the share "
                f"trimmed from each end); got {value!r}"
            )
        beta = float(value)
    if beta is not None and f is not None:
        raise ConfigError(
            "server.aggregator_options.beta: set beta (a share) or f (a count), not both"
        )
    check_f_fits("trimmed_mean", f, need=2 * (f or 0) + 1, rule="2f+1", clients=context.num_clients)
    return TrimmedMean(beta=beta, f=f)
