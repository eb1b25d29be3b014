"""The guard rails every run has (issue 9): a claimed example count is capped, a norm
outlier is rejected with its reason, and a global model that would not be finite is
never committed. Unit cases by hand, then the hostile client of the issue (a 3e38
update claiming 10^15 examples) in a simulation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.base import PlainServer
from fedloom.config import ConfigError, GuardsConfig, ServerConfig, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.exchange import ExchangeRequest
from fedloom.messages import ClientFailure, EvalResult, EvalTask, FitResult, FitTask
from fedloom.server.aggregators import AggregationInput, MeanAggregator
from fedloom.server.guards import (
    DISCARDED,
    EXAMPLES_CLIPPED,
    NORM_REJECTED,
    GuardRails,
    GuardSettings,
    guard_settings,
    low_median,
)
from fedloom.server.loop import FederatedServer
from fedloom.server.optimizers import make_server_optimizer
from fedloom.store import RunStore
from fedloom.strategies import check_composition

from . import hostile_stages  # noqa: F401  (registers "hostile-sgd")


def _fit(cid: int, delta: Sequence[float], n: int = 10, held: bool = False) -> FitResult:
    return FitResult(
        client_id=cid,
        round=1,
        model_version=0,
        num_examples=n,
        vectors={} if held else {"delta": np.asarray(delta, np.float32)},
        held=held,
    )


# ---------------------------------------------------------------- example counts


def test_low_median_of_two_is_the_smaller() -> None:
    assert low_median([100, 10**15]) == 100
    assert low_median([3, 1, 2]) == 2
    assert low_median([4, 1, 3, 2]) == 2


def test_a_claimed_count_above_ten_times_the_median_is_clipped_and_counted() -> None:
    rails = GuardRails(GuardSettings())
    out = rails.screen(1, [_fit(0, [1.0], 10**15), _fit(1, [1.0], 50), _fit(2, [1.0], 60)])
    # low median of (50, 60, 1e15) is 60: the cap is 600.
    assert [u.num_examples for u in out.updates] == [600, 50, 60]
    assert out.fields == {EXAMPLES_CLIPPED: 1, NORM_REJECTED: 0}


def test_max_examples_caps_every_claim_and_held_updates_are_left_alone() -> None:
    rails = GuardRails(GuardSettings(max_examples=40))
    out = rails.screen(1, [_fit(0, [1.0], 100), _fit(1, [1.0], 30), _fit(2, [], 10**9, True)])
    assert [u.num_examples for u in out.updates] == [40, 30, 10**9]
    assert out.fields[EXAMPLES_CLIPPED] == 1


def test_a_median_multiple_of_zero_turns_the_relative_cap_off() -> None:
    rails = GuardRails(GuardSettings(examples_median_multiple=0.0))
    out = rails.screen(1, [_fit(0, [1.0], 10**15), _fit(1, [1.0], 5)])
    assert out.updates[0].num_examples == 10**15 and out.fields[EXAMPLES_CLIPPED] == 0


def test_a_multiple_below_one_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="examples_median_multiple below 1"):
        load_config(None, ["guards.examples_median_multiple=0.5"])


# ------------------------------------------------------------------ norm outliers


def test_a_norm_outlier_is_rejected_with_its_reason() -> None:
    """Norms 1, 2, 3, 1000: median 2.5, MAD 1; limit max(2.5 + 10, 7.5) = 12.5."""
    rails = GuardRails(GuardSettings(norm_outliers=True))
    ups = [_fit(0, [1.0, 0.0]), _fit(1, [0.0, 2.0]), _fit(2, [3.0, 0.0]), _fit(3, [0, 1e3])]
    out = rails.screen(1, ups)
    assert [u.client_id for u in out.updates] == [0, 1, 2]
    assert [f.client_id for f in out.rejected] == [3]
    error = out.rejected[0].error
    assert "norm 1000" in error and "limit 12.5 = max(median + 10.0 MAD, 3 × median)" in error
    assert out.fields[NORM_REJECTED] == 1


def test_honest_spread_passes_and_the_floor_is_three_medians() -> None:
    """Norms 1, 1, 1, 2.9: MAD 0, so the floor 3 × median decides, and 2.9 passes."""
    rails = GuardRails(GuardSettings(norm_outliers=True))
    ups = [_fit(i, [v]) for i, v in enumerate([1.0, 1.0, 1.0, 2.9])]
    assert len(rails.screen(1, ups).updates) == 4
    ups[3] = _fit(3, [3.1])
    assert [f.client_id for f in rails.screen(1, ups).rejected] == [3]


def test_two_updates_are_not_screened_for_norm() -> None:
    """With two updates neither can be told from the other: both pass (the count cap and
    the finiteness check still hold)."""
    rails = GuardRails(GuardSettings(norm_outliers=True))
    out = rails.screen(1, [_fit(0, [1.0]), _fit(1, [3e38])])
    assert len(out.updates) == 2 and not out.rejected


def test_norm_screening_by_default_full_in_a_deployment_far_only_in_a_simulation() -> None:
    cfg = GuardsConfig()
    deployed = guard_settings(cfg, deployment=True, clipped=False)
    assert deployed.norm_outliers and deployed.norm_mad_k == 10 and deployed.norm_min_multiple == 3
    simulated = guard_settings(cfg, deployment=False, clipped=False)
    assert simulated.norm_outliers and simulated.norm_mad_k is None
    assert simulated.norm_min_multiple == 1000
    assert not guard_settings(cfg, deployment=True, clipped=True).norm_outliers
    assert not guard_settings(
        GuardsConfig(norm_outliers="off"), deployment=True, clipped=False
    ).norm_outliers
    on = guard_settings(GuardsConfig(norm_outliers="on"), deployment=False, clipped=False)
    assert on.norm_outliers and on.norm_mad_k == 10


def test_the_simulation_floor_passes_a_tenfold_attacker_and_rejects_an_overflow() -> None:
    rails = GuardRails(guard_settings(GuardsConfig(), deployment=False, clipped=False))
    ups = [_fit(i, [1.0]) for i in range(4)] + [_fit(4, [-10.0]), _fit(5, [3e38])]
    out = rails.screen(1, ups)
    assert [u.client_id for u in out.updates] == [0, 1, 2, 3, 4]
    assert [f.client_id for f in out.rejected] == [5]


def test_norm_screening_on_with_central_dp_is_refused() -> None:
    cfg = load_config(
        None, ["strategy=dp-fedavg", "privacy.noise_multiplier=1.0", "guards.norm_outliers=on"]
    )
    with pytest.raises(ConfigError, match=r"guards\.norm_outliers"):
        check_composition(cfg)


# -------------------------------------------------------------- finiteness


class _Scripted:
    """A ClientExecutor whose clients answer with fixed deltas."""

    def __init__(self, deltas: Mapping[int, Sequence[float]]) -> None:
        self.deltas = deltas

    def fit(self, tasks: Sequence[FitTask], broadcast: Any) -> list[FitResult | ClientFailure]:
        return [
            FitResult(
                client_id=t.client_id,
                round=t.round,
                model_version=t.model_version,
                num_examples=10,
                vectors={"delta": np.asarray(self.deltas[t.client_id], np.float32)},
            )
            for t in tasks
        ]

    def evaluate(self, tasks: Sequence[EvalTask], broadcast: Any) -> list[EvalResult]:
        return []

    def exchange(self, request: ExchangeRequest, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        raise AssertionError("no protocol here")

    def available_clients(self) -> None:
        return None

    def connected_clients(self) -> None:
        return None

    def round_metrics(self) -> dict[str, Any]:
        return {}

    def save_client_state(self) -> dict[str, Any]:
        return {}

    def load_client_state(self, manifest: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class _InfAggregator(MeanAggregator):
    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        out, fields = super().aggregate(inp)
        out[0] = np.inf
        return out, fields


def _server(
    deltas: Mapping[int, Sequence[float]], *, aggregator: Any, optimizer: str, lr: float
) -> FederatedServer:
    from fedloom.server.strategy import Strategy

    cfg = ServerConfig(fraction_fit=1.0, min_fit_clients=1, optimizer=optimizer, lr=lr)
    strategy = Strategy(
        algorithm=PlainServer(),
        aggregator=aggregator,
        optimizer=make_server_optimizer(cfg, 2),
        sampling=cfg,
        dimension=2,
    )
    return FederatedServer(
        strategy=strategy,
        executor=_Scripted(deltas),
        initial_weights=np.ones(2, np.float32),
        num_clients=len(deltas),
        rounds=1,
        seed=0,
    )


def test_a_non_finite_aggregate_is_discarded_with_its_cause() -> None:
    server = _server(
        {0: [1.0, 1.0], 1: [1.0, 1.0]}, aggregator=_InfAggregator(), optimizer="sgd", lr=1
    )
    record = server.run_round(1)
    assert record["aggregated"] is False
    assert record[DISCARDED] == "the aggregate has 1 non-finite entries of 2"
    np.testing.assert_array_equal(server.state.weights, np.ones(2, np.float32))
    assert server.state.participation.tolist() == [0, 0]


def test_a_step_that_overflows_float32_is_discarded_and_leaves_the_optimizer_as_it_was() -> None:
    """3e38 is finite in float32, but momentum's lr 2 step overflows: the round is
    discarded and the momentum buffer keeps its value from before the step."""
    server = _server(
        {0: [3e38, 0.0], 1: [3e38, 0.0]}, aggregator=MeanAggregator(), optimizer="momentum", lr=2
    )
    velocity = server.strategy.optimizer.state()["velocity"].copy()
    record = server.run_round(1)
    assert record["aggregated"] is False and "the next global model" in record[DISCARDED]
    np.testing.assert_array_equal(server.strategy.optimizer.state()["velocity"], velocity)
    assert np.all(np.isfinite(server.state.weights))


# ------------------------------------------------------- the hostile client, simulated

SIM = [
    "data.num_clients=5",
    "server.min_fit_clients=5",
    "rounds=3",
    "client.epochs=1",
    "eval.every=3",
]


def _final(run: Path) -> np.ndarray:
    with RunStore.open(run) as store:
        ckpt = store.latest_checkpoint()
        assert ckpt is not None
        return ckpt.tensors["global"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, dict[str, Any]]:
    run = tmp_path_factory.mktemp("clean") / "run"
    summary = run_simulation(load_config(None, SIM), run)
    return _final(run), summary


def test_hostile_count_alone_is_clipped_by_default_in_simulation(
    tmp_path: Path, clean: tuple[np.ndarray, dict[str, Any]]
) -> None:
    """An honest update that claims 10^15 examples: clipped to 10 × the median claim
    every round, so it weighs at most 10/14 instead of all but 1e-13."""
    cfg = load_config(
        None, [*SIM, "client.algorithm=hostile-sgd", "client.options={mode = 'count'}"]
    )
    summary = run_simulation(cfg, tmp_path / "run")
    assert [r[EXAMPLES_CLIPPED] for r in summary["history"]] == [1, 1, 1]
    assert all(r["aggregated"] for r in summary["history"])
    assert np.all(np.isfinite(_final(tmp_path / "run")))


@pytest.mark.parametrize("norm", ["auto", "on"])
def test_hostile_update_and_count_leave_the_model_finite_and_near_the_clean_one(
    tmp_path: Path, clean: tuple[np.ndarray, dict[str, Any]], norm: str
) -> None:
    """The issue's attack from client 0, with the default guards and with the full norm
    rule: rejected every round with its reason, and the model ends within 15% (relative
    L2) of the clean run's and within 5 points of its accuracy."""
    clean_w, clean_summary = clean
    cfg = load_config(None, [*SIM, "client.algorithm=hostile-sgd", f"guards.norm_outliers={norm}"])
    summary = run_simulation(cfg, tmp_path / "run")
    w = _final(tmp_path / "run")
    assert np.all(np.isfinite(w))
    history = summary["history"]
    assert [r[NORM_REJECTED] for r in history] == [1, 1, 1]
    assert all(r["clients_succeeded"] == 4 and r["aggregated"] for r in history)
    with RunStore.open(tmp_path / "run") as store:
        errors = {f["client_id"]: f["error"] for f in store.failures()}
    assert set(errors) == {0} and "rejected by the guard rails" in errors[0]
    distance = float(np.linalg.norm(w - clean_w) / np.linalg.norm(clean_w))
    assert distance < 0.15, distance
    assert summary["final"]["accuracy"] > clean_summary["final"]["accuracy"] - 0.05
