"""Every strategy the stage seams were proven with runs on every runtime: the in-process
engine, the process pool and a gRPC deployment end with the same model, and the
personalized strategies report ``personalized_accuracy`` per round and in ``final``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.config import RunConfig, load_config
from fedloom.engine.deploy import ServerSecurity, run_server
from fedloom.engine.grpc.client import BuiltinApp, Credentials, run_client
from fedloom.engine.simulation import run_simulation
from tests.deploy_helpers import federate_in_threads
from tests.helpers import final_weights

STRATEGIES = ["scaffold", "fednova", "fedper", "fedrep", "ditto"]
PERSONALIZED = {"fedper", "fedrep", "ditto"}


def _config(strategy: str, *extra: str) -> RunConfig:
    return load_config(
        None,
        [
            f"strategy='{strategy}'",
            "rounds=2",
            "data.num_clients=3",
            "server.min_fit_clients=3",
            "client.epochs=1",
            "client.straggler_fraction=0.5",  # FedNova's case: unequal local work
            "eval.max_examples=100",
            *extra,
        ],
    )


def _check_summary(strategy: str, summary: dict[str, Any]) -> None:
    assert summary["rounds_completed"] == 2
    if strategy in PERSONALIZED:
        assert all(r["personalized_accuracy"] is not None for r in summary["history"])
        assert 0.0 <= summary["final"]["personalized_accuracy"] <= 1.0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pool_equals_in_process(tmp_path: Path, strategy: str) -> None:
    inprocess = run_simulation(_config(strategy), tmp_path / "inprocess")
    pool = run_simulation(
        _config(strategy, "engine.name='pool'", "engine.workers=2"), tmp_path / "pool"
    )
    _check_summary(strategy, inprocess)
    _check_summary(strategy, pool)
    np.testing.assert_allclose(
        final_weights(tmp_path / "pool"), final_weights(tmp_path / "inprocess"), atol=1e-6
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deployment_equals_simulation(tmp_path: Path, strategy: str) -> None:
    cfg = _config(strategy)
    simulated = run_simulation(cfg, tmp_path / "sim")

    def client(i: int) -> Callable[[str], int]:
        return lambda address: run_client(
            address,
            BuiltinApp,
            Credentials(insecure=True),
            partition=i,
            max_wait_s=120,
            state_dir=tmp_path / "state",
        )

    summary, _ = federate_in_threads(
        lambda on_listening: run_server(
            cfg, tmp_path / "deploy", "127.0.0.1:0", ServerSecurity(), on_listening=on_listening
        ),
        [client(i) for i in range(3)],
    )
    _check_summary(strategy, summary)
    np.testing.assert_allclose(
        final_weights(tmp_path / "deploy"), final_weights(tmp_path / "sim"), atol=1e-5
    )
    if strategy in PERSONALIZED:
        assert summary["final"]["personalized_accuracy"] == pytest.approx(
            simulated["final"]["personalized_accuracy"], abs=1e-6
        )
