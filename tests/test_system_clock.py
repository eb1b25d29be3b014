"""The virtual clock, device profiles and ``fedloom estimate`` (hand-computed cases)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedloom.config import ConfigError, SystemConfig, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.messages import ClientFailure, FitResult
from fedloom.store import RunStore
from fedloom.system.clock import DROPOUT_ERROR, VirtualClock, client_time, round_end
from fedloom.system.profiles import DeviceProfiles, draw_profiles, drops_out

from .helpers import interrupt_after

SMALL = ["rounds=4", "client.epochs=1", "client.steps=3", "eval.every=4"]


def _profiles(
    s_per_example: list[float], up_mbps: list[float], down_mbps: list[float]
) -> DeviceProfiles:
    n = len(s_per_example)
    return DeviceProfiles(
        s_per_example=np.array(s_per_example),
        uplink_bps=np.array(up_mbps) * 1e6 / 8,
        downlink_bps=np.array(down_mbps) * 1e6 / 8,
        dropout=np.zeros(n),
        phase=np.zeros(n),
        availability=1.0,
        period_s=100.0,
    )


def _result(client_id: int, steps: int, nbytes: int) -> FitResult:
    return FitResult(
        client_id=client_id,
        round=1,
        model_version=0,
        vectors={"delta": np.zeros(nbytes // 4, dtype=np.float32)},
        num_examples=10,
        metrics={"steps": float(steps)},
    )


def test_client_time_is_download_plus_compute_plus_upload() -> None:
    # 8 Mbit/s down = 1e6 B/s: 1e6 B take 1 s; 100 examples at 10 ms take 1 s;
    # 4 Mbit/s up = 5e5 B/s: 5e5 B take 1 s.
    p = _profiles([0.01], [4.0], [8.0])
    t = client_time(p, 0, down_bytes=1e6, examples=100, up_bytes=5e5)
    assert (t.download, t.compute, t.upload, t.total) == pytest.approx((1.0, 1.0, 1.0, 3.0))


def test_round_end_is_the_wanted_arrival_capped_by_the_deadline() -> None:
    assert round_end([3.0, 1.0, 2.0], wanted=3, deadline_s=None) == 3.0
    assert round_end([3.0, 1.0, 2.0], wanted=2, deadline_s=None) == 2.0
    assert round_end([3.0, 1.0, 2.0], wanted=3, deadline_s=1.5) == 1.5
    assert round_end([], wanted=2, deadline_s=4.0) == 4.0
    assert round_end([], wanted=2, deadline_s=None) == 0.0


def _clock(p: DeviceProfiles, **kw: float | None) -> VirtualClock:
    return VirtualClock(
        p,
        seed=0,
        batch_size=10,
        epochs=1,
        steps=None,
        held_upload_bytes=0,
        **kw,  # type: ignore[arg-type]
    )


def test_over_selection_keeps_the_k_fastest_and_counts_the_rest_late() -> None:
    # Five clients with compute 1..5 s (10 steps x 10 examples x s/example), fast links.
    p = _profiles([0.01 * s for s in (5, 1, 4, 2, 3)], [1e6] * 5, [1e6] * 5)
    clock = _clock(p, over_selection=0.7)
    assert clock.cohort_size(3) == math.ceil(3 * 1.7)
    out = clock.arrive(1, [_result(c, 10, 40) for c in range(5)], down_bytes=40, wanted=3)
    assert sorted(r.client_id for r in out.outcomes) == [1, 3, 4]  # compute 1, 2 and 3 s
    assert out.late == 2
    assert out.fields["sim_round_s"] == pytest.approx(3.0, rel=1e-6)
    again = clock.arrive(2, [_result(c, 10, 40) for c in range(5)], down_bytes=40, wanted=3)
    assert again.fields["sim_time_s"] == pytest.approx(6.0, rel=1e-6)


def test_deadline_drops_late_results_and_ends_the_round_at_the_deadline() -> None:
    p = _profiles([0.01, 0.03], [1e6, 1e6], [1e6, 1e6])  # 1 s and 3 s of compute
    out = _clock(p, deadline_s=2.0).arrive(
        1, [_result(0, 10, 40), _result(1, 10, 40)], down_bytes=40, wanted=2
    )
    assert [r.client_id for r in out.outcomes] == [0]
    assert out.late == 1 and out.fields["sim_round_s"] == 2.0


def test_failures_pass_through_and_dropouts_are_seeded() -> None:
    p = _profiles([0.01] * 50, [8.0] * 50, [8.0] * 50)
    p = DeviceProfiles(**{**p.__dict__, "dropout": np.full(50, 0.5)})
    draws = [drops_out(p, seed=0, round=2, client_id=c) for c in range(50)]
    assert draws == [drops_out(p, seed=0, round=2, client_id=c) for c in range(50)]
    assert 10 < sum(draws) < 40
    failure = ClientFailure(client_id=0, round=2, error="boom")
    results = [failure, *(_result(c, 1, 40) for c in range(1, 50))]
    out = _clock(p).arrive(2, results, down_bytes=40, wanted=50)
    errors = [o.error for o in out.outcomes if isinstance(o, ClientFailure)]
    assert errors[0] == "boom"
    assert errors[1:] == [DROPOUT_ERROR] * sum(draws[1:])
    assert out.fields["sim_dropouts"] == sum(draws[1:])


def test_profiles_are_lognormal_around_the_median_and_deterministic() -> None:
    cfg = SystemConfig(enabled=True, s_per_example=0.002, compute_sigma=1.0)
    a = draw_profiles(cfg, num_clients=4000, seed=1)
    b = draw_profiles(cfg, num_clients=4000, seed=1)
    np.testing.assert_array_equal(a.s_per_example, b.s_per_example)
    assert np.median(a.s_per_example) == pytest.approx(0.002, rel=0.1)
    assert np.std(np.log(a.s_per_example)) == pytest.approx(1.0, rel=0.1)
    assert np.all(a.uplink_bps == 10.0 * 1e6 / 8)  # bandwidth_sigma 0: every link equal


def test_trace_csv_is_cycled_and_checked(tmp_path: Path) -> None:
    trace = tmp_path / "devices.csv"
    trace.write_text("s_per_example,uplink_mbps,downlink_mbps,dropout\n0.1,1,2,0.5\n0.2,3,4,\n")
    p = draw_profiles(SystemConfig(trace=str(trace), dropout=0.1), num_clients=3, seed=0)
    np.testing.assert_allclose(p.s_per_example, [0.1, 0.2, 0.1])
    np.testing.assert_allclose(p.uplink_bps, np.array([1, 3, 1]) * 1e6 / 8)
    np.testing.assert_allclose(p.dropout, [0.5, 0.1, 0.5])
    trace.write_text("s_per_example,uplink_mbps\n0.1,1\n")
    with pytest.raises(ConfigError, match="no column 'downlink_mbps'"):
        draw_profiles(SystemConfig(trace=str(trace)), num_clients=3, seed=0)


def test_availability_windows_follow_the_clock() -> None:
    p = _profiles([0.01] * 2, [1.0] * 2, [1.0] * 2)
    p = DeviceProfiles(**{**p.__dict__, "availability": 0.5, "phase": np.array([0.0, 0.5])})
    ids = np.array([0, 1])
    np.testing.assert_array_equal(p.available(ids, 10.0), [True, False])
    np.testing.assert_array_equal(p.available(ids, 60.0), [False, True])


def test_simulated_time_is_recorded_and_survives_resume(tmp_path: Path) -> None:
    overrides = [
        *SMALL,
        "system.enabled=true",
        "system.compute_sigma=1.0",
        "system.dropout=0.2",
        "system.over_selection=0.3",
        "server.fraction_fit=0.5",
        "target_accuracy=0.05",
    ]
    whole = run_simulation(load_config(None, overrides), tmp_path / "whole")
    history = whole["history"]
    assert all(r["clients_sampled"] == 13 for r in history)  # ceil(10 x 1.3)
    assert all(r["clients_succeeded"] <= 10 for r in history)
    assert [r["sim_time_s"] for r in history] == pytest.approx(
        np.cumsum([r["sim_round_s"] for r in history]).tolist()
    )
    assert whole["metrics"]["sim_time_to_target_s"] == history[3]["sim_time_s"]

    interrupt_after(load_config(None, overrides), tmp_path / "cut", 2)
    resumed = run_simulation(load_config(None), tmp_path / "cut", resume=True)
    assert [r["sim_time_s"] for r in resumed["history"]] == [r["sim_time_s"] for r in history]


def test_over_selection_is_refused_with_central_dp() -> None:
    from fedloom.strategies import check_composition

    cfg = load_config(
        None,
        [
            "strategy=dp-fedavg",
            "privacy.noise_multiplier=1.0",
            "system.enabled=true",
            "system.over_selection=0.3",
        ],
    )
    with pytest.raises(ConfigError, match="central DP's accountant"):
        check_composition(cfg)


def test_estimate_is_within_10_percent_of_the_virtual_clock_run(tmp_path: Path) -> None:
    from fedloom.cli import main

    overrides = [
        "rounds=12",
        "client.epochs=1",
        "client.steps=2",
        "eval.every=12",
        "server.fraction_fit=0.5",
        "system.enabled=true",
        "system.compute_sigma=1.0",
        "system.bandwidth_sigma=0.5",
        "system.s_per_example=0.01",
    ]
    run = run_simulation(load_config(None, overrides), tmp_path / "run")
    simulated = run["history"][-1]["sim_time_s"]
    out = tmp_path / "estimate.json"
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["estimate", *sets, "--trajectories", "100", "--json", str(out)]) == 0
    estimate = json.loads(out.read_text())["estimates"][0]
    # The replay of the run's own seeded draws is the run's clock; other draws spread
    # around it.
    assert estimate["total_s_this_seed"] == pytest.approx(simulated, rel=1e-9)
    assert estimate["total_s_mean"] == pytest.approx(simulated, rel=0.10)
    assert estimate["total_s_p10"] <= estimate["total_s_mean"] <= estimate["total_s_p90"]
    with RunStore.open(tmp_path / "run") as store:
        assert store.history()[-1]["sim_time_s"] == simulated
