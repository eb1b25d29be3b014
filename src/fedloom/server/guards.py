"""Guard rails every run has: bounds on how far one client can move the global model.

A client that claims 10^15 examples, or uploads a vector of 3e38, must not take the
model over: FedAvg weights each update by its claimed example count, and one huge
finite update makes the next global model huge, after which every honest client's
update overflows and is rejected as "not finite" (the honest sites then blame
themselves). The robust aggregators (``server/robust_*.py``) defend the *value* of the
aggregate against a coordinated minority; these rails are cheaper and always on:

* **Claimed example counts** are clipped to a cap: ``examples_median_multiple`` times the
  round's low median claim (with two clients the smaller one, so one liar cannot raise
  the cap) and/or an absolute ``max_examples`` (a deployment knows its largest site).
  A clipped count is counted in the round record (``guard_examples_clipped``). Under
  secure aggregation the server averages without weights, so counts are not used.
* **Norm outliers** (optional; on by default in a deployment): an update whose L2 norm
  exceeds max(m + k·MAD, r·m), with m the median and MAD the median absolute deviation
  of the round's norms, is rejected with that reason and counted
  (``guard_norm_rejected``). The median and MAD are the robust location and scale
  estimates of Hampel (1974); the rule is Hampel's outlier identifier with a wide
  k (default 10) and a floor r·m (default 3·m), so that honest non-IID clients, whose
  norms differ by a few times, pass. It needs at least ``norm_min_updates`` (≥ 3)
  updates: with two, neither can be told from the other.
* **Finiteness**: the aggregate, the server algorithm's update and the next global model
  are checked finite before anything is committed; a round that would not be finite is
  discarded with its cause and the previous model stays (nothing of it is broadcast).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedloom.config import GuardsConfig
from fedloom.messages import ClientFailure, FitResult

log = logging.getLogger("fedloom.server")

#: Round-record fields the guard rails always write (0 when nothing was bounded).
EXAMPLES_CLIPPED = "guard_examples_clipped"
NORM_REJECTED = "guard_norm_rejected"
#: Why a round's result was discarded (absent when it was not).
DISCARDED = "discarded"


@dataclass(frozen=True, kw_only=True)
class GuardSettings:
    """The resolved guard rails of one run (``[guards]`` after "auto" is decided)."""

    max_examples: int | None = None
    examples_median_multiple: float = 10.0  # 0: no cap relative to the median
    norm_outliers: bool = False
    norm_mad_k: float | None = 10.0  # None: the floor alone (a simulation's "auto")
    norm_min_multiple: float = 3.0
    norm_min_updates: int = 3


@dataclass
class Screened:
    """A round's usable updates after the guard rails, the rejected ones, and the counts."""

    updates: list[FitResult]
    rejected: list[ClientFailure] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)


def low_median(values: Sequence[float]) -> float:
    """The lower median: the ⌈n/2⌉-th smallest value (of two, the smaller one)."""
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 2])


class GuardRails:
    """Screens a round's updates before aggregation and checks what would be committed."""

    def __init__(self, settings: GuardSettings | None = None) -> None:
        self.settings = settings or GuardSettings()

    def screen(self, rnd: int, updates: list[FitResult]) -> Screened:
        """Clip claimed example counts, then reject norm outliers (clear updates only)."""
        updates, clipped = self._clip_counts(rnd, updates)
        kept, rejected = self._reject_norm_outliers(rnd, updates)
        return Screened(kept, rejected, {EXAMPLES_CLIPPED: clipped, NORM_REJECTED: len(rejected)})

    def example_cap(self, claims: Sequence[int]) -> int | None:
        """The round's largest admissible example count (None: no cap)."""
        s = self.settings
        caps: list[int] = []
        if s.max_examples is not None:
            caps.append(s.max_examples)
        if s.examples_median_multiple > 0 and claims:
            caps.append(max(1, int(s.examples_median_multiple * low_median(claims))))
        return min(caps) if caps else None

    def _clip_counts(self, rnd: int, updates: list[FitResult]) -> tuple[list[FitResult], int]:
        clear = [u.num_examples for u in updates if not u.held]
        cap = self.example_cap([max(n, 1) for n in clear])
        if cap is None:
            return updates, 0
        out: list[FitResult] = []
        clipped = 0
        for u in updates:
            if not u.held and u.num_examples > cap:
                log.warning(
                    "round %d: client %d claimed %d examples; counted as %d (the guard "
                    "rails' cap: guards.examples_median_multiple × the round's median "
                    "claim, or guards.max_examples)",
                    rnd,
                    u.client_id,
                    u.num_examples,
                    cap,
                )
                u = dataclasses.replace(u, num_examples=cap)
                clipped += 1
            out.append(u)
        return out, clipped

    def _reject_norm_outliers(
        self, rnd: int, updates: list[FitResult]
    ) -> tuple[list[FitResult], list[ClientFailure]]:
        s = self.settings
        clear = [u for u in updates if not u.held and u.vectors]
        if not s.norm_outliers or len(clear) < s.norm_min_updates:
            return updates, []
        norms = {u.client_id: update_norm(u) for u in clear}
        values = np.fromiter(norms.values(), dtype=np.float64)
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median)))
        limit = s.norm_min_multiple * median
        if s.norm_mad_k is not None:
            limit = max(median + s.norm_mad_k * mad, limit)
        if limit <= 0.0:
            return updates, []
        kept: list[FitResult] = []
        rejected: list[ClientFailure] = []
        for u in updates:
            norm = norms.get(u.client_id)
            if norm is not None and norm > limit:
                rejected.append(
                    ClientFailure(
                        client_id=u.client_id,
                        round=rnd,
                        error=(
                            f"update rejected by the guard rails: norm {norm:.4g} is far "
                            f"outside this round's (median {median:.4g}, MAD {mad:.4g}, "
                            f"limit {limit:.4g} = max(median + {s.norm_mad_k} MAD, "
                            f"{s.norm_min_multiple:g} × median); see [guards])"
                        ),
                    )
                )
            else:
                kept.append(u)
        return kept, rejected


def update_norm(result: FitResult) -> float:
    """The L2 norm of everything a result uploads, in float64 (no overflow at 3e38)."""
    total = 0.0
    for vector in result.vectors.values():
        v = vector.astype(np.float64, copy=False)
        total += float(np.dot(v, v))
    return float(np.sqrt(total))


def not_finite(what: str, vector: np.ndarray) -> str | None:
    """Why ``vector`` must not be committed (None when every entry is finite)."""
    finite = np.isfinite(vector)
    if bool(np.all(finite)):
        return None
    bad = int(vector.size - np.count_nonzero(finite))
    return f"{what} has {bad} non-finite entries of {vector.size}"


#: In a simulation, ``norm_outliers = "auto"`` rejects only updates this many times the
#: round's median norm: an overflow attack or a bug, never an honest client, while attack
#: experiments at realistic scales (10×, 100×) still measure the configured aggregator.
SIMULATION_NORM_MULTIPLE = 1000.0


def guard_settings(cfg: GuardsConfig, *, deployment: bool, clipped: bool) -> GuardSettings:
    """Resolve ``[guards]`` for a run.

    ``norm_outliers = "auto"`` is the full rule in a deployment and, in a simulation,
    only the far floor :data:`SIMULATION_NORM_MULTIPLE` × median. It is off wherever
    updates are already clipped (central DP, secure aggregation), where a rule that
    rejects by the other clients' norms would break the bound the clipping gives
    (``strategies.check_composition`` refuses "on" there).
    """
    on = cfg.norm_outliers == "on" or (cfg.norm_outliers == "auto" and deployment)
    far_only = cfg.norm_outliers == "auto" and not deployment
    return GuardSettings(
        max_examples=cfg.max_examples,
        examples_median_multiple=cfg.examples_median_multiple,
        norm_outliers=(on or far_only) and not clipped,
        norm_mad_k=None if far_only else cfg.norm_mad_k,
        norm_min_multiple=SIMULATION_NORM_MULTIPLE if far_only else cfg.norm_min_multiple,
        norm_min_updates=cfg.norm_min_updates,
    )
