"""Geometric median aggregation (RFA) by the smoothed Weiszfeld algorithm.

Pillutla, Kakade & Harchaoui 2022, "Robust aggregation for federated learning" (IEEE
Trans. Signal Processing), replace the weighted mean by the weighted geometric median

    z* = argmin_z Σ_i α_i ‖z − w_i‖,

whose breakdown point is 1/2: as long as the attackers hold less than half of the total
weight Σ α_i, they cannot move z* arbitrarily far, however large their vectors. The
median has no closed form; their Algorithm 2 (smoothed Weiszfeld) approximates it with a
few reweighted means, each costing one pass over the k×d update matrix.

Registered as ``server.aggregator = "rfa"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.algorithms.base import StageContext
from fedloom.config import ConfigError
from fedloom.registry import AGGREGATORS
from fedloom.server.aggregators import AggregationInput

#: Options ``server.aggregator_options`` may hold for ``rfa``.
RFA_OPTIONS = ("nu", "max_iter", "tol")


@dataclass(frozen=True)
class WeiszfeldResult:
    """The smoothed Weiszfeld iterate and how it was reached."""

    #: The approximate (smoothed) geometric median, float64.
    median: np.ndarray
    #: β_i = α_i / max(ν, ‖z − w_i‖) of the last step: the returned median is
    #: Σ β_i w_i / Σ β_i, so β_i / Σ β is each point's share in it.
    betas: np.ndarray
    #: Weiszfeld steps taken (at most ``max_iter``).
    iterations: int
    #: True when the relative change of the objective fell below ``tol``.
    converged: bool
    #: The smoothed objective g_ν at ``median``.
    objective: float


def smoothed_objective(
    points: np.ndarray, alphas: np.ndarray, z: np.ndarray, *, nu: float
) -> float:
    """g_ν(z) = Σ_i α_i ‖z − w_i‖_ν, the objective Algorithm 2 of Pillutla et al. 2022
    decreases, where the smoothed norm is ‖x‖²/(2ν) + ν/2 for ‖x‖ ≤ ν and ‖x‖ otherwise
    (it differs from the plain objective by at most ν/2 · Σ α_i)."""
    dist = np.linalg.norm(points - z, axis=1)
    smooth = np.where(dist <= nu, dist**2 / (2.0 * nu) + nu / 2.0, dist)
    return float(alphas @ smooth)


def smoothed_weiszfeld(
    points: np.ndarray,
    alphas: np.ndarray,
    *,
    nu: float = 1e-6,
    max_iter: int = 10,
    tol: float = 1e-6,
) -> WeiszfeldResult:
    """Pillutla et al. 2022, Algorithm 2 (smoothed Weiszfeld).

    Starting from z⁰, whichever of the coordinate-wise median and the α-weighted mean
    has the lower objective, each step sets

        β_i = α_i / max(ν, ‖z^r − w_i‖),   z^{r+1} = Σ β_i w_i / Σ β_i,

    which never increases the smoothed objective g_ν; ν > 0 keeps the step defined when
    the iterate lands on a point. Stops after ``max_iter`` steps, or earlier once
    |g_ν(z^r) − g_ν(z^{r+1})| ≤ tol · g_ν(z^{r+1}) (the authors' stopping rule; the paper
    finds a few steps suffice in federated training).

    Why not always start from the weighted mean as the authors' code does: attackers with
    huge vectors drag the mean arbitrarily far, and Weiszfeld closes the gap only
    linearly, by about θ/(1 − θ) per step for an attacker weight fraction θ. Measured:
    with 30 % of the points at ±1e6, 10 steps from the mean ended up to 30× farther from
    the honest points than the median's guarantee allows, while from the coordinate-wise
    median (inside the honest range when attackers are under half) the iterate stayed
    well within it. The mean stays a candidate because an iterate on a data point
    barely moves (its β is α/ν): when the coordinate-wise median *is* one of the points
    (collinear or one-dimensional data) but not the weighted median, the mean is the
    better start.
    """
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"need a non-empty k×d matrix of points, got shape {points.shape}")
    if alphas.shape != (len(points),):
        raise ValueError(f"{len(points)} points but {alphas.shape} weights")
    if np.any(alphas < 0):
        raise ValueError("Weiszfeld weights must be non-negative")
    if nu <= 0.0 or max_iter < 1 or tol < 0.0:
        raise ValueError(f"need nu > 0, max_iter >= 1, tol >= 0; got {nu}, {max_iter}, {tol}")
    pts = points.astype(np.float64, copy=False)
    a = alphas.astype(np.float64)
    if float(a.sum()) <= 0.0:
        a = np.ones(len(pts))  # no example counts: every point counts the same
    starts = [np.median(pts, axis=0), (a @ pts) / a.sum()]
    values = [smoothed_objective(pts, a, z0, nu=nu) for z0 in starts]
    z, objective = starts[int(np.argmin(values))], min(values)
    betas = a
    converged = False
    iterations = 0
    for _ in range(max_iter):
        dist = np.linalg.norm(pts - z, axis=1)
        betas = a / np.maximum(nu, dist)
        z = (betas @ pts) / betas.sum()
        iterations += 1
        previous, objective = objective, smoothed_objective(pts, a, z, nu=nu)
        if abs(previous - objective) <= tol * objective:
            converged = True
            break
    return WeiszfeldResult(z, betas, iterations, converged, objective)


class GeometricMedianAggregator:
    """RFA: the example-weighted geometric median of the updates (Pillutla, Kakade &
    Harchaoui 2022, Algorithm 2, smoothed Weiszfeld), with α_i = the client's example count.

    **f (assumed attackers):** none is needed, and the option is refused. The geometric
    median tolerates any set of attackers holding less than half of the total weight
    Σ α_i (breakdown point 1/2): with a fraction θ < 1/2 of the weight corrupted, the exact
    median lies within 2(1 − θ)/(1 − 2θ) · max_honest ‖w_i − y‖ of any point y (e.g. the
    honest mean), whatever the attackers send. Since α_i is the count a client reports,
    an attacker that inflates its count gains weight; the paper assumes the counts are known.

    Options (``server.aggregator_options``): ``nu`` (smoothing ν, default 1e-6),
    ``max_iter`` (Weiszfeld steps, default 10: the paper reports a few suffice),
    ``tol`` (relative objective change that stops early, default 1e-6).

    Measured (digits, 20 clients, 10 rounds): 0.967 accuracy on IID and Dirichlet 0.5
    partitions (mean: 0.969 / 0.947); with clients 0–3 sending −10× their update, 0.947 /
    0.922 (mean: 0.100), those four reported in ``excluded_clients``.

    Record fields: ``rfa_iterations`` (steps taken), ``rfa_converged``, and
    ``excluded_clients``, the clients the median **down-weighted**: those whose share of
    the last step, β_i / Σ β, is below half their share of the weighted mean, α_i / Σ α.
    Equivalently their Weiszfeld factor 1/max(ν, ‖z − w_i‖) is below half the α-weighted
    mean factor; with equal example counts this is "β_i below half the mean β".
    """

    needs_individual_updates = True
    aggregates_every_round = False

    def __init__(self, *, nu: float = 1e-6, max_iter: int = 10, tol: float = 1e-6) -> None:
        self.nu = nu
        self.max_iter = max_iter
        self.tol = tol

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        if inp.updates is None:
            raise ValueError("RFA needs each client's update; it cannot run on a secure sum")
        k = len(inp.updates)
        if k == 0:
            fields: dict[str, Any] = {"excluded_clients": [], "rfa_iterations": 0}
            return np.zeros(inp.dimension, dtype=np.float32), fields
        ids = row_client_ids(inp, k)
        alphas = np.asarray(inp.weights, dtype=np.float64)
        result = smoothed_weiszfeld(
            inp.updates, alphas, nu=self.nu, max_iter=self.max_iter, tol=self.tol
        )
        if float(alphas.sum()) <= 0.0:
            alphas = np.ones(k)
        share = result.betas / result.betas.sum()
        fedavg_share = alphas / alphas.sum()
        down = share < 0.5 * fedavg_share
        return result.median.astype(np.float32), {
            "excluded_clients": sorted(int(ids[i]) for i in np.flatnonzero(down)),
            "rfa_iterations": result.iterations,
            "rfa_converged": result.converged,
        }

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        return None


def row_client_ids(inp: AggregationInput, k: int) -> list[int]:
    """The rows' client ids (row numbers when the input carries none)."""
    if not inp.client_ids:
        return list(range(k))
    if len(inp.client_ids) != k:
        raise ValueError(f"{k} updates but {len(inp.client_ids)} client ids")
    return [int(c) for c in inp.client_ids]


def option_number(options: Mapping[str, Any], key: str, default: float, *, what: str) -> float:
    """``options[key]`` as a finite float (``default`` when absent); ConfigError otherwise."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise ConfigError(f"server.aggregator_options.{key}: must be {what}, got {value!r}")
    return float(value)


def option_integer(options: Mapping[str, Any], key: str, default: int, *, what: str) -> int:
    """``options[key]`` as an int (not a bool; ``default`` when absent); ConfigError otherwise."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"server.aggregator_options.{key}: must be {what}, got {value!r}")
    return value


def refuse_unknown_options(options: Mapping[str, Any], allowed: tuple[str, ...], name: str) -> None:
    """One ConfigError line for the first key of ``options`` not in ``allowed`` (a typo
    must not silently leave a default in place)."""
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"server.aggregator_options.{key}: not an option of aggregator '{name}'; "
                f"allowed: {', '.join(allowed)}"
            )


@AGGREGATORS.register("rfa")
def make_rfa(options: dict[str, Any], context: StageContext) -> GeometricMedianAggregator:
    refuse_unknown_options(options, RFA_OPTIONS, "rfa")
    nu = option_number(options, "nu", 1e-6, what="a number > 0")
    if nu <= 0.0:
        raise ConfigError(f"server.aggregator_options.nu: must be a number > 0, got {nu}")
    max_iter = option_integer(options, "max_iter", 10, what="an integer >= 1")
    if max_iter < 1:
        raise ConfigError(
            f"server.aggregator_options.max_iter: must be an integer >= 1, got {max_iter}"
        )
    tol = option_number(options, "tol", 1e-6, what="a number >= 0")
    if tol < 0.0:
        raise ConfigError(f"server.aggregator_options.tol: must be a number >= 0, got {tol}")
    return GeometricMedianAggregator(nu=nu, max_iter=max_iter, tol=tol)
