"""Centered clipping with momentum and bucketing (Karimireddy, He & Jaggi 2021, 2022) and
norm bounding (Sun et al. 2019): steps worked out by hand, bounds under arbitrary
attackers, the centre through state()/load_state(), options, and digits runs."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedloom.server.robust_clipping  # noqa: F401  (registers the aggregators)
from fedloom.algorithms.base import StageContext
from fedloom.config import ConfigError, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.params import ParamEntry, ParamSpec
from fedloom.registry import AGGREGATORS
from fedloom.seeding import derive_rng
from fedloom.server.aggregators import AggregationInput
from fedloom.server.robust_clipping import (
    BUCKETING,
    CenteredClippingAggregator,
    NormBoundAggregator,
)

from .helpers import final_weights, interrupt_after, latest_checkpoint


def _input(updates: Any, *, rnd: int = 1, weights: Any = None, ids: Any = None) -> AggregationInput:
    rows = np.asarray(updates, dtype=np.float32)
    k = len(rows)
    return AggregationInput(
        round=rnd,
        dimension=rows.shape[1],
        updates=rows,
        weights=np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64),
        count=k,
        client_ids=list(range(k)) if ids is None else ids,
    )


# ---------------------------------------------------------------- centered clipping


def test_one_centered_clipping_step_by_hand() -> None:
    # Round 1, centre v = 0, τ = 2: (1, 0) and (0, 1) lie within 2 of v and count in
    # full; (6, 8) is 10 away and is scaled by 2/10 to (1.2, 1.6). So
    # v ← 0 + ((1, 0) + (0, 1) + (1.2, 1.6)) / 3 = (2.2/3, 2.6/3).
    agg = CenteredClippingAggregator(tau=2.0)
    out, fields = agg.aggregate(_input([[1, 0], [0, 1], [6, 8]], ids=[4, 7, 9]))
    assert out.dtype == np.float32
    assert out == pytest.approx([2.2 / 3, 2.6 / 3], rel=1e-6)
    assert fields["excluded_clients"] == [9] and fields["cc_clipped"] == 1
    # The next round starts from that aggregate (the momentum), here reset by hand to
    # (1, 1): (4, 5) is 5 away, scaled by 2/5 to (1, 1) + (1.2, 1.6); (1, 2) and (0, 1)
    # are 1 away. v ← (1, 1) + ((1.2, 1.6) + (0, 1) + (−1, 0)) / 3 = (1 + 0.2/3, 1 + 2.6/3).
    agg.load_state({"momentum": np.array([1.0, 1.0])})
    out, fields = agg.aggregate(_input([[4, 5], [1, 2], [0, 1]], rnd=2, ids=[4, 7, 9]))
    assert out == pytest.approx([1 + 0.2 / 3, 1 + 2.6 / 3], rel=1e-6)
    assert fields["excluded_clients"] == [4]


def test_centered_clipping_iterations_repeat_the_step() -> None:
    # L = 2 from v = 0, τ = 1, one point (3, 4): step 1 moves v to (0.6, 0.8) (clipped),
    # step 2 again by 1 along the same ray to (1.2, 1.6).
    agg = CenteredClippingAggregator(tau=1.0, iterations=2)
    out, fields = agg.aggregate(_input([[3, 4]]))
    assert out == pytest.approx([1.2, 1.6], rel=1e-6)
    assert fields["excluded_clients"] == [0]


def test_bucketing_clips_bucket_means_and_reports_their_members() -> None:
    # s = 4 ≥ k: one bucket whose mean is (10, 0); with τ = 2 and v = 0 it is clipped to
    # (2, 0), and every member of the clipped bucket is reported.
    agg = CenteredClippingAggregator(tau=2.0, bucket_size=4)
    out, fields = agg.aggregate(_input([[0, 0], [0, 0], [0, 0], [40, 0]], ids=[1, 2, 3, 5]))
    assert out == pytest.approx([2.0, 0.0])
    assert fields["excluded_clients"] == [1, 2, 3, 5] and fields["cc_buckets"] == 1
    # s = 2 on five rows: buckets of the permutation drawn from (seed, BUCKETING, round),
    # the last one a single row; only the bucket holding the huge row is clipped.
    rows = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [1000, 0]], dtype=np.float64)
    agg = CenteredClippingAggregator(tau=5.0, bucket_size=2, seed=11)
    out, fields = agg.aggregate(_input(rows, rnd=3))
    order = derive_rng(11, BUCKETING, 3).permutation(5)
    buckets = [order[0:2], order[2:4], order[4:5]]
    means = [rows[b].mean(axis=0) for b in buckets]
    steps = [m if np.linalg.norm(m) <= 5 else m * 5 / np.linalg.norm(m) for m in means]
    assert out == pytest.approx(np.mean(steps, axis=0), rel=1e-6)
    huge = next(b for b in buckets if 4 in b)
    assert fields["excluded_clients"] == sorted(int(i) for i in huge)
    assert fields["cc_buckets"] == 3
    # Another round draws another permutation, the same round the same one.
    again = CenteredClippingAggregator(tau=5.0, bucket_size=2, seed=11)
    assert again.aggregate(_input(rows, rnd=3))[1] == fields


def test_centered_clipping_stays_near_the_honest_mean_whatever_f_attackers_send() -> None:
    # Each row moves v by at most τ/k per iteration, so ‖v_L − v_0‖ ≤ L·τ always. With the
    # honest rows within τ of v (none clipped) one iteration gives
    # v' − μ = (f/k)(v − μ) + (attackers' clipped terms)/k, hence
    # e' ≤ (f/k)(e + τ) for e = ‖v − μ‖, μ the honest mean; iterated L times.
    for trial in range(60):
        rng = np.random.default_rng(100 + trial)
        d, k = int(rng.integers(2, 40)), int(rng.integers(5, 25))
        f = int(rng.integers(1, int(0.3 * k) + 1))
        centre = rng.normal(size=d) * 3
        honest = centre + rng.normal(size=(k - f, d)) * 0.5
        mu = honest.mean(axis=0)
        v0 = mu + rng.normal(size=d) * 0.3
        r = np.linalg.norm(honest - mu, axis=1).max()
        e = np.linalg.norm(v0 - mu)
        tau = 4 * (r + e)
        bad = rng.choice([-1e6, 1e6], size=(f, d)) * rng.uniform(0.1, 1.0, size=(f, 1))
        rows = np.vstack([honest, bad])[rng.permutation(k)]
        iterations = 1 + trial % 3
        agg = CenteredClippingAggregator(tau=tau, iterations=iterations)
        agg.load_state({"momentum": v0})
        out, fields = agg.aggregate(_input(rows))
        bound = e
        for _ in range(iterations):
            bound = f / k * (bound + tau)
        assert np.linalg.norm(out - mu) <= bound * (1 + 1e-5) + 1e-5, trial
        assert np.linalg.norm(out - v0) <= iterations * tau * (1 + 1e-6), trial
        assert fields["cc_clipped"] == f, trial  # the attackers, and no honest row


def test_centered_clipping_centre_survives_state_round_trip() -> None:
    rng = np.random.default_rng(0)
    rounds = [rng.normal(size=(6, 5)) * 4 for _ in range(3)]
    straight = CenteredClippingAggregator(tau=3.0, bucket_size=2, seed=5)
    assert straight.state() == {}
    outs = [straight.aggregate(_input(u, rnd=i + 1))[0] for i, u in enumerate(rounds)]
    first = CenteredClippingAggregator(tau=3.0, bucket_size=2, seed=5)
    for i in range(2):
        first.aggregate(_input(rounds[i], rnd=i + 1))
    saved = first.state()
    assert saved["momentum"] == pytest.approx(outs[1].astype(np.float64), rel=1e-6)
    saved_copy = {k: v.copy() for k, v in saved.items()}
    first.aggregate(_input(rounds[2], rnd=3))  # keeps going; the saved state must not move
    assert np.array_equal(saved["momentum"], saved_copy["momentum"])
    resumed = CenteredClippingAggregator(tau=3.0, bucket_size=2, seed=5)
    resumed.load_state(saved)
    assert np.array_equal(resumed.aggregate(_input(rounds[2], rnd=3))[0], outs[2])
    # Without the state, round 3 would start from 0 and differ.
    fresh = CenteredClippingAggregator(tau=3.0, bucket_size=2, seed=5)
    assert not np.allclose(fresh.aggregate(_input(rounds[2], rnd=3))[0], outs[2])
    fresh.load_state({})
    assert fresh.momentum is None


def test_centered_clipping_of_no_updates_is_zero_and_keeps_the_centre() -> None:
    agg = CenteredClippingAggregator(tau=1.0)
    agg.load_state({"momentum": np.array([1.0, 2.0])})
    empty = AggregationInput(
        round=2, dimension=2, updates=np.zeros((0, 2), np.float32), weights=np.zeros(0)
    )
    out, fields = agg.aggregate(empty)
    assert out.tolist() == [0.0, 0.0] and fields["excluded_clients"] == []
    assert agg.state()["momentum"].tolist() == [1.0, 2.0]


# ---------------------------------------------------------------- norm bounding


def test_norm_bound_scales_large_updates_then_takes_the_weighted_mean() -> None:
    # M = 1: (3, 4) has norm 5 and becomes (0.6, 0.8); (0.3, 0.4) has norm 0.5 and stays.
    # Example weights 1 and 3: ((0.6, 0.8) + 3·(0.3, 0.4)) / 4 = (0.375, 0.5).
    agg = NormBoundAggregator(max_norm=1.0)
    out, fields = agg.aggregate(_input([[3, 4], [0.3, 0.4]], weights=[1, 3], ids=[6, 2]))
    assert out == pytest.approx([0.375, 0.5], rel=1e-6)
    assert fields["excluded_clients"] == [6] and fields["norm_bound_clipped"] == 1


def test_norm_bound_limits_what_f_attackers_can_do() -> None:
    # Every scaled update has norm ≤ M, so the output has norm ≤ M, and attackers holding
    # a weight fraction θ move it by at most θ·(‖m_h‖ + M) ≤ 2θM from m_h, the weighted
    # mean of the honest (scaled) updates.
    for trial in range(40):
        rng = np.random.default_rng(200 + trial)
        d, k = int(rng.integers(2, 40)), int(rng.integers(3, 25))
        f = int(rng.integers(1, k))
        max_norm = float(rng.uniform(0.5, 3.0))
        honest = rng.normal(size=(k - f, d)) * rng.uniform(0.1, 2.0)
        bad = rng.choice([-1e6, 1e6], size=(f, d))
        weights = rng.integers(1, 50, size=k).astype(np.float64)
        out, fields = NormBoundAggregator(max_norm=max_norm).aggregate(
            _input(np.vstack([honest, bad]), weights=weights)
        )
        scaled = honest / np.maximum(1.0, np.linalg.norm(honest, axis=1) / max_norm)[:, None]
        m_h = weights[: k - f] @ scaled / weights[: k - f].sum()
        theta = weights[k - f :].sum() / weights.sum()
        assert np.linalg.norm(out) <= max_norm * (1 + 1e-6), trial
        assert np.linalg.norm(out - m_h) <= 2 * theta * max_norm * (1 + 1e-6) + 1e-6, trial
        assert set(range(k - f, k)) <= set(fields["excluded_clients"]), trial


# ---------------------------------------------------------------- options and runs


def _context(seed: int = 0) -> StageContext:
    return StageContext(num_clients=4, spec=ParamSpec((ParamEntry("w", (2,)),)), seed=seed)


@pytest.mark.parametrize(
    ("name", "options", "fragment"),
    [
        ("centered_clipping", {"f": 2}, "server.aggregator_options.f: not an option"),
        ("centered_clipping", {"tau": 0}, "server.aggregator_options.tau: must be a number > 0"),
        ("centered_clipping", {"tau": None}, "server.aggregator_options.tau: must be a number"),
        (
            "centered_clipping",
            {"iterations": 1.5},
            "server.aggregator_options.iterations: must be an integer >= 1",
        ),
        (
            "centered_clipping",
            {"bucket_size": 0},
            "server.aggregator_options.bucket_size: must be an integer >= 1",
        ),
        ("norm_bound", {"tau": 1}, "server.aggregator_options.tau: not an option"),
        ("norm_bound", {"max_norm": -1}, "server.aggregator_options.max_norm: must be a number"),
    ],
)
def test_clipping_options_are_checked_with_one_line(
    name: str, options: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        AGGREGATORS.create(name, options, _context())
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_clipping_options_reach_the_aggregators() -> None:
    cc = AGGREGATORS.create(
        "centered_clipping", {"tau": 0.5, "iterations": 3, "bucket_size": 2}, _context(seed=9)
    )
    assert (cc.tau, cc.iterations, cc.bucket_size, cc.seed) == (0.5, 3, 2, 9)
    default = AGGREGATORS.create("centered_clipping", {}, _context())
    assert (default.tau, default.iterations, default.bucket_size) == (3.0, 1, 1)
    assert AGGREGATORS.create("norm_bound", {"max_norm": 4}, _context()).max_norm == 4.0
    assert AGGREGATORS.create("norm_bound", {}, _context()).max_norm == 3.0


CC_DIGITS = [
    "rounds=3",
    "server.aggregator=centered_clipping",
    "server.aggregator_options={tau = 3.0, bucket_size = 2}",
]


def test_centered_clipping_on_digits_resumes_from_its_checkpointed_centre(
    tmp_path: Path,
) -> None:
    whole = run_simulation(load_config(None, CC_DIGITS), tmp_path / "whole")
    for record in whole["history"]:
        assert isinstance(record["excluded_clients"], list)
        assert record["cc_buckets"] == 10  # 20 clients in buckets of 2
    assert whole["final"]["accuracy"] > 0.5
    interrupt_after(load_config(None, CC_DIGITS), tmp_path / "cut", 2)
    assert "agg/momentum" in latest_checkpoint(tmp_path / "cut").tensors
    resumed = run_simulation(load_config(None), tmp_path / "cut", resume=True)
    assert resumed["history"][-1]["excluded_clients"] == whole["history"][-1]["excluded_clients"]
    assert np.array_equal(final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole"))


def test_norm_bound_on_digits(tmp_path: Path) -> None:
    cfg = load_config(None, ["rounds=2", "data.partition=iid", "server.aggregator=norm_bound"])
    summary = run_simulation(cfg, tmp_path / "run")
    assert [r["round"] for r in summary["history"]] == [1, 2]
    # IID digits updates have norms of about 4.5–5.2 in round 1 (measured): the default
    # M = 3 clips them all.
    assert summary["history"][0]["excluded_clients"] == list(range(20))
    assert summary["history"][0]["norm_bound_clipped"] == 20
    assert summary["final"]["accuracy"] > 0.5
