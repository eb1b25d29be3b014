"""Attacks over the gRPC deployment: a client whose partition the seed made malicious is a
red-team process (sign-flipped, scaled updates); the server defends with its aggregator."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.attacks.poisoning import malicious_client_ids
from fedloom.config import RunConfig, load_config
from fedloom.engine.deploy import ServerSecurity, run_server
from fedloom.engine.grpc.client import BuiltinApp, Credentials, run_client
from fedloom.engine.simulation import run_simulation
from tests.deploy_helpers import federate_in_threads
from tests.helpers import final_weights

pytestmark = pytest.mark.slow  # each test runs gRPC federations of 5 clients


def _config(*extra: str) -> RunConfig:
    return load_config(
        None,
        [
            "data.partition='iid'",
            "data.num_clients=5",
            "server.min_fit_clients=5",
            "client.epochs=2",
            "attack.fraction=0.2",
            *extra,
        ],
    )


def _deploy(
    cfg: RunConfig, out: Path, state: Path, *, red_team: str | None = None
) -> dict[str, Any]:
    """A deployment of built-in partitions; with ``red_team``, partition 0 is a
    ``fedloom client --attack ...`` subprocess; the honest clients run in threads."""

    def client(i: int) -> Callable[[str], int]:
        if i == 0 and red_team is not None:
            # A separate `fedloom client` process, as a compromised site would run it.
            return lambda address: (
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "fedloom.cli",
                        "client",
                        "--server",
                        address,
                        "--partition",
                        "0",
                        "--insecure",
                        "--state-dir",
                        str(state),
                        "--attack",
                        red_team,
                        "--attack-set",
                        "factor=10.0",
                    ],
                    check=False,
                    timeout=600,
                ).returncode
            )
        return lambda address: run_client(
            address,
            BuiltinApp,
            Credentials(insecure=True),
            partition=i,
            max_wait_s=120,
            state_dir=state,
        )

    summary, results = federate_in_threads(
        lambda on_listening: run_server(
            cfg, out, "127.0.0.1:0", ServerSecurity(), on_listening=on_listening
        ),
        [client(i) for i in range(cfg.data.num_clients)],
    )
    assert all(isinstance(r, int) and r >= 0 for r in results)
    return summary


def test_a_colluding_attack_over_grpc_equals_the_simulation(tmp_path: Path) -> None:
    cfg = _config("rounds=2", "attack.kind='alie'", "attack.fraction=0.4")
    run_simulation(cfg, tmp_path / "sim")
    summary = _deploy(cfg, tmp_path / "deploy", tmp_path / "state")
    assert summary["attack"]["malicious_clients"] == malicious_client_ids(
        num_clients=5, fraction=0.4, seed=0
    )
    np.testing.assert_allclose(
        final_weights(tmp_path / "deploy"), final_weights(tmp_path / "sim"), atol=1e-5
    )


def test_red_team_client_breaks_the_mean_and_robust_aggregators_hold(tmp_path: Path) -> None:
    # The server's config has no [attack]: client 0 alone turns itself into the red team
    # (sign-flipped updates scaled by 10), and the server is not told.
    clean = run_simulation(_config("rounds=3"), tmp_path / "clean")["final"]["accuracy"]
    results = {}
    for agg in ("mean", "multi_krum", "centered_clipping"):
        # The deployment's guard rails alone reject a 10x norm outlier; they are off here so
        # that the aggregator is what faces the attack.
        cfg = _config("rounds=3", f"server.aggregator='{agg}'", "guards.norm_outliers='off'")
        summary = _deploy(cfg, tmp_path / agg, tmp_path / f"state-{agg}", red_team="sign_flip")
        assert "attack" not in summary
        results[agg] = summary["final"]["accuracy"]
    assert results["mean"] < clean - 0.3, (clean, results)
    assert results["multi_krum"] >= clean - 0.05, (clean, results)
    assert results["centered_clipping"] >= clean - 0.05, (clean, results)
