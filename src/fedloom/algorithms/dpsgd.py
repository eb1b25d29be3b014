"""Local (example-level) DP as a client algorithm: DP-SGD through Opacus.

This module only registers the algorithm and holds its settings, so importing fedloom
never loads Opacus; :mod:`fedloom.algorithms.dpsgd_opacus` (the implementation and its
rationale) is imported when a run actually trains with DP-SGD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedloom.algorithms.base import StageContext
from fedloom.callbacks import Callback, RunContext
from fedloom.registry import CLIENT_ALGORITHMS

#: Where a client's DP-SGD ledger lives in its state: [[σ, q, steps], ...] (Opacus' RDP history).
LEDGER_KEY = "local_dp"


@dataclass(frozen=True, kw_only=True)
class LocalDPSettings:
    """The local-DP keys of the ``privacy`` section."""

    noise_multiplier: float
    max_grad_norm: float
    local_delta: float | None
    #: The run's δ: a client's default δ is min(this, 1 / (10 n)).
    central_delta: float
    secure_noise: bool


@CLIENT_ALGORITHMS.register("dp-sgd")
def make_dpsgd(settings: Any, context: StageContext) -> Any:
    from fedloom.algorithms.dpsgd_opacus import DPSGDClient

    if settings.local_dp is None:
        raise ValueError("the dp-sgd client algorithm needs local-DP settings")
    return DPSGDClient(settings.local_dp, proximal_mu=settings.proximal_mu)


class LocalEpsilonReport(Callback):
    """Adds the worst client's local ε so far to the round record (each reports its own)."""

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        local = [
            u.metrics["local_epsilon"] for u in run.fit_results if "local_epsilon" in u.metrics
        ]
        if local:
            record["local_epsilon_max"] = max(local)
