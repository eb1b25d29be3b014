"""Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al. 2018)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedloom.server.robust_krum  # noqa: F401  (registers "krum", "multi_krum", "bulyan")
from fedloom.algorithms.base import StageContext
from fedloom.config import ConfigError, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.params import ParamEntry, ParamSpec
from fedloom.registry import AGGREGATORS
from fedloom.server.aggregators import AggregationInput
from fedloom.server.robust_krum import krum_scores, squared_distances

CONTEXT = StageContext(num_clients=30, spec=ParamSpec((ParamEntry("w", (2,)),)), seed=0)


def make(name: str, **options: Any) -> Any:
    return AGGREGATORS.create(name, dict(options), CONTEXT)


def run(agg: Any, rows: Any, ids: list[int] | None = None) -> tuple[np.ndarray, dict]:
    rows = np.asarray(rows, dtype=np.float32)
    k, d = rows.shape
    inp = AggregationInput(
        round=1,
        dimension=d,
        updates=rows,
        weights=np.arange(1, k + 1, dtype=np.float64),  # ignored: every client counts once
        count=k,
        client_ids=ids if ids is not None else list(range(k)),
    )
    out, fields = agg.aggregate(inp)
    assert out.dtype == np.float32 and out.shape == (d,)
    return out, fields


# Five 2-D updates from clients 3, 5, 8, 11, 20; f = 1, so each score sums the
# k - f - 2 = 2 smallest squared distances to the others.
#   V0 = (0, 0), V1 = (1, 0), V2 = (0, 2), V3 = (10, 10), V4 = (1, 1)
# squared distances: d01 = 1, d02 = 4, d03 = 200, d04 = 2, d12 = 5, d13 = 181, d14 = 1,
#                    d23 = 164, d24 = 2, d34 = 162
# s0 = d01 + d04 = 3;  s1 = d01 + d14 = 2;  s2 = d24 + d02 = 6;  s3 = d34 + d23 = 326;
# s4 = d14 + d04 (or d24) = 3
ROWS = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0], [1.0, 1.0]]
IDS = [3, 5, 8, 11, 20]


def test_krum_scores_by_hand() -> None:
    scores = krum_scores(squared_distances(np.array(ROWS)), 2)
    np.testing.assert_allclose(scores, [3.0, 2.0, 6.0, 326.0, 3.0])


def test_krum_by_hand() -> None:
    out, fields = run(make("krum", f=1), ROWS, IDS)
    np.testing.assert_array_equal(out, [1.0, 0.0])  # V1, the smallest score
    assert fields["krum_selected"] == 5
    assert fields["krum_score"] == pytest.approx(2.0)
    assert fields["excluded_clients"] == [3, 8, 11, 20]
    assert fields["robust_f"] == 1


def test_multi_krum_by_hand() -> None:
    # m = 3: scores 2 (V1), 3 (V0), 3 (V4; tie to the lower id V0 first) ->
    # mean of (1, 0), (0, 0), (1, 1) = (2/3, 1/3)
    out, fields = run(make("multi_krum", f=1, m=3), ROWS, IDS)
    np.testing.assert_allclose(out, [2.0 / 3.0, 1.0 / 3.0], rtol=1e-6)
    assert fields["krum_selected"] == [3, 5, 20]
    assert fields["excluded_clients"] == [8, 11]
    # default m = k - f = 4 adds V2 (score 6): mean of V0, V1, V2, V4 = (0.5, 0.75)
    out, fields = run(make("multi_krum", f=1), ROWS, IDS)
    np.testing.assert_allclose(out, [0.5, 0.75])
    assert fields["excluded_clients"] == [11]


def test_bulyan_by_hand() -> None:
    # One coordinate, f = 1, k = 7 >= 4f + 3; theta = k - 2f = 5, beta = theta - 2f = 3.
    # values 0, 1, 3, 4, 6, 50, -40 (clients 0..6). Repeated Krum, neighbours n' - f - 2:
    #  n'=7, 4 nearest: s(0)=1+9+16+36=62, s(1)=1+4+9+25=39, s(3)=1+4+9+9=23,
    #        s(4)=1+4+9+16=30, s(6)=4+9+25+36=74, 50 and -40 huge -> pick 3
    #  n'=6, 3 nearest: s(0)=1+16+36=53, s(1)=1+9+25=35, s(4)=4+9+16=29, s(6)=65 -> pick 4
    #  n'=5, 2 nearest: s(0)=1+36=37, s(1)=1+25=26, s(6)=25+36=61 -> pick 1
    #  n'=4, 1 nearest: s(0)=36, s(6)=36, s(50)=1936, s(-40)=1600 -> tie, lower id: pick 0
    #  n'=3, 1 nearest (n' - f - 2 = 0, at least 1): s(6)=1936, s(50)=1936, s(-40)=2116
    #        -> tie, lower id: pick 6
    # selection {0, 1, 3, 4, 6}, median 3; the 3 values closest to it: 3, 4, 1 -> 8/3
    rows = [[0.0], [1.0], [3.0], [4.0], [6.0], [50.0], [-40.0]]
    out, fields = run(make("bulyan", f=1), rows)
    np.testing.assert_allclose(out, [8.0 / 3.0], rtol=1e-6)
    assert fields["bulyan_selected"] == [0, 1, 2, 3, 4]
    assert fields["excluded_clients"] == [5, 6]
    assert fields["robust_f"] == 1


def test_scores_match_a_direct_computation() -> None:
    """The Gram-matrix distances agree with Σ over explicit differences, even with a large
    common offset and a huge outlier among the rows."""
    rng = np.random.default_rng(7)
    rows = 1e4 + rng.normal(size=(9, 40))
    rows[4] = 1e6
    direct = np.array([[np.sum((a - b) ** 2) for b in rows] for a in rows])
    np.testing.assert_allclose(squared_distances(rows), direct, rtol=1e-9, atol=1e-6)
    expect = np.sort(direct + np.diag(np.full(9, np.inf)), axis=1)[:, :5].sum(axis=1)
    np.testing.assert_allclose(krum_scores(squared_distances(rows), 5), expect, rtol=1e-9)


@pytest.mark.parametrize(
    ("name", "options", "k", "message"),
    [
        ("krum", {"f": 2}, 6, "krum needs k > 2f+2 = 6 updates, got 6"),
        ("multi_krum", {"f": 1}, 4, "multi_krum needs k > 2f+2 = 4 updates, got 4"),
        ("krum", {}, 2, "krum needs k > 2f+2 = 2 updates, got 2"),
        ("bulyan", {"f": 1}, 6, "bulyan needs k >= 4f+3 = 7 updates, got 6"),
        ("bulyan", {}, 2, "bulyan needs k >= 4f+3 = 3 updates, got 2"),
    ],
)
def test_too_few_updates_fall_back_to_the_median(
    name: str, options: dict[str, Any], k: int, message: str
) -> None:
    rows = np.random.default_rng(k).normal(size=(k, 3))
    out, fields = run(make(name, **options), rows)
    np.testing.assert_allclose(out, np.median(rows.astype(np.float32), axis=0), rtol=1e-6)
    assert fields == {"excluded_clients": [], "robust_fallback": message}


@pytest.mark.parametrize("name", ["krum", "multi_krum", "bulyan"])
def test_no_updates_gives_zeros(name: str) -> None:
    inp = AggregationInput(
        round=1, dimension=3, updates=np.zeros((0, 3), np.float32), weights=np.zeros(0)
    )
    out, fields = make(name).aggregate(inp)
    assert out.dtype == np.float32 and np.array_equal(out, np.zeros(3))
    assert fields["excluded_clients"] == []


def attacked(
    rng: np.random.Generator, honest: int, f: int, d: int, *, collude: bool
) -> tuple[np.ndarray, list[int]]:
    """``honest`` vectors near a centre and ``f`` attackers, shuffled. Attackers either
    each send their own huge vector (±1e6 or anything in between, per coordinate) or all
    send the same one (collusion: their distances to each other are 0). Returns the rows
    and the row indices of the honest ones."""
    centre = rng.normal(size=d) * 3.0
    good = centre + rng.normal(scale=0.5, size=(honest, d))
    kind = rng.integers(0, 3, size=(f, d))
    bad = np.where(kind == 0, 1e6, np.where(kind == 1, -1e6, rng.uniform(-1e6, 1e6, (f, d))))
    if collude and f > 0:
        bad[:] = bad[0]
    rows = np.concatenate([good, bad])
    perm = rng.permutation(honest + f)
    honest_rows = sorted(int(np.flatnonzero(perm == i)[0]) for i in range(honest))
    return rows[perm], honest_rows


CASES = [(3, 0), (5, 1), (4, 1), (6, 2), (9, 3), (12, 5)]  # (honest, f): k = h + f > 2f + 2


@pytest.mark.parametrize("collude", [False, True])
@pytest.mark.parametrize(("honest", "f"), CASES)
def test_krum_selects_an_honest_update(honest: int, f: int, collude: bool) -> None:
    """Blanchard et al. 2017: with k > 2f + 2, an attacker far from the honest cluster
    scores worse than every honest update, so Krum returns an honest one and Multi-Krum
    (m = k - f) keeps exactly the honest ones."""
    krum, multi = make("krum", f=f), make("multi_krum", f=f)
    for trial in range(10):
        rng = np.random.default_rng(100 * honest + trial)
        rows, honest_rows = attacked(rng, honest, f, d=30, collude=collude)
        out, fields = run(krum, rows)
        assert fields["krum_selected"] in honest_rows, trial
        np.testing.assert_array_equal(out, rows[fields["krum_selected"]].astype(np.float32))
        out, fields = run(multi, rows)
        assert fields["krum_selected"] == honest_rows, trial
        attackers = sorted(set(range(honest + f)) - set(honest_rows))
        assert fields["excluded_clients"] == attackers
        np.testing.assert_allclose(out, rows[honest_rows].mean(axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("collude", [False, True])
@pytest.mark.parametrize(("honest", "f"), [(3, 0), (6, 1), (9, 2), (12, 3), (20, 4)])
def test_bulyan_stays_within_the_honest_range(honest: int, f: int, collude: bool) -> None:
    """El Mhamdi et al. 2018: with k >= 4f + 3 each coordinate of Bulyan's output lies
    between the honest values' minimum and maximum."""
    bulyan = make("bulyan", f=f)
    for trial in range(10):
        rng = np.random.default_rng(1000 * honest + trial)
        rows, honest_rows = attacked(rng, honest, f, d=30, collude=collude)
        out, fields = run(bulyan, rows)
        good = rows[honest_rows]
        tol = 1e-5 * (1.0 + np.abs(good).max())
        assert np.all(out >= good.min(axis=0) - tol), trial
        assert np.all(out <= good.max(axis=0) + tol), trial
        assert "robust_fallback" not in fields
        assert len(fields["bulyan_selected"]) == honest + f - 2 * f


def test_the_plain_mean_is_not_robust_there() -> None:
    """The property tests above can fail: the mean of such rows leaves the honest range."""
    rows, honest_rows = attacked(np.random.default_rng(0), 6, 1, d=30, collude=False)
    out, _ = run(AGGREGATORS.create("mean", {}, CONTEXT), rows)
    good = rows[honest_rows]
    assert np.any(out > good.max(axis=0)) or np.any(out < good.min(axis=0))


def test_default_f() -> None:
    rows = np.random.default_rng(3).normal(size=(10, 2))
    assert run(make("krum"), rows)[1]["robust_f"] == 2  # floor(0.2 * 10)
    assert run(make("bulyan"), rows)[1]["robust_f"] == 1  # min(2, floor((10 - 3) / 4))
    assert run(make("bulyan"), rows[:3])[1]["robust_f"] == 0


@pytest.mark.parametrize(
    ("name", "options", "fragment"),
    [
        ("krum", {"m": 2}, "server.aggregator_options.m: unknown option"),
        ("bulyan", {"beta": 0.1}, "server.aggregator_options.beta: unknown option"),
        ("krum", {"f": -1}, "server.aggregator_options.f must be an integer >= 0"),
        ("multi_krum", {"f": 1.5}, "server.aggregator_options.f must be an integer >= 0"),
        ("multi_krum", {"m": 0}, "server.aggregator_options.m must be an integer >= 1"),
        ("bulyan", {"f": "2"}, "server.aggregator_options.f must be an integer >= 0"),
    ],
)
def test_bad_options_are_one_line(name: str, options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(name, **options)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "f", "message"),
    [
        ("krum", 14, "krum needs at least 2f+3 = 31 updates per round, but the run has 30"),
        ("multi_krum", 14, "multi_krum needs at least 2f+3 = 31 updates per round"),
        ("bulyan", 7, "bulyan needs at least 4f+3 = 31 updates per round, but the run has 30"),
    ],
)
def test_an_f_no_round_can_meet_is_refused(name: str, f: int, message: str) -> None:
    """CONTEXT has 30 clients: f = 13 (Krum) or 6 (Bulyan) is the most that can work."""
    with pytest.raises(ConfigError) as info:
        make(name, f=f)
    assert f"server.aggregator_options.f = {f}: {message}" in str(info.value)
    assert "\n" not in str(info.value)
    make(name, f=f - 1)


@pytest.mark.parametrize("name", ["krum", "multi_krum", "bulyan"])
def test_runs_end_to_end(tmp_path: Path, name: str) -> None:
    cfg = load_config(None, ["rounds=2", f"server.aggregator={name}"])
    summary = run_simulation(cfg, tmp_path / "run")
    history = summary["history"]
    assert len(history) == 2
    for record in history:
        k = record["clients_succeeded"]
        assert "robust_fallback" not in record
        excluded = record["excluded_clients"]
        assert excluded == sorted(excluded) and all(0 <= c < 20 for c in excluded)
        expected = {
            "krum": k - 1,
            "multi_krum": record["robust_f"],
            "bulyan": 2 * record["robust_f"],
        }
        assert len(excluded) == expected[name]
    assert summary["final"]["accuracy"] > 0.3
