"""Coordinate-wise median and trimmed mean (Yin et al. 2018, Definitions 1 and 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedloom.server.robust_coordinate  # noqa: F401  (registers "median", "trimmed_mean")
from fedloom.algorithms.base import StageContext
from fedloom.config import ConfigError, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.params import ParamEntry, ParamSpec
from fedloom.registry import AGGREGATORS
from fedloom.server.aggregators import AggregationInput

CONTEXT = StageContext(num_clients=30, spec=ParamSpec((ParamEntry("w", (2,)),)), seed=0)


def make(name: str, **options: Any) -> Any:
    return AGGREGATORS.create(name, dict(options), CONTEXT)


def run(agg: Any, rows: np.ndarray, ids: list[int] | None = None) -> tuple[np.ndarray, dict]:
    rows = np.asarray(rows, dtype=np.float32)
    k, d = rows.shape
    inp = AggregationInput(
        round=1,
        dimension=d,
        updates=rows,
        weights=np.ones(k),
        count=k,
        client_ids=ids if ids is not None else list(range(k)),
    )
    out, fields = agg.aggregate(inp)
    assert out.dtype == np.float32 and out.shape == (d,)
    return out, fields


# Five clients, two coordinates; client ids 3, 5, 8, 11, 20.
ROWS = [[1.0, 10.0], [2.0, -3.0], [100.0, 4.0], [4.0, 5.0], [-50.0, 9.0]]
IDS = [3, 5, 8, 11, 20]


def test_median_by_hand() -> None:
    # column 0 sorted: -50, 1, 2, 4, 100 -> 2; column 1 sorted: -3, 4, 5, 9, 10 -> 5
    out, fields = run(make("median"), ROWS, IDS)
    np.testing.assert_allclose(out, [2.0, 5.0])
    assert fields == {"excluded_clients": []}
    # even k: the mean of the two middle values; column 0: (3 + 5) / 2, column 1: (0 + 8) / 2
    out, _ = run(make("median"), [[1, 0], [3, 8], [5, 0], [7, 8]])
    np.testing.assert_allclose(out, [4.0, 4.0])


def test_trimmed_mean_by_hand() -> None:
    # beta = 0.2, k = 5: b = floor(0.2 * 5) = 1 value trimmed from each end.
    # column 0 sorted: -50, [1, 2, 4], 100 -> 7/3; column 1 sorted: -3, [4, 5, 9], 10 -> 6
    out, fields = run(make("trimmed_mean", beta=0.2), ROWS, IDS)
    np.testing.assert_allclose(out, [7.0 / 3.0, 6.0], rtol=1e-6)
    assert fields["excluded_clients"] == []
    assert fields["trimmed_per_end"] == 1
    # trimmed: client 3's 10, client 5's -3, client 8's 100, client 20's -50; 11 keeps both
    assert fields["trimmed_per_client"] == {"3": 1, "5": 1, "8": 1, "11": 0, "20": 1}
    # default beta = 0.1 trims nothing from 5 values: the plain mean
    out, fields = run(make("trimmed_mean"), ROWS, IDS)
    np.testing.assert_allclose(out, np.mean(ROWS, axis=0), rtol=1e-6)
    assert fields["trimmed_per_end"] == 0
    # f = 2 trims two from each end of five: the median
    out, fields = run(make("trimmed_mean", f=2), ROWS, IDS)
    np.testing.assert_allclose(out, [2.0, 5.0])
    assert "robust_fallback" not in fields


def test_trimmed_mean_with_too_few_updates_falls_back_to_the_median() -> None:
    out, fields = run(make("trimmed_mean", f=2), ROWS[:4], IDS[:4])
    # median of 1, 2, 4, 100 is 3; of 10, -3, 4, 5 is 4.5
    np.testing.assert_allclose(out, [3.0, 4.5])
    assert fields["robust_fallback"] == "trimmed_mean needs k > 2f = 4 updates, got 4"
    assert fields["excluded_clients"] == []


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_no_updates_gives_zeros(name: str) -> None:
    inp = AggregationInput(
        round=1, dimension=3, updates=np.zeros((0, 3), np.float32), weights=np.zeros(0)
    )
    out, fields = make(name).aggregate(inp)
    assert out.dtype == np.float32 and np.array_equal(out, np.zeros(3))
    assert fields["excluded_clients"] == []


def attacked(rng: np.random.Generator, honest: int, f: int, d: int) -> tuple[np.ndarray, list[int]]:
    """``honest`` vectors near a centre and ``f`` attackers (±1e6 or anything in between),
    shuffled; returns the rows and the row indices of the honest ones."""
    centre = rng.normal(size=d) * 3.0
    good = centre + rng.normal(scale=0.5, size=(honest, d))
    kind = rng.integers(0, 3, size=(f, d))
    bad = np.where(kind == 0, 1e6, np.where(kind == 1, -1e6, rng.uniform(-1e6, 1e6, (f, d))))
    rows = np.concatenate([good, bad])
    perm = rng.permutation(honest + f)
    honest_rows = [int(np.flatnonzero(perm == i)[0]) for i in range(honest)]
    return rows[perm], sorted(honest_rows)


@pytest.mark.parametrize(
    ("name", "options", "honest", "f"),
    [
        ("median", {}, 6, 5),
        ("median", {}, 3, 2),
        ("trimmed_mean", {"f": 3}, 5, 3),
        ("trimmed_mean", {"f": 4}, 5, 4),  # k = 9 = 2f + 1: one value kept
        ("trimmed_mean", {"beta": 0.25}, 9, 3),  # b = floor(0.25 * 12) = 3 >= f
    ],
)
def test_each_coordinate_stays_within_the_honest_range(
    name: str, options: dict[str, Any], honest: int, f: int
) -> None:
    """Yin et al. 2018: with f < k/2 (median) or b >= f (trimmed mean) each coordinate of
    the aggregate lies between the honest values' minimum and maximum."""
    agg = make(name, **options)
    for trial in range(20):
        rng = np.random.default_rng(1000 + trial)
        rows, honest_rows = attacked(rng, honest, f, d=50)
        out, fields = run(agg, rows)
        good = rows[honest_rows]
        lo, hi = good.min(axis=0), good.max(axis=0)
        tol = 1e-5 * (1.0 + np.abs(good).max())
        assert np.all(out >= lo - tol) and np.all(out <= hi + tol), trial
        assert "robust_fallback" not in fields


def test_the_plain_mean_is_not_robust_there() -> None:
    """The property test above can fail: the mean of the same rows leaves the range."""
    rows, honest_rows = attacked(np.random.default_rng(1000), 5, 3, d=50)
    out, _ = run(AGGREGATORS.create("mean", {}, CONTEXT), rows)
    good = rows[honest_rows]
    assert np.any(out > good.max(axis=0)) or np.any(out < good.min(axis=0))


@pytest.mark.parametrize(
    ("name", "options", "fragment"),
    [
        ("median", {"f": 1}, "server.aggregator_options.f: unknown option"),
        ("trimmed_mean", {"bta": 0.1}, "server.aggregator_options.bta: unknown option"),
        ("trimmed_mean", {"beta": 0.5}, "server.aggregator_options.beta must be a number in"),
        ("trimmed_mean", {"beta": "x"}, "server.aggregator_options.beta must be a number in"),
        ("trimmed_mean", {"f": -1}, "server.aggregator_options.f must be an integer >= 0"),
        ("trimmed_mean", {"f": True}, "server.aggregator_options.f must be an integer >= 0"),
        ("trimmed_mean", {"f": 1, "beta": 0.1}, "not both"),
    ],
)
def test_bad_options_are_one_line(name: str, options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(name, **options)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_an_f_no_round_can_meet_is_refused() -> None:
    """CONTEXT has 30 clients: trimming f = 15 from each end leaves nothing; 14 works."""
    with pytest.raises(ConfigError) as info:
        make("trimmed_mean", f=15)
    assert str(info.value) == (
        "server.aggregator_options.f = 15: trimmed_mean needs at least 2f+1 = 31 updates per "
        "round, but the run has 30 clients; lower f"
    )
    make("trimmed_mean", f=14)


def test_trimmed_mean_runs_end_to_end(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["rounds=2", "server.aggregator=trimmed_mean", "server.aggregator_options.f=2"]
    )
    summary = run_simulation(cfg, tmp_path / "run")
    history = summary["history"]
    assert len(history) == 2
    for record in history:
        assert record["excluded_clients"] == []
        assert record["trimmed_per_end"] == 2
        assert record["aggregated"] is True
    assert summary["final"]["accuracy"] > 0.5


ROBUST = ["median", "trimmed_mean", "krum", "multi_krum", "bulyan", "rfa"]
ROBUST += ["centered_clipping", "norm_bound"]


@pytest.mark.parametrize("name", ROBUST)
def test_secure_aggregation_is_refused(tmp_path: Path, name: str) -> None:
    """Every robust aggregator needs the individual updates secure aggregation hides."""
    cfg = load_config(
        None, ["rounds=1", f"server.aggregator={name}", "privacy.secure_aggregation=secagg+"]
    )
    with pytest.raises(ConfigError) as info:
        run_simulation(cfg, tmp_path / "run")
    message = str(info.value)
    assert "secure aggregation" in message and "\n" not in message
