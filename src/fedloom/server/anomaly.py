"""Per-client anomaly scores, flags and a reputation that can keep clients out of rounds.

An update monitor (:mod:`fedloom.server.monitors`): it reads each round's individual
updates beside whatever aggregator runs, and changes the aggregate only through who is
sampled later. Raw scores (higher is more anomalous) are taken against robust
statistics of the round, so that a minority of attackers cannot move the reference; m
is the coordinate-wise median update (Yin et al. 2018, Definition 1):

* ``sign``: s_i = share of the coordinates (where m_j ≠ 0) with sign(Δ_ij) ≠ sign(m_j);
  sign statistics of the updates as in SignGuard (Xu et al. 2022, Section 4.2).
* ``cosine``: s_i = 1 − cos(Δ_i, m). An update pointing away from the median scores > 1.
* ``distance``: s_i = ‖Δ_i − m‖ / med_j ‖Δ_j − m‖, the distance to the robust centre in
  units of the round's median distance.
* ``norm``: s_i = |‖Δ_i‖ − med_j ‖Δ_j‖| / (1.4826 · MAD_j ‖Δ_j‖), the robust z-score of
  the update norm (Rousseeuw & Croux 1993: 1.4826 · MAD estimates σ for normal data).

Smoothing (``score_decay`` ρ > 0): a client's score is s̄_i ← ρ s̄_i + (1 − ρ) s_i over
the rounds it takes part in (s̄_i = s_i the first time). Flag rule: ``absolute`` flags
s̄_i > threshold; ``robust_z`` flags (s̄_i − med_j s̄_j) / (1.4826 · MAD_j s̄_j) >
threshold over the round's clients. The relative rule matters on non-IID data: as the
model converges every honest update agrees less with the median, and a fixed threshold
stops separating (on digits, Dirichlet 0.5, cosine > 1 misses half of the sign-flip
attackers by round 9; ``benchmarks/anomaly_sign_flip.py``).

A flagged client's reputation r_i (1 before its first round) follows
r_i ← γ r_i + (1 − γ) · [not flagged] in every round it takes part in: an exponential
moving average with forgetting factor γ (``reputation_decay``), the forgetting of
Jøsang & Ismail's beta reputation system (2002) on a single outcome. With
``exclude_below`` set, clients with r_i below it are no longer sampled.

The reputation and the smoothed scores are the server's judgement of a client, so they
live with the server's stage state (checkpointed as ``mon/anomaly/…``, one entry per
client), not in the client state store: a deployed client keeps that store on its own
disk, where an attacker could reset it.

Record fields: ``anomaly_scores`` (client id → the statistic the threshold is applied
to: the robust z or the smoothed score), ``flagged_clients`` (sorted ids) and, with
``exclude_below``, ``low_reputation_clients`` (below it after this round: the next
rounds do not sample them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.base import StageContext
from fedloom.config import AnomalyConfig
from fedloom.registry import UPDATE_MONITORS
from fedloom.server.aggregators import AggregationInput

#: The threshold each method flags above under ``rule = "absolute"`` when
#: ``anomaly.threshold`` is not set; ``robust_z`` defaults to ROBUST_Z_THRESHOLD.
ABSOLUTE_THRESHOLDS = {"sign": 0.5, "cosine": 1.0, "distance": 3.0, "norm": 3.0}
ROBUST_Z_THRESHOLD = 2.5
#: Scores are capped here so that a degenerate round (MAD = 0) stays JSON-able.
MAX_SCORE = 1e6


def anomaly_scores(rows: np.ndarray, method: str) -> np.ndarray:
    """Each row's raw score under ``method`` (see the module docstring), float64."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.shape[0] == 0:
        return np.zeros(0)
    if method == "norm":
        norms = np.linalg.norm(rows, axis=1)
        return np.abs(robust_z(norms))
    centre = np.median(rows, axis=0)
    if method == "sign":
        signs = np.sign(centre)
        used = signs != 0
        if not used.any():
            return np.zeros(rows.shape[0])
        return np.asarray((np.sign(rows[:, used]) != signs[used]).mean(axis=1), dtype=np.float64)
    if method == "distance":
        dist = np.linalg.norm(rows - centre, axis=1)
        scale = float(np.median(dist))
        if scale > 0.0:
            return np.asarray(np.minimum(dist / scale, MAX_SCORE), dtype=np.float64)
        return np.where(dist > 0.0, MAX_SCORE, 0.0)
    if method == "cosine":
        norms = np.linalg.norm(rows, axis=1) * float(np.linalg.norm(centre))
        cos = np.where(norms > 0.0, (rows @ centre) / np.where(norms > 0.0, norms, 1.0), 0.0)
        return np.asarray(1.0 - cos, dtype=np.float64)
    raise ValueError(f"unknown anomaly method '{method}'")


def robust_z(values: np.ndarray) -> np.ndarray:
    """(v − median) / (1.4826 · MAD), capped at ±MAX_SCORE; with MAD = 0 a value above the
    median gets +MAX_SCORE, below −MAX_SCORE, equal 0."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    dev = values - np.median(values)
    scale = 1.4826 * float(np.median(np.abs(dev)))
    if scale > 0.0:
        return np.asarray(np.clip(dev / scale, -MAX_SCORE, MAX_SCORE), dtype=np.float64)
    return np.sign(dev) * MAX_SCORE


class AnomalyMonitor:
    """Scores, flags and reputations (see the module docstring)."""

    name = "anomaly"
    needs_individual_updates = True

    def __init__(
        self,
        *,
        num_clients: int,
        method: str,
        rule: str,
        threshold: float,
        score_decay: float,
        decay: float,
        exclude_below: float | None,
    ) -> None:
        self.method = method
        self.rule = rule
        self.threshold = threshold
        self.score_decay = score_decay
        self.decay = decay
        self.exclude_below = exclude_below
        self.reputation = np.ones(num_clients, dtype=np.float64)
        #: Smoothed raw score per client; NaN before its first round.
        self.smoothed = np.full(num_clients, np.nan)

    def observe(self, inp: AggregationInput) -> dict[str, Any]:
        if inp.updates is None:
            raise ValueError("anomaly detection needs every client's update")
        rows = np.asarray(inp.updates, dtype=np.float64).reshape(-1, inp.dimension)
        k = rows.shape[0]
        ids = [int(c) for c in inp.client_ids] if len(inp.client_ids) == k else list(range(k))
        index = np.array(ids, dtype=np.int64)
        raw = anomaly_scores(rows, self.method)
        if k:
            past = self.smoothed[index]
            rho = self.score_decay
            self.smoothed[index] = np.where(np.isnan(past), raw, rho * past + (1 - rho) * raw)
        score = self.smoothed[index] if k else raw
        stat = robust_z(score) if self.rule == "robust_z" else score
        flags = stat > self.threshold
        if k:
            outcome = np.where(flags, 0.0, 1.0)
            self.reputation[index] = (
                self.decay * self.reputation[index] + (1 - self.decay) * outcome
            )
        fields: dict[str, Any] = {
            "anomaly_scores": {str(c): round(float(s), 6) for c, s in zip(ids, stat, strict=True)},
            "flagged_clients": sorted(c for c, f in zip(ids, flags, strict=True) if f),
        }
        if self.exclude_below is not None:
            low = np.flatnonzero(self.reputation < self.exclude_below)
            fields["low_reputation_clients"] = [int(c) for c in low]
        return fields

    def eligible(self, rnd: int, pool: np.ndarray) -> np.ndarray:
        if self.exclude_below is None or len(pool) == 0:
            return pool
        return pool[self.reputation[pool] >= self.exclude_below]

    def state(self) -> dict[str, Any]:
        return {"reputation": self.reputation.copy(), "smoothed": self.smoothed.copy()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        for key, fresh in (("reputation", 1.0), ("smoothed", np.nan)):
            current: np.ndarray = getattr(self, key)
            saved = state.get(key)
            if saved is None:
                current[:] = fresh
                continue
            saved = np.asarray(saved, dtype=np.float64)
            if saved.shape != current.shape:
                raise ValueError(
                    f"checkpointed anomaly {key} has {saved.size} clients, the run has "
                    f"{current.size}"
                )
            setattr(self, key, saved.copy())


@UPDATE_MONITORS.register("anomaly")
def make_anomaly(section: AnomalyConfig, context: StageContext) -> AnomalyMonitor:
    threshold = section.threshold
    if threshold is None:
        threshold = (
            ROBUST_Z_THRESHOLD
            if section.rule == "robust_z"
            else ABSOLUTE_THRESHOLDS[section.method]
        )
    return AnomalyMonitor(
        num_clients=context.num_clients,
        method=section.method,
        rule=section.rule,
        threshold=threshold,
        score_decay=section.score_decay,
        decay=section.reputation_decay,
        exclude_below=section.exclude_below,
    )
