"""FedNova (Wang et al. 2020, Eq. 6/7): the normalizer a_i for plain and momentum SGD, the
client's normalized upload, and the server's τ_eff rescaling, by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.nn.functional as F
from torch import nn

from fedloom.algorithms.base import ClientContext
from fedloom.algorithms.fednova import (
    NORMALIZER,
    FedNovaClient,
    FedNovaServer,
    local_step_normalizer,
)
from fedloom.client.learner import Learner, SGDSettings, WorkPlan, WorkSettings
from fedloom.client_store import ClientState
from fedloom.config import ConfigError, load_config
from fedloom.data.base import ArrayDataset, ClientData
from fedloom.engine.simulation import run_simulation
from fedloom.messages import DELTA, GLOBAL, FitResult
from fedloom.strategies import build_client_runtime, build_strategy

from .helpers import final_weights


def test_normalizer_plain_sgd_is_the_step_count() -> None:
    assert local_step_normalizer(7, 0.0) == 7.0
    assert local_step_normalizer(0, 0.9) == 0.0


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_normalizer_with_momentum_is_the_sum_of_step_coefficients(steps: int, rho: float) -> None:
    by_definition = sum((1 - rho**k) / (1 - rho) for k in range(1, steps + 1))
    assert local_step_normalizer(steps, rho) == pytest.approx(by_definition, rel=1e-12)


def test_normalizer_by_hand() -> None:
    # ρ = 0.5, τ = 3: 1 + 1.5 + 1.75.
    assert local_step_normalizer(3, 0.5) == pytest.approx(4.25)


def context(*, w: float, lr: float, momentum: float, steps: int) -> ClientContext:
    """f(x) = w·x with squared loss on the one example (x=2, y=1): gradient 8w − 4."""
    learner = Learner(nn.Linear(1, 1, bias=False), loss=F.mse_loss, metrics={})
    data = ArrayDataset(np.array([[2.0]], np.float32), np.array([[1.0]], np.float32))
    return ClientContext(
        client_id=0,
        round=1,
        config={},
        broadcast={GLOBAL: np.array([w], np.float32)},
        data=ClientData(0, "c0", data),
        learner=learner,
        state=ClientState(),
        seed=0,
        work=WorkSettings(batch_size=1),
        sgd=SGDSettings(lr=lr, momentum=momentum),
        plan=WorkPlan(epochs=1, max_steps=steps, straggler=False),
    )


@pytest.mark.parametrize(
    ("momentum", "w_end", "a"),
    [
        # plain: g=4 → w=0.6; g=0.8 → w=0.52; a = τ = 2.
        (0.0, 0.52, 2.0),
        # ρ=0.5: buf 4 → w=0.6; buf 2 + 0.8 = 2.8 → w=0.32; a = 1 + 1.5.
        (0.5, 0.32, 2.5),
    ],
)
def test_client_uploads_update_over_normalizer(momentum: float, w_end: float, a: float) -> None:
    ctx = context(w=1.0, lr=0.1, momentum=momentum, steps=2)
    update = FedNovaClient().fit(ctx)
    assert update.metrics[NORMALIZER] == pytest.approx(a)
    assert update.metrics["steps"] == 2.0
    np.testing.assert_allclose(update.vectors[DELTA], [(w_end - 1.0) / a], atol=1e-6)


def fit_result(client_id: int, n: int, a: float, d: list[float]) -> FitResult:
    return FitResult(
        client_id=client_id,
        round=1,
        model_version=0,
        num_examples=n,
        vectors={DELTA: np.array(d, np.float32)},
        metrics={NORMALIZER: a},
    )


def test_server_rescales_by_tau_eff() -> None:
    """n = (1, 3) so p = (1/4, 3/4); a = (2, 6): τ_eff = 0.5 + 4.5 = 5."""
    contributors = [fit_result(0, 1, 2.0, [1.0, 0.0]), fit_result(1, 3, 6.0, [0.0, 2.0])]
    update, fields = FedNovaServer().combine(
        rnd=1,
        aggregate=np.array([0.25, 1.5], np.float32),
        extras={},
        contributors=contributors,
    )
    assert fields["fednova_tau_eff"] == pytest.approx(5.0)
    np.testing.assert_allclose(update, [1.25, 7.5], atol=1e-6)


def test_strategy_applies_the_weighted_mean_of_normalized_updates() -> None:
    """Through the composed strategy (mean aggregator, server lr 1):
    x ← x + τ_eff Σ p_i d_i = [1, 1] + 5 · [0.25, 1.5]."""
    cfg = load_config(None, ["strategy=fednova"])
    spec = Learner(nn.Linear(1, 2, bias=False)).binding.spec
    strategy = build_strategy(cfg, num_clients=4, spec=spec, roles_in_process=True)
    outcomes = [fit_result(0, 1, 2.0, [1.0, 0.0]), fit_result(1, 3, 6.0, [0.0, 2.0])]

    def no_exchange(*args: Any) -> Any:
        raise AssertionError("no secure aggregation in this run")

    out = strategy.process_fit(1, outcomes, np.ones(2, np.float32), no_exchange)
    np.testing.assert_allclose(out.weights, [2.25, 8.5], atol=1e-6)
    assert out.fields["fednova_tau_eff"] == pytest.approx(5.0)


def test_proximal_term_is_refused() -> None:
    cfg = load_config(None, ["strategy=fednova", "client.proximal_mu=0.1"])
    learner = Learner(nn.Linear(1, 2, bias=False))
    with pytest.raises(ConfigError, match="proximal_mu"):
        build_client_runtime(cfg, learner, lambda cid: None, num_clients=2)  # type: ignore[arg-type,return-value]


SAME_WORK = [
    "rounds=3",
    "data.num_clients=6",
    "client.steps=4",
    "client.momentum=0",
    "client.lr=0.05",
]


def test_equal_local_work_reduces_to_fedavg(tmp_path: Path) -> None:
    """Every client takes the same τ plain steps: a_i = τ = τ_eff, so FedNova is FedAvg."""
    run_simulation(load_config(None, [*SAME_WORK, "strategy=fedavg"]), tmp_path / "avg")
    summary = run_simulation(load_config(None, [*SAME_WORK, "strategy=fednova"]), tmp_path / "nova")
    assert all(r["fednova_tau_eff"] == pytest.approx(4.0) for r in summary["history"])
    np.testing.assert_allclose(
        final_weights(tmp_path / "nova"), final_weights(tmp_path / "avg"), atol=1e-6
    )


def test_unequal_local_work_differs_from_fedavg(tmp_path: Path) -> None:
    """Stragglers keep their partial work: a_i differ, τ_eff < τ, and the models part."""
    work = [*SAME_WORK, "client.straggler_fraction=0.5", "server.drop_stragglers=false"]
    run_simulation(load_config(None, [*work, "strategy=fedavg"]), tmp_path / "avg")
    summary = run_simulation(load_config(None, [*work, "strategy=fednova"]), tmp_path / "nova")
    assert all(r["fednova_tau_eff"] < 4.0 for r in summary["history"])
    assert not np.allclose(final_weights(tmp_path / "nova"), final_weights(tmp_path / "avg"))
