"""FLAME (Nguyen et al. 2022): the outlier cluster removed and the median-norm clipping
worked out by hand (noise off with λ = 0), the seeded noise of σ = λ·S, the bound on the
output under arbitrary attackers, options, and a digits run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.base import StageContext
from fedloom.config import ConfigError, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.params import ParamEntry, ParamSpec
from fedloom.registry import AGGREGATORS
from fedloom.server.aggregators import AggregationInput
from fedloom.server.robust_flame import Flame, cosine_distances

CONTEXT = StageContext(num_clients=10, spec=ParamSpec((ParamEntry("w", (2,)),)), seed=5)


def _input(rows: Any, *, rnd: int = 1, ids: list[int] | None = None) -> AggregationInput:
    rows = np.asarray(rows, dtype=np.float32)
    k = len(rows)
    return AggregationInput(
        round=rnd,
        dimension=rows.shape[1],
        updates=rows,
        weights=np.arange(1, k + 1, dtype=np.float64),  # ignored: every client counts once
        count=k,
        client_ids=list(range(k)) if ids is None else ids,
    )


def test_cosine_distances_by_hand() -> None:
    dist = cosine_distances(np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]]))
    assert dist == pytest.approx(
        np.array([[0, 1, 2, 1], [1, 0, 1, 1], [2, 1, 0, 1], [1, 1, 1, 0]], dtype=float)
    )


def test_outlier_cluster_removed_and_admitted_updates_clipped_to_the_median_norm() -> None:
    # Five honest updates along (1, 0) with norms 1, 2, 3, 6, 8 (cosine distance 0 among
    # them) and two attackers, (-10, 0) and (0, -7), at distance 2 and 1 from them. With
    # k = 7 the minimum cluster size is 4: only the honest five form a cluster.
    # S = median of all norms {1, 2, 3, 6, 8, 10, 7} = 6; the norm-8 update is scaled to 6.
    # Aggregate = ((1 + 2 + 3 + 6 + 6) / 5, 0) = (3.6, 0).
    rows = [[1, 0], [2, 0], [-10, 0], [3, 0], [6, 0], [0, -7], [8, 0]]
    ids = [10, 11, 12, 13, 14, 15, 16]
    out, fields = Flame(noise_lambda=0.0, min_cluster_size=None, seed=0).aggregate(
        _input(rows, ids=ids)
    )
    assert out.dtype == np.float32
    assert out == pytest.approx([3.6, 0.0])
    assert fields["excluded_clients"] == [12, 15]
    assert fields["flame_admitted"] == 5
    assert fields["flame_clip_norm"] == 6.0
    assert fields["flame_clipped"] == 1
    assert fields["flame_noise_sigma"] == 0.0


def test_noise_has_sigma_lambda_times_the_median_norm_and_is_seeded_by_round() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=4000)
    rows = np.stack([base * s for s in (1.0, 2.0, 3.0, 4.0, 5.0)])  # S = 3·‖base‖
    clean, _ = Flame(noise_lambda=0.0, min_cluster_size=None, seed=1).aggregate(_input(rows))
    noisy_agg = Flame(noise_lambda=0.01, min_cluster_size=None, seed=1)
    noisy, fields = noisy_agg.aggregate(_input(rows, rnd=3))
    sigma = 0.01 * 3 * np.linalg.norm(base)
    assert fields["flame_noise_sigma"] == pytest.approx(sigma, rel=1e-6)
    assert np.std(noisy - clean) == pytest.approx(sigma, rel=0.05)
    again, _ = noisy_agg.aggregate(_input(rows, rnd=3))
    other, _ = noisy_agg.aggregate(_input(rows, rnd=4))
    assert np.array_equal(again, noisy) and not np.array_equal(other, noisy)


def test_output_stays_within_the_largest_honest_norm_whatever_f_attackers_send() -> None:
    # With f < k/2 attackers, the median norm S lies within the honest norms, every
    # admitted update is clipped to S, so (λ = 0) ‖aggregate‖ ≤ S ≤ max honest norm,
    # whichever updates the clustering admits.
    for trial in range(40):
        rng = np.random.default_rng(500 + trial)
        d, k = int(rng.integers(2, 30)), int(rng.integers(3, 22))
        f = int(rng.integers(0, (k - 1) // 2 + 1))
        centre = rng.normal(size=d)
        honest = centre + rng.normal(size=(k - f, d)) * rng.uniform(0.05, 2.0)
        bad = rng.choice([-1e6, 1e6], size=(f, d)) * rng.uniform(0.0, 1.0, size=(f, 1))
        rows = np.vstack([honest, bad])[rng.permutation(k)]
        out, fields = Flame(noise_lambda=0.0, min_cluster_size=None, seed=0).aggregate(_input(rows))
        # The aggregator sees float32 rows (as every update travels).
        bound = np.linalg.norm(honest.astype(np.float32).astype(np.float64), axis=1).max()
        assert fields["flame_clip_norm"] <= bound * (1 + 1e-9), trial
        assert np.linalg.norm(out) <= bound * (1 + 1e-5), trial


def test_too_few_updates_to_cluster_are_all_kept() -> None:
    out, fields = Flame(noise_lambda=0.0, min_cluster_size=None, seed=0).aggregate(
        _input([[3, 4], [0, 1]])
    )
    # S = median(5, 1) = 3: (3, 4) → (1.8, 2.4); mean with (0, 1) = (0.9, 1.7).
    assert out == pytest.approx([0.9, 1.7])
    assert fields["excluded_clients"] == [] and "robust_fallback" in fields
    empty = AggregationInput(
        round=1, dimension=2, updates=np.zeros((0, 2), np.float32), weights=np.zeros(0)
    )
    assert Flame(noise_lambda=0.001, min_cluster_size=None, seed=0).aggregate(empty)[
        0
    ].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"noise_lambda": -1}, "server.aggregator_options.noise_lambda must be a number >= 0"),
        ({"noise_lambda": True}, "server.aggregator_options.noise_lambda must be a number"),
        ({"min_cluster_size": 1}, "server.aggregator_options.min_cluster_size must be"),
        ({"f": 1}, "server.aggregator_options.f: unknown option for aggregator 'flame'"),
    ],
)
def test_bad_options_are_one_line(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        AGGREGATORS.create("flame", options, CONTEXT)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_options_reach_the_aggregator() -> None:
    agg = AGGREGATORS.create("flame", {"noise_lambda": 0.01, "min_cluster_size": 3}, CONTEXT)
    assert (agg.noise_lambda, agg.min_cluster_size, agg.seed) == (0.01, 3, 5)
    default = AGGREGATORS.create("flame", {}, CONTEXT)
    assert (default.noise_lambda, default.min_cluster_size) == (0.001, None)


def test_flame_on_digits(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["rounds=3", "data.partition=iid", "server.aggregator=flame", "client.epochs=1"]
    )
    summary = run_simulation(cfg, tmp_path / "run")
    for record in summary["history"]:
        assert record["flame_admitted"] >= 11  # the majority cluster: at least 20 / 2 + 1
        assert len(record["excluded_clients"]) == 20 - record["flame_admitted"]
        assert record["flame_noise_sigma"] == pytest.approx(0.001 * record["flame_clip_norm"])
    assert summary["final"]["accuracy"] > 0.5
