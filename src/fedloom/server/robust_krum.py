"""Distance-based robust aggregators: Krum, Multi-Krum and Bulyan.

* Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui and Stainer 2017, "Machine
  learning with adversaries: Byzantine tolerant gradient descent" (NeurIPS), Section 4:
  the score of update i is s(i) = Σ_{i→j} ‖V_i − V_j‖², the sum over the k − f − 2 updates
  closest to V_i; Krum returns the update with the smallest score, Multi-Krum the mean of
  the m updates with the smallest scores.
* Bulyan: El Mhamdi, Guerraoui and Rouault 2018, "The hidden vulnerability of distributed
  learning in Byzantium" (ICML), Algorithm 1 with Krum as the selection rule.

f is the number of attackers (Byzantine clients) assumed among a round's k updates
(option ``f``; default floor(0.2 · k) of the round's updates, for Bulyan also at most
floor((k − 3) / 4), the most it tolerates). The rules ignore example counts: every
client counts once, as in the papers (a weight is a claim an attacker controls).

A round with too few updates for the rule (Krum: k > 2f + 2, Bulyan: k ≥ 4f + 3) does not
crash the run: it falls back to the coordinate-wise median and says so in the record
field ``robust_fallback``. Distances come from the Gram matrix (one k×k product), in
float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedloom.algorithms.base import StageContext
from fedloom.registry import AGGREGATORS
from fedloom.server.aggregators import AggregationInput
from fedloom.server.robust_coordinate import (
    StatelessRobust,
    check_f_fits,
    check_option_keys,
    default_f,
    int_option,
    median_fallback,
    rows_of,
)


def squared_distances(rows: np.ndarray) -> np.ndarray:
    """‖V_i − V_j‖² for all pairs, via ‖V_i‖² + ‖V_j‖² − 2⟨V_i, V_j⟩ (clipped at 0).

    The rows are first centred on their coordinate-wise median (distances do not change):
    the Gram form cancels badly when the vectors share a large common offset, and the
    median, unlike the mean, is not dragged there by an attacker's huge vector.
    """
    rows = rows - np.median(rows, axis=0)
    gram = rows @ rows.T
    norms = np.diag(gram)
    dist = norms[:, None] + norms[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return np.asarray(dist, dtype=np.float64)


def krum_scores(dist: np.ndarray, neighbours: int) -> np.ndarray:
    """s(i): the sum of the ``neighbours`` smallest squared distances from i to the others
    (Blanchard et al. 2017, Section 4)."""
    k = dist.shape[0]
    if k <= 1 or neighbours <= 0:
        return np.zeros(k)
    others = dist + np.diag(np.full(k, np.inf))
    nearest = np.sort(others, axis=1)[:, :neighbours]
    return np.asarray(nearest.sum(axis=1), dtype=np.float64)


def _ids(inp: AggregationInput, k: int) -> list[int]:
    return [int(c) for c in inp.client_ids] if len(inp.client_ids) == k else list(range(k))


def _zeros(inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
    return np.zeros(inp.dimension, dtype=np.float32), {"excluded_clients": []}


class Krum(StatelessRobust):
    """Krum and Multi-Krum (Blanchard et al. 2017, Section 4).

    Krum (``m`` = 1) returns the single update with the smallest score s(i), the sum of
    its squared distances to its k − f − 2 nearest neighbours; it needs k > 2f + 2, which
    guarantees that an update surrounded by attackers' vectors scores worse than an honest
    one. Multi-Krum returns the plain mean of the ``m`` updates with the smallest scores
    (scores computed once; default m = k − f, at most k, so that with f attackers every
    honest update can be kept and variance reduced as for the mean). Ties go to the lower client id.
    ``excluded_clients`` are the clients not selected.
    """

    def __init__(self, *, name: str, f: int | None, m: int | None, multi: bool) -> None:
        self.name = name
        self.f = f
        self.m = m
        self.multi = multi

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        rows = rows_of(inp)
        k = rows.shape[0]
        if k == 0:
            return _zeros(inp)
        f = self.f if self.f is not None else default_f(k)
        if k <= 2 * f + 2:
            return median_fallback(
                rows, f"{self.name} needs k > 2f+2 = {2 * f + 2} updates, got {k}"
            )
        scores = krum_scores(squared_distances(rows), k - f - 2)
        m = min(self.m if self.m is not None else k - f, k)
        chosen = np.sort(np.argsort(scores, kind="stable")[:m])
        ids = _ids(inp, k)
        selected = [ids[i] for i in chosen]
        fields: dict[str, Any] = {
            "excluded_clients": sorted(set(ids) - set(selected)),
            "robust_f": f,
        }
        if self.multi:
            fields["krum_selected"] = selected
        else:
            fields["krum_selected"] = selected[0]
            fields["krum_score"] = float(scores[chosen[0]])
        return rows[chosen].mean(axis=0).astype(np.float32), fields


@AGGREGATORS.register("krum")
def make_krum(options: dict[str, Any], context: StageContext) -> Krum:
    check_option_keys("krum", options, ("f",))
    f = int_option(options, "f", minimum=0, what="attackers assumed per round")
    _check_krum_f("krum", f, context)
    return Krum(name="krum", f=f, m=1, multi=False)


def _check_krum_f(name: str, f: int | None, context: StageContext) -> None:
    need = 2 * (f or 0) + 3
    check_f_fits(name, f, need=need, rule="2f+3", clients=context.num_clients)


@AGGREGATORS.register("multi_krum")
def make_multi_krum(options: dict[str, Any], context: StageContext) -> Krum:
    check_option_keys("multi_krum", options, ("f", "m"))
    f = int_option(options, "f", minimum=0, what="attackers assumed per round")
    m = int_option(options, "m", minimum=1, what="updates averaged; default k - f")
    _check_krum_f("multi_krum", f, context)
    return Krum(name="multi_krum", f=f, m=m, multi=True)


class Bulyan(StatelessRobust):
    """Bulyan over Krum (El Mhamdi et al. 2018, Algorithm 1).

    First θ = k − 2f updates are selected by applying Krum repeatedly, each time to the
    updates not yet selected (with the same f; a set of n' updates scores over its
    n' − f − 2 nearest neighbours, at least 1, since the last rounds of the recursion
    leave fewer than 2f + 3). Then each coordinate of the result is the mean of the
    β = θ − 2f selected values closest to that coordinate's median. Needs k ≥ 4f + 3;
    default f = min(floor(0.2 · k), floor((k − 3) / 4)). ``excluded_clients`` are the
    clients not in the selection set.
    """

    def __init__(self, *, f: int | None) -> None:
        self.f = f

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        rows = rows_of(inp)
        k = rows.shape[0]
        if k == 0:
            return _zeros(inp)
        f = self.f if self.f is not None else min(default_f(k), math.floor((k - 3) / 4))
        if f < 0 or k < 4 * f + 3:
            need = 4 * max(f, 0) + 3
            return median_fallback(rows, f"bulyan needs k >= 4f+3 = {need} updates, got {k}")
        dist = squared_distances(rows)
        theta = k - 2 * f
        remaining = list(range(k))
        selection: list[int] = []
        while len(selection) < theta:
            n = len(remaining)
            sub = dist[np.ix_(remaining, remaining)]
            scores = krum_scores(sub, min(max(n - f - 2, 1), n - 1))
            best = remaining[int(np.argmin(scores))]
            selection.append(best)
            remaining.remove(best)
        chosen = np.array(sorted(selection))
        picked = rows[chosen]
        beta = theta - 2 * f
        centre = np.median(picked, axis=0)
        order = np.argsort(np.abs(picked - centre), axis=0, kind="stable")[:beta]
        aggregate = np.take_along_axis(picked, order, axis=0).mean(axis=0)
        ids = _ids(inp, k)
        selected = [ids[i] for i in chosen]
        return aggregate.astype(np.float32), {
            "excluded_clients": sorted(set(ids) - set(selected)),
            "robust_f": f,
            "bulyan_selected": selected,
        }


@AGGREGATORS.register("bulyan")
def make_bulyan(options: dict[str, Any], context: StageContext) -> Bulyan:
    check_option_keys("bulyan", options, ("f",))
    f = int_option(options, "f", minimum=0, what="attackers assumed per round")
    need = 4 * (f or 0) + 3
    check_f_fits("bulyan", f, need=need, rule="4f+3", clients=context.num_clients)
    return Bulyan(f=f)
