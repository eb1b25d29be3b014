"""FedNova: normalized averaging of heterogeneous local work (Wang et al. 2020, "Tackling
the Objective Inconsistency Problem in Heterogeneous Federated Optimization").

When clients take different numbers of local steps τ_i, FedAvg's update
Σ p_i (w_i − w) weights client i by p_i τ_i, so it converges to a stationary point of
the *surrogate* Σ p_i τ_i F_i / Σ p_i τ_i rather than of F = Σ p_i F_i (the paper's
Theorem 1). FedNova divides each client's update by the norm of its aggregation vector,
a_i = ‖a_i‖₁, and rescales the average by τ_eff = Σ p_i a_i (Eq. 6/7):

    x ← x + η_g τ_eff Σ_i p_i d_i,    d_i = (y_i − x) / a_i,

with (Section 4, "Examples") a_i = τ_i for plain local SGD and, for SGD with heavy-ball
momentum ρ, a_i = Σ_{k=1}^{τ_i} (1 − ρ^k)/(1 − ρ) = [τ_i − ρ(1 − ρ^{τ_i})/(1 − ρ)]/(1 − ρ):
the k-th gradient of a momentum run moves the weights by η(1 − ρ^{τ−k+1})/(1 − ρ) in
all, and a_i is the sum of those coefficients over η.

The client uploads ``d_i`` as its ``"delta"`` and reports ``a_i`` as the metric
``fednova_a``; p_i = n_i / Σ n over the round's contributors, which is exactly the weight
the ``mean`` aggregator gives each upload, so the aggregate is Σ p_i d_i and the server
half only multiplies it by τ_eff (recorded per round as ``fednova_tau_eff``). With
another aggregator the aggregate is whatever that aggregator makes of the d_i.

The proximal term (FedProx) has a different a_i in the paper and is refused here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedloom.algorithms.base import (
    AlgorithmSettings,
    ClientContext,
    ClientUpdate,
    PlainServer,
    StageContext,
    full_global,
)
from fedloom.algorithms.sgd import evaluate_global, train_locally
from fedloom.config import ConfigError
from fedloom.messages import DELTA, FitResult
from fedloom.registry import CLIENT_ALGORITHMS, SERVER_ALGORITHMS

#: The metric a FedNova client reports its normalizer a_i under.
NORMALIZER = "fednova_a"


def local_step_normalizer(steps: int, momentum: float) -> float:
    """a = Σ_{k=1}^{τ} (1 − ρ^k)/(1 − ρ) for τ = ``steps`` of SGD with momentum ρ
    (Wang et al. 2020, Section 4); τ itself for plain SGD (ρ = 0).

    It is the sum of the coefficients, in units of the learning rate, with which the
    local gradients add up to w_start − w_end (``torch.optim.SGD``'s momentum, buffer
    starting at zero, as :class:`~fedloom.client.learner.Learner` runs it).
    """
    if steps <= 0:
        return 0.0
    if momentum == 0.0:
        return float(steps)
    rho = float(momentum)
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


class FedNovaClient:
    """Local SGD from the global model; uploads (w_local − w_global) / a_i."""

    #: The server's τ_eff needs a_i, so it is sent even under secure aggregation.
    server_metrics = frozenset({NORMALIZER})

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        start = full_global(ctx)
        out = train_locally(ctx, start)
        a = local_step_normalizer(out.steps, ctx.sgd.momentum)
        delta = out.weights.astype(np.float64) - start.astype(np.float64)
        normalized = delta / a if a > 0 else np.zeros_like(delta)
        return ClientUpdate(
            {DELTA: normalized.astype(np.float32)},
            {"train_loss": out.train_loss, "steps": float(out.steps), NORMALIZER: a},
        )

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        return evaluate_global(ctx)


class FedNovaServer(PlainServer):
    """Rescales the weighted mean of normalized updates by τ_eff = Σ p_i a_i (Eq. 6)."""

    def combine(
        self,
        *,
        rnd: int,
        aggregate: np.ndarray,
        extras: Mapping[str, np.ndarray],
        contributors: Sequence[FitResult],
    ) -> tuple[np.ndarray, dict[str, Any]]:
        tau_eff = effective_steps(contributors)
        update = (np.float64(tau_eff) * aggregate.astype(np.float64)).astype(np.float32)
        return update, {"fednova_tau_eff": tau_eff}


def effective_steps(contributors: Sequence[FitResult]) -> float:
    """τ_eff = Σ p_i a_i with p_i = n_i / Σ_j n_j over the contributors (0 for none)."""
    if not contributors:
        return 0.0
    missing = [r.client_id for r in contributors if NORMALIZER not in r.metrics]
    if missing:
        raise ValueError(
            f"FedNova: clients {missing} reported no '{NORMALIZER}'; every client must run "
            "client.algorithm = 'fednova'"
        )
    n = np.array([r.num_examples for r in contributors], dtype=np.float64)
    a = np.array([r.metrics[NORMALIZER] for r in contributors], dtype=np.float64)
    total = n.sum()
    if total <= 0:  # no examples anywhere: every client counts once
        return float(a.mean())
    return float(np.dot(n / total, a))


@CLIENT_ALGORITHMS.register("fednova")
def make_fednova_client(settings: AlgorithmSettings, context: StageContext) -> FedNovaClient:
    if settings.proximal_mu:
        raise ConfigError(
            "FedNova's normalizer here is for SGD with or without momentum, not the proximal "
            "term; set client.proximal_mu = 0 with strategy fednova"
        )
    return FedNovaClient()


@SERVER_ALGORITHMS.register("fednova")
def make_fednova_server(settings: AlgorithmSettings, context: StageContext) -> FedNovaServer:
    return FedNovaServer()
