"""Honest DP accounting under partial availability (issue 9, hole 8).

A deployment samples among the *connected* clients. With 100 clients configured, 10
connected and fixed-size sampling of 10, every connected client takes part in every
round: the round is ``SampledWithoutReplacementDpEvent(10, 10)``, q = 1, not the
configured q = 10/100. The ledger must say so (or the round must not be released).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from fedloom.config import load_config
from fedloom.exchange import ExchangeRequest
from fedloom.messages import ClientFailure, EvalResult, EvalTask, FitResult, FitTask
from fedloom.params import ParamEntry, ParamSpec
from fedloom.privacy.accounting import ClientSampling, compute_epsilon
from fedloom.server.guards import DISCARDED
from fedloom.server.loop import FederatedServer
from fedloom.strategies import build_strategy

D = 4
Z = 1.0
DELTA = 1e-5
ROUNDS = 5


class _Connected:
    """A ClientExecutor with only ``connected`` of the configured clients reachable."""

    def __init__(self, connected: Sequence[int]) -> None:
        self.connected = list(connected)
        self.sampled: list[list[int]] = []

    def fit(self, tasks: Sequence[FitTask], broadcast: Any) -> list[FitResult | ClientFailure]:
        self.sampled.append([t.client_id for t in tasks])
        return [
            FitResult(
                client_id=t.client_id,
                round=t.round,
                model_version=t.model_version,
                num_examples=10,
                vectors={"delta": np.full(D, 0.1, np.float32)},
                metrics={"below_clip": 1.0},
            )
            for t in tasks
        ]

    def evaluate(self, tasks: Sequence[EvalTask], broadcast: Any) -> list[EvalResult]:
        return []

    def exchange(self, request: ExchangeRequest, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        raise AssertionError("no protocol here")

    def available_clients(self) -> list[int]:
        return self.connected

    def connected_clients(self) -> list[int]:
        return self.connected

    def round_metrics(self) -> dict[str, Any]:
        return {}

    def save_client_state(self) -> dict[str, Any]:
        return {}

    def load_client_state(self, manifest: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


def _server(connected: Sequence[int], extra: Sequence[str] = ()) -> tuple[FederatedServer, Any]:
    cfg = load_config(
        None,
        [
            "strategy=dp-fedavg",
            "server.sampling=fixed",
            "data.num_clients=100",
            "server.fraction_fit=0.1",
            "server.min_fit_clients=10",
            f"privacy.noise_multiplier={Z}",
            f"privacy.delta={DELTA}",
            f"rounds={ROUNDS}",
            *extra,
        ],
    )
    spec = ParamSpec((ParamEntry("w", (D,)),))
    strategy = build_strategy(cfg, num_clients=100, spec=spec, roles_in_process=True)
    server = FederatedServer(
        strategy=strategy,
        executor=_Connected(connected),
        initial_weights=np.zeros(D, np.float32),
        num_clients=100,
        rounds=ROUNDS,
        seed=0,
        callbacks=strategy.callbacks,
    )
    dp = strategy.aggregator.dp
    return server, dp


def test_ten_of_a_hundred_connected_is_accounted_at_q_one() -> None:
    server, dp = _server(range(10))
    server.run()
    executor = server.executor
    assert isinstance(executor, _Connected)
    assert all(s == list(range(10)) for s in executor.sampled)  # everyone, every round
    happened = compute_epsilon("rdp", ClientSampling("fixed", 10, 10), Z, ROUNDS, DELTA)
    configured = compute_epsilon("rdp", ClientSampling("fixed", 100, 10), Z, ROUNDS, DELTA)
    ledger = dp.ledger()
    assert ledger["epsilon"] >= happened - 1e-9
    assert ledger["epsilon"] == pytest.approx(happened, rel=1e-9)
    assert happened > 2 * configured  # 30.1 vs 13.8: the understatement was not subtle
    assert ledger["rounds_at_other_sampling"] == [
        {**ClientSampling("fixed", 10, 10).describe(), "rounds": ROUNDS}
    ]
    assert [r["sampling_rate"] for r in server.state.history] == [1.0] * ROUNDS


def test_every_client_connected_is_accounted_as_configured() -> None:
    server, dp = _server(range(100))
    server.run()
    configured = compute_epsilon("rdp", ClientSampling("fixed", 100, 10), Z, ROUNDS, DELTA)
    assert dp.ledger()["epsilon"] == pytest.approx(configured, rel=1e-9)
    assert "rounds_at_other_sampling" not in dp.ledger()
    assert all("sampling_rate" not in r for r in server.state.history)


def test_a_round_the_budget_cannot_afford_at_the_real_rate_is_not_released() -> None:
    """max_epsilon fits a round at q = 0.1 but not one at q = 1: the first round is
    refused (not released, the model unchanged), and the run stops before the next."""
    configured = compute_epsilon("rdp", ClientSampling("fixed", 100, 10), Z, 1, DELTA)
    one_at_q1 = compute_epsilon("rdp", ClientSampling("fixed", 10, 10), Z, 1, DELTA)
    assert configured < one_at_q1
    limit = (configured + one_at_q1) / 2
    server, dp = _server(range(10), [f"privacy.max_epsilon={limit}"])
    server.run()
    history = server.state.history
    assert len(history) == 1 and history[0]["aggregated"] is False
    assert "privacy budget" in history[0][DISCARDED] and "q = 1" in history[0][DISCARDED]
    assert dp.accountant.rounds == 0 and dp.ledger()["epsilon"] == 0.0
    np.testing.assert_array_equal(server.state.weights, np.zeros(D, np.float32))
    assert server.stopped_reason is not None and "privacy budget reached" in server.stopped_reason


def test_the_real_sampling_survives_a_checkpoint() -> None:
    server, dp = _server(range(10))
    server.run()
    meta = dp.checkpoint_meta()
    _, dp2 = _server(range(10))
    dp2.restore(meta)
    assert dp2.ledger()["epsilon"] == pytest.approx(dp.ledger()["epsilon"], rel=1e-12)
