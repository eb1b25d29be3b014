"""Asynchronous rounds (FedBuff, FedAsync) on the virtual clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedloom.config import ConfigError, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.server.async_loop import AsyncSettings, adjusted_delta, staleness_weight
from fedloom.strategies import check_composition

from .helpers import final_weights, interrupt_after

ASYNC = [
    "mode=async",
    "rounds=6",
    "client.epochs=1",
    "client.steps=10",
    "eval.every=3",
    "async.buffer_size=3",
    "async.concurrency=6",
    "system.compute_sigma=1.0",
]


def test_staleness_weight_is_polynomial() -> None:
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == 0.5  # (1 + 3)^-0.5
    assert staleness_weight(1, 1.0) == 0.5
    assert staleness_weight(7, 0.0) == 1.0


def test_fedbuff_discounts_and_fedasync_mixes_by_hand() -> None:
    delta = np.array([1.0, -2.0], dtype=np.float32)
    start = np.array([0.0, 0.0], dtype=np.float32)
    current = np.array([1.0, 1.0], dtype=np.float32)
    buff = AsyncSettings(algorithm="fedbuff", buffer_size=2, concurrency=4)
    np.testing.assert_allclose(
        adjusted_delta(delta, settings=buff, staleness=3, start=start, current=current),
        [0.5, -1.0],
    )
    fedasync = AsyncSettings(algorithm="fedasync", buffer_size=1, concurrency=4, mixing=0.5)
    # alpha_t = 0.5 * (1 + 3)^-0.5 = 0.25; x_new = start + delta = (1, -2);
    # x + alpha_t (x_new - x) = (1, 1) + 0.25 * ((1, -2) - (1, 1)) = (1, 0.25).
    step = adjusted_delta(delta, settings=fedasync, staleness=3, start=start, current=current)
    np.testing.assert_allclose(current + step, [1.0, 0.25])


def test_fedbuff_applies_buffers_without_a_barrier_and_records_staleness(tmp_path: Path) -> None:
    summary = run_simulation(load_config(None, ASYNC), tmp_path / "run")
    history = summary["history"]
    assert [r["clients_succeeded"] for r in history] == [3] * 6  # one step per 3 arrivals
    assert all(r["in_flight"] == 6 for r in history)  # concurrency kept
    assert max(r["staleness_max"] for r in history) >= 1  # later steps use stale updates
    times = [r["sim_time_s"] for r in history]
    assert times == sorted(times) and times[0] > 0
    assert history[-1]["accuracy"] > max(0.3, history[2]["accuracy"])  # learning as it goes


def test_async_resume_equals_uninterrupted(tmp_path: Path) -> None:
    whole = run_simulation(load_config(None, ASYNC), tmp_path / "whole")
    interrupt_after(load_config(None, ASYNC), tmp_path / "cut", 4)
    resumed = run_simulation(load_config(None), tmp_path / "cut", resume=True)
    np.testing.assert_array_equal(
        final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole")
    )
    assert [r["sim_time_s"] for r in resumed["history"]] == [
        r["sim_time_s"] for r in whole["history"]
    ]


def test_fedasync_runs_one_update_per_step(tmp_path: Path) -> None:
    cfg = load_config(None, [*ASYNC, "async.algorithm=fedasync", "rounds=4"])
    history = run_simulation(cfg, tmp_path / "run")["history"]
    assert [r["clients_succeeded"] for r in history] == [1] * 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=dp-fedavg", "privacy.noise_multiplier=1.0"], "central DP"),
        (["strategy=scaffold"], "FedAvg-style clients"),
        (["system.deadline_s=3"], "shape synchronous rounds"),
        (["async.buffer_size=30", "async.concurrency=40"], "exceeds the clients"),
    ],
)
def test_async_refusals(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_composition(load_config(None, ["mode=async", *overrides]))


def test_async_pool_engine_equals_inprocess(tmp_path: Path) -> None:
    run_simulation(load_config(None, [*ASYNC, "rounds=3"]), tmp_path / "inproc")
    pool = [*ASYNC, "rounds=3", "engine.name=pool", "engine.workers=2"]
    run_simulation(load_config(None, pool), tmp_path / "pool")
    np.testing.assert_allclose(
        final_weights(tmp_path / "pool"), final_weights(tmp_path / "inproc"), atol=1e-5
    )
