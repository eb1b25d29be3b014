"""Per-client anomaly scores, flags and a reputation that can keep clients out of rounds.

An update monitor (:mod:`fedloom.server.monitors`): it reads each round's individual
updates beside whatever aggregator runs, and changes the aggregate only through who is
sampled later. Scores (higher is more anomalous), all against robust statistics of the
round so that a minority of attackers cannot move the reference:

* ``cosine``: s_i = 1 − cos(Δ_i, m), m the coordinate-wise median update (Yin et al.
  2018, Definition 1). An update pointing away from the median scores above 1.
* ``distance``: s_i = ‖Δ_i − m‖ / med_j ‖Δ_j − m‖, the distance to the robust centre in
  units of the round's median distance.
* ``norm``: s_i = |‖Δ_i‖ − med_j ‖Δ_j‖| / (1.4826 · MAD_j ‖Δ_j‖), the robust z-score of
  the update norm (Rousseeuw & Croux 1993: 1.4826 · MAD estimates σ for normal data).

A client is flagged when s_i > threshold. Its reputation r_i (1 before its first
round) follows r_i ← γ r_i + (1 − γ) · [not flagged] in every round it takes part in: an
exponential moving average with forgetting factor γ (``reputation_decay``), the
forgetting of Jøsang & Ismail's beta reputation system (2002) on a single outcome. With
``exclude_below`` set, clients with r_i below it are no longer sampled.

The reputation is the server's judgement of a client, so it lives with the server's
stage state (the checkpoint's ``mon/anomaly/reputation``, one entry per client), not in
the client state store: a deployed client keeps that store on its own disk, where an
attacker could reset it.

Record fields: ``anomaly_scores`` (client id → score), ``flagged_clients`` (sorted
ids) and, with ``exclude_below``, ``low_reputation_clients`` (the clients below it after
this round, whom the next rounds do not sample).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.base import StageContext
from fedloom.config import AnomalyConfig
from fedloom.registry import UPDATE_MONITORS
from fedloom.server.aggregators import AggregationInput

#: The threshold each method flags above when ``anomaly.threshold`` is not set.
DEFAULT_THRESHOLDS = {"cosine": 1.0, "distance": 3.0, "norm": 3.0}
#: Scores are capped here so that a degenerate round (MAD = 0) stays JSON-able.
MAX_SCORE = 1e6


def anomaly_scores(rows: np.ndarray, method: str) -> np.ndarray:
    """Each row's score under ``method`` (see the module docstring), float64."""
    rows = np.asarray(rows, dtype=np.float64)
    k = rows.shape[0]
    if k == 0:
        return np.zeros(0)
    if method == "norm":
        norms = np.linalg.norm(rows, axis=1)
        dev = np.abs(norms - np.median(norms))
        return _ratio(dev, 1.4826 * float(np.median(dev)))
    centre = np.median(rows, axis=0)
    if method == "distance":
        dist = np.linalg.norm(rows - centre, axis=1)
        return _ratio(dist, float(np.median(dist)))
    if method == "cosine":
        norms = np.linalg.norm(rows, axis=1) * float(np.linalg.norm(centre))
        cos = np.where(norms > 0.0, (rows @ centre) / np.where(norms > 0.0, norms, 1.0), 0.0)
        return np.asarray(1.0 - cos, dtype=np.float64)
    raise ValueError(f"unknown anomaly method '{method}'")


def _ratio(values: np.ndarray, scale: float) -> np.ndarray:
    """values / scale, where a zero scale makes 0 of 0 and MAX_SCORE of anything else."""
    if scale > 0.0:
        return np.minimum(values / scale, MAX_SCORE)
    return np.where(values > 0.0, MAX_SCORE, 0.0)


class AnomalyMonitor:
    """Scores, flags and reputations (see the module docstring)."""

    name = "anomaly"
    needs_individual_updates = True

    def __init__(
        self,
        *,
        num_clients: int,
        method: str,
        threshold: float,
        decay: float,
        exclude_below: float | None,
    ) -> None:
        self.method = method
        self.threshold = threshold
        self.decay = decay
        self.exclude_below = exclude_below
        self.reputation = np.ones(num_clients, dtype=np.float64)

    def observe(self, inp: AggregationInput) -> dict[str, Any]:
        if inp.updates is None:
            raise ValueError("anomaly detection needs every client's update")
        rows = np.asarray(inp.updates, dtype=np.float64).reshape(-1, inp.dimension)
        k = rows.shape[0]
        ids = [int(c) for c in inp.client_ids] if len(inp.client_ids) == k else list(range(k))
        scores = anomaly_scores(rows, self.method)
        flagged = [c for c, s in zip(ids, scores, strict=True) if s > self.threshold]
        outcome = np.array([0.0 if c in flagged else 1.0 for c in ids])
        if ids:
            index = np.array(ids)
            self.reputation[index] = (
                self.decay * self.reputation[index] + (1 - self.decay) * outcome
            )
        fields: dict[str, Any] = {
            "anomaly_scores": {
                str(c): round(float(s), 6) for c, s in zip(ids, scores, strict=True)
            },
            "flagged_clients": sorted(flagged),
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
        return {"reputation": self.reputation.copy()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("reputation")
        if saved is None:
            self.reputation[:] = 1.0
            return
        saved = np.asarray(saved, dtype=np.float64)
        if saved.shape != self.reputation.shape:
            raise ValueError(
                f"checkpointed reputation has {saved.size} clients, the run has "
                f"{self.reputation.size}"
            )
        self.reputation = saved.copy()


@UPDATE_MONITORS.register("anomaly")
def make_anomaly(section: AnomalyConfig, context: StageContext) -> AnomalyMonitor:
    threshold = section.threshold
    return AnomalyMonitor(
        num_clients=context.num_clients,
        method=section.method,
        threshold=DEFAULT_THRESHOLDS[section.method] if threshold is None else threshold,
        decay=section.reputation_decay,
        exclude_below=section.exclude_below,
    )
