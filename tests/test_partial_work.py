"""Stragglers doing partial work under a deadline (``system.partial_work``): the step
budget, the client honouring it, FedNova's normalisation of partial steps, and the
records (hand-computed cases)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedloom.client_store import ClientState
from fedloom.config import ConfigError, load_config
from fedloom.data import build_federated_dataset
from fedloom.engine.simulation import run_simulation
from fedloom.messages import DELTA, GLOBAL, STEP_BUDGET, FitResult, FitTask
from fedloom.params import ParamEntry, ParamSpec
from fedloom.strategies import build_client_runtime, build_learner, build_strategy
from fedloom.system.clock import step_budget
from fedloom.system.profiles import DeviceProfiles

from .deploy_helpers import set_args


def _profiles(s_per_example: list[float], mbps: float) -> DeviceProfiles:
    n = len(s_per_example)
    return DeviceProfiles(
        s_per_example=np.array(s_per_example),
        uplink_bps=np.full(n, mbps * 1e6 / 8),
        downlink_bps=np.full(n, mbps * 1e6 / 8),
        dropout=np.zeros(n),
        phase=np.zeros(n),
        availability=1.0,
        period_s=100.0,
    )


def test_step_budget_is_the_floor_of_the_time_left_over_the_step_time() -> None:
    # 8 Mbit/s = 1e6 B/s: 1e6 B down and 1e6 B up take 2 s; a step of 4 examples at
    # 0.1 s takes 0.4 s: (10 − 2) / 0.4 = 20 steps, (9.9 − 2) / 0.4 = 19.75 → 19.
    p = _profiles([0.1], 8.0)
    common = {"down_bytes": 1e6, "up_bytes": 1e6, "batch_size": 4}
    assert step_budget(p, 0, deadline_s=10.0, **common) == 20
    assert step_budget(p, 0, deadline_s=9.9, **common) == 19
    assert step_budget(p, 0, deadline_s=2.3, **common) == 0  # not even one step fits
    assert step_budget(p, 0, deadline_s=1.0, **common) == 0


DIGITS = ["data.num_clients=3", "model.name=logreg", "client.batch_size=16", "seed=3"]


@pytest.mark.parametrize("budget", [3, 500])
def test_a_client_given_a_budget_of_k_steps_does_exactly_k(budget: int) -> None:
    # Full work: 2 epochs of the client's batches; the budget cuts it short, or not.
    cfg = load_config(None, [*DIGITS, "client.epochs=2", "strategy=fednova", "client.momentum=0"])
    data = build_federated_dataset(cfg.data, cfg.seed)
    runtime = build_client_runtime(
        cfg, build_learner(cfg, data), lambda c: data.clients[c], num_clients=3
    )
    full = 2 * -(-len(data.clients[0].train) // 16)
    assert 3 < full < 500
    task = FitTask(client_id=0, round=1, model_version=0, config={STEP_BUDGET: budget})
    res = runtime.fit(task, {GLOBAL: runtime.initial_vector()}, ClientState())
    assert res.metrics["steps"] == min(budget, full)
    assert res.metrics["fednova_a"] == res.metrics["steps"]  # plain SGD: a_i = τ_i
    assert res.straggler is (budget < full) and res.vectors


def _trace(tmp_path: Path) -> Path:
    # Client 1 computes 10× slower than 0 and 2; links at 8 Mbit/s (1e6 B/s).
    trace = tmp_path / "devices.csv"
    trace.write_text("s_per_example,uplink_mbps,downlink_mbps\n0.001,8,8\n0.01,8,8\n0.001,8,8\n")
    return trace


def test_fednova_normalises_partial_steps_against_a_hand_computed_aggregate(
    tmp_path: Path,
) -> None:
    cfg = load_config(
        None,
        [
            *DIGITS,
            "strategy=fednova",
            "client.steps=10",
            "system.enabled=true",
            f"system.trace={_trace(tmp_path)}",
            "system.deadline_s=1.0",
            "system.partial_work=true",
        ],
    )
    spec = ParamSpec((ParamEntry("w", (2,)),))
    strategy = build_strategy(cfg, num_clients=3, spec=spec, roles_in_process=True)
    w = np.array([1.0, -1.0], dtype=np.float32)
    config, broadcast = strategy.configure_fit(1, w)
    # 8 B down and up at 1e6 B/s; a step of 16 examples takes 0.016 s (clients 0, 2) or
    # 0.16 s (client 1): budgets floor((1 − 16e-6) / step) = 62 and 6.
    budgets = [strategy.client_config(1, c, config, broadcast).get(STEP_BUDGET) for c in range(3)]
    assert budgets == [62, 6, 62]
    # The clients as the runtime would answer: τ = 10, 6 (partial: a straggler), 10;
    # FedNova uploads d_i = Δ_i / a_i with a_i = τ_i (no momentum).
    deltas = {0: [10.0, 20.0], 1: [3.0, -6.0], 2: [0.0, 10.0]}
    steps, n = {0: 10, 1: 6, 2: 10}, {0: 10, 1: 30, 2: 60}
    results = [
        FitResult(
            client_id=c,
            round=1,
            model_version=0,
            num_examples=n[c],
            vectors={DELTA: (np.array(deltas[c]) / steps[c]).astype(np.float32)},
            metrics={"steps": float(steps[c]), "fednova_a": float(steps[c])},
            straggler=c == 1,
        )
        for c in range(3)
    ]
    strategy.sample(1, np.arange(3), cfg.seed)
    out = strategy.process_fit(1, results, w, exchange=None)  # type: ignore[arg-type]
    # p = (0.1, 0.3, 0.6); d = ([1, 2], [0.5, −1], [0, 1]); Σ p d = [0.25, 0.5];
    # τ_eff = 0.1·10 + 0.3·6 + 0.6·10 = 8.8; the server step (lr 1) adds τ_eff Σ p d.
    assert out.aggregated and len(out.updates) == 3
    assert out.fields["fednova_tau_eff"] == pytest.approx(8.8)
    np.testing.assert_allclose(out.weights, w + 8.8 * np.array([0.25, 0.5]), rtol=1e-6)
    # The partial client arrived before the deadline: 8e-6 + 6 × 0.16 + 8e-6 s.
    assert out.fields["sim_partial"] == 1 and out.fields["sim_late"] == 0
    assert out.fields["sim_round_s"] == pytest.approx(0.96 + 16e-6)


def test_partial_work_run_records_it_and_matches_the_estimate(tmp_path: Path) -> None:
    from fedloom.cli import main

    overrides = [
        *DIGITS,
        "rounds=2",
        "eval.every=2",
        "strategy=fednova",
        "client.momentum=0",  # a_i = τ_i
        "client.steps=10",
        "system.enabled=true",
        f"system.trace={_trace(tmp_path)}",
        "system.deadline_s=1.0",
    ]
    without = run_simulation(load_config(None, overrides), tmp_path / "whole")["history"]
    assert [r["sim_late"] for r in without] == [1, 1]  # client 1 needs 1.6 s of compute
    partial = [*overrides, "system.partial_work=true"]
    history = run_simulation(load_config(None, partial), tmp_path / "partial")["history"]
    assert [(r["sim_partial"], r["sim_late"], r["clients_succeeded"]) for r in history] == [
        (1, 0, 3),
        (1, 0, 3),
    ]
    sizes = build_federated_dataset(load_config(None, partial).data, seed=3).client_sizes()
    p = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    assert history[0]["fednova_tau_eff"] == pytest.approx(float(p @ [10, 6, 10]))
    out = tmp_path / "estimate.json"
    args = ["estimate", *set_args(partial), "--trajectories", "2", "--no-what-if"]
    assert main([*args, "--json", str(out)]) == 0
    estimate = json.loads(out.read_text())["estimates"][0]
    assert estimate["total_s_this_seed"] == pytest.approx(history[-1]["sim_time_s"], rel=1e-9)


def test_partial_work_is_refused_where_it_cannot_hold() -> None:
    with pytest.raises(ConfigError, match=r"set system\.deadline_s"):
        load_config(None, ["system.enabled=true", "system.partial_work=true"])
    from fedloom.strategies import check_composition

    dropping = load_config(
        None,
        [
            "strategy=fedavg",
            "system.enabled=true",
            "system.deadline_s=5",
            "system.partial_work=true",
        ],
    )
    with pytest.raises(ConfigError, match=r"server\.drop_stragglers = true discards"):
        check_composition(dropping)
