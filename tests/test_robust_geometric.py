"""RFA, the geometric median by smoothed Weiszfeld (Pillutla, Kakade & Harchaoui 2022):
steps worked out by hand, the breakdown guarantee under arbitrary attackers, options, and a
digits run (refused under secure aggregation)."""

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedloom.server.robust_geometric  # noqa: F401  (registers "rfa")
from fedloom.algorithms.base import StageContext
from fedloom.config import ConfigError, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.params import ParamEntry, ParamSpec
from fedloom.registry import AGGREGATORS
from fedloom.server.aggregators import AggregationInput
from fedloom.server.robust_geometric import GeometricMedianAggregator, smoothed_weiszfeld

COLLINEAR = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])


def _input(updates: np.ndarray, weights: Any = None, ids: Any = None) -> AggregationInput:
    k = len(updates)
    return AggregationInput(
        round=1,
        dimension=updates.shape[1],
        updates=updates.astype(np.float32),
        weights=np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64),
        count=k,
        client_ids=list(range(k)) if ids is None else ids,
    )


def test_weiszfeld_steps_on_three_collinear_points_by_hand() -> None:
    # Points 0, 1, 10 on the x-axis with α = (1, 1, 3). Starts: the α-weighted mean
    # x = (0 + 1 + 30)/5 = 6.2, objective 6.2 + 5.2 + 3·3.8 = 22.8; the coordinate-wise
    # median x = 1, objective 1 + 0 + 3·9 = 28. So z⁰ = (6.2, 0).
    # Step 1: distances 6.2, 5.2, 3.8, so β = (1/6.2, 1/5.2, 3/3.8) = (5/31, 5/26, 15/19)
    # and z¹ = (5/26·1 + 15/19·10) / (5/31 + 5/26 + 15/19) = 24769/3501 ≈ 7.0748.
    beta = [Fraction(5, 31), Fraction(5, 26), Fraction(15, 19)]
    z1 = (beta[1] * 1 + beta[2] * 10) / sum(beta)
    assert z1 == Fraction(24769, 3501)
    alphas = np.array([1.0, 1.0, 3.0])
    one = smoothed_weiszfeld(COLLINEAR, alphas, max_iter=1, tol=0.0)
    assert one.iterations == 1
    assert one.median == pytest.approx([float(z1), 0.0], abs=1e-12)
    assert one.betas == pytest.approx([float(b) for b in beta], rel=1e-12)
    # On a line the geometric median is the weighted median: 10 holds 3 of the 5 units.
    many = smoothed_weiszfeld(COLLINEAR, alphas, max_iter=200, tol=0.0)
    assert many.median == pytest.approx([10.0, 0.0], abs=1e-5)


def test_weiszfeld_with_equal_weights_stays_on_the_middle_point() -> None:
    # Equal α: the median x = 1 has objective 1 + 0 + 9 = 10 (+ ν/2 from smoothing the
    # zero distance), below the mean 11/3's 11/3 + 8/3 + 19/3 = 38/3; it is the geometric
    # median, and a step from it stays there: (1·1 + 1/ν·1 + 1/9·10)/(1 + 1/ν + 1/9) = 1.
    res = smoothed_weiszfeld(COLLINEAR, np.ones(3), nu=1e-6)
    assert res.median == pytest.approx([1.0, 0.0], abs=1e-12)
    assert res.objective == pytest.approx(10.0 + 0.5e-6, abs=1e-12)
    assert res.converged and res.iterations == 1


def test_rfa_down_weights_the_far_client_and_reports_it() -> None:
    # Four clients on the unit circle around 0 and one at (100, 100): at the median (near 0)
    # the far client's factor 1/‖z − w‖ ≈ 1/141 is far below half the mean factor, the
    # others' ≈ 1 are not; with equal example counts that is "β below half the mean β".
    updates = np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [100, 100]], dtype=np.float64)
    agg = GeometricMedianAggregator()
    out, fields = agg.aggregate(_input(updates, ids=[3, 5, 8, 11, 42]))
    assert out.dtype == np.float32 and out.shape == (2,)
    assert np.linalg.norm(out) < 0.5  # the plain mean is (20, 20)
    assert fields["excluded_clients"] == [42]
    assert 1 <= fields["rfa_iterations"] <= 10


def test_rfa_excluded_clients_compare_with_each_clients_own_weight() -> None:
    # A client with few examples is not "down-weighted" for having few examples: with the
    # light clients at (±1, 0) and the heavy ones at (0, ±1) the median is 0 by symmetry,
    # and every factor 1/‖z − w_i‖ is 1, whatever α_i.
    updates = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=np.float64)
    out, fields = GeometricMedianAggregator().aggregate(_input(updates, weights=[1, 1, 100, 100]))
    assert out == pytest.approx([0.0, 0.0], abs=1e-6)
    assert fields["excluded_clients"] == []


def test_rfa_of_no_updates_is_zero() -> None:
    inp = AggregationInput(
        round=3, dimension=4, updates=np.zeros((0, 4), np.float32), weights=np.zeros(0)
    )
    out, fields = GeometricMedianAggregator().aggregate(inp)
    assert out.tolist() == [0.0] * 4 and out.dtype == np.float32
    assert fields["excluded_clients"] == [] and fields["rfa_iterations"] == 0


def test_rfa_stays_near_the_honest_points_whatever_f_attackers_send() -> None:
    # Breakdown point 1/2: with an attacker weight fraction θ = f/k < 1/2, the geometric
    # median z lies within 2(1 − θ)/(1 − 2θ) · r of the honest mean μ, r = the largest
    # honest distance to μ (if ‖z − μ‖ = R, each honest point adds ≥ R − 2r and each
    # attacker ≥ −R to g(z) − g(μ) ≤ 0). The default 10 steps must already satisfy it,
    # with attackers at ±1e6 per coordinate, spread or colluding on one point, up to
    # f = ⌊(k − 1)/2⌋. The weighted mean would be ~θ·1e6 away.
    agg = GeometricMedianAggregator()
    for trial in range(60):
        rng = np.random.default_rng(trial)
        d, k = int(rng.integers(2, 40)), int(rng.integers(5, 25))
        f = (k - 1) // 2 if trial % 2 else int(0.2 * k)
        centre = rng.normal(size=d) * 3
        honest = centre + rng.normal(size=(k - f, d)) * 0.5
        bad = rng.choice([-1e6, 1e6], size=(f, d)) * rng.uniform(0.1, 1.0, size=(f, 1))
        if trial % 3 == 0:
            bad = np.tile(bad[:1], (f, 1))
        rows = np.vstack([honest, bad])
        order = rng.permutation(k)
        out, fields = agg.aggregate(_input(rows[order]))
        mu = honest.mean(axis=0)
        r = np.linalg.norm(honest - mu, axis=1).max()
        theta = f / k
        assert np.linalg.norm(out - mu) <= 2 * (1 - theta) / (1 - 2 * theta) * r, trial
        attackers = sorted(int(np.flatnonzero(order == i)[0]) for i in range(k - f, k))
        assert set(attackers) <= set(fields["excluded_clients"]), trial


def _context() -> StageContext:
    return StageContext(num_clients=4, spec=ParamSpec((ParamEntry("w", (2,)),)), seed=0)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"f": 2}, "server.aggregator_options.f: not an option of aggregator 'rfa'"),
        ({"nu": 0.0}, "server.aggregator_options.nu: must be a number > 0"),
        ({"nu": "small"}, "server.aggregator_options.nu: must be a number > 0"),
        ({"max_iter": 0}, "server.aggregator_options.max_iter: must be an integer >= 1"),
        ({"max_iter": True}, "server.aggregator_options.max_iter: must be an integer >= 1"),
        ({"tol": -1}, "server.aggregator_options.tol: must be a number >= 0"),
    ],
)
def test_rfa_options_are_checked_with_one_line(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        AGGREGATORS.create("rfa", options, _context())
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_rfa_options_reach_the_aggregator() -> None:
    agg = AGGREGATORS.create("rfa", {"nu": 1e-3, "max_iter": 3, "tol": 0}, _context())
    assert (agg.nu, agg.max_iter, agg.tol) == (1e-3, 3, 0.0)
    assert agg.needs_individual_updates


def test_rfa_on_digits_records_excluded_clients(tmp_path: Path) -> None:
    cfg = load_config(None, ["rounds=2", "server.aggregator=rfa"])
    summary = run_simulation(cfg, tmp_path / "run")
    assert [r["round"] for r in summary["history"]] == [1, 2]
    for record in summary["history"]:
        assert isinstance(record["excluded_clients"], list)
        assert 1 <= record["rfa_iterations"] <= 10
    assert summary["final"]["accuracy"] > 0.5
