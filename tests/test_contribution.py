"""Who contributed: GTG-Shapley and leave-one-out against hand-computed games, the
coalition models, the config refusal under secure aggregation, and the acceptance
check: two label-shuffled clients of ten rank last."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedloom.attacks.poisoning import shuffle_labels
from fedloom.config import ConfigError, load_config
from fedloom.data.base import ArrayDataset
from fedloom.engine.simulation import run_simulation
from fedloom.server.contribution import (
    coalition_model,
    exact_shapley,
    gtg_shapley,
    leave_one_out,
)

#: A 3-client game by hand: v(∅) = 0, singletons .2 .3 0, pairs {0,1} .6, {0,2} .3,
#: {1,2} .3, everyone .7.
GAME = {
    frozenset(): 0.0,
    frozenset({0}): 0.2,
    frozenset({1}): 0.3,
    frozenset({2}): 0.0,
    frozenset({0, 1}): 0.6,
    frozenset({0, 2}): 0.3,
    frozenset({1, 2}): 0.3,
    frozenset({0, 1, 2}): 0.7,
}
# Marginal contributions over the 6 orders (012, 021, 102, 120, 201, 210):
#   client 0: .2 .2 .3 .4 .3 .4 → 1.8 / 6 = .30
#   client 1: .4 .4 .3 .3 .4 .3 → 2.1 / 6 = .35
#   client 2: .1 .1 .1  0  0  0 →  .3 / 6 = .05      (sum .70 = v(N) − v(∅))
SHAPLEY = [0.30, 0.35, 0.05]
# Leave one out: v(N) − v(N∖{i}) = .7 − .3, .7 − .3, .7 − .6.
LOO = [0.4, 0.4, 0.1]


def _counting(game: dict[frozenset[int], float]) -> tuple[list[frozenset[int]], object]:
    calls: list[frozenset[int]] = []

    def utility(s: frozenset[int]) -> float:
        calls.append(s)
        return game[s]

    return calls, utility


def test_exact_shapley_and_leave_one_out_match_the_hand_computed_game() -> None:
    np.testing.assert_allclose(exact_shapley(GAME.__getitem__, 3), SHAPLEY, atol=1e-12)
    np.testing.assert_allclose(leave_one_out(GAME.__getitem__, 3), LOO, atol=1e-12)


def test_gtg_shapley_with_enough_permutations_matches_exact_shapley() -> None:
    phi, used = gtg_shapley(GAME.__getitem__, 3, rng=np.random.default_rng(0), permutations=3000)
    assert used == 3000
    np.testing.assert_allclose(phi, SHAPLEY, atol=0.01)
    # Every permutation's marginals add up to v(N) − v(∅): so does the estimate.
    assert phi.sum() == pytest.approx(0.7)


def test_gtg_shapley_stops_when_converged_and_truncates_rounds_and_permutations() -> None:
    _, used = gtg_shapley(
        GAME.__getitem__, 3, rng=np.random.default_rng(0), permutations=3000, convergence=0.05
    )
    assert 6 <= used < 3000 and used % 3 == 0
    # Between-round truncation: the round moved the utility by .7 ≤ 1, every score 0.
    phi, used = gtg_shapley(
        GAME.__getitem__, 3, rng=np.random.default_rng(0), permutations=10, round_tolerance=1.0
    )
    assert used == 0 and not phi.any()
    # Within-round truncation: with v({1}) = .65 within .1 of v(N) = .7, a permutation
    # that starts with client 1 stops there (the others add 0 without an evaluation).
    game = {**GAME, frozenset({1}): 0.65}
    full_calls, utility = _counting(game)
    gtg_shapley(utility, 3, rng=np.random.default_rng(0), permutations=30)
    cut_calls, utility = _counting(game)
    phi, _ = gtg_shapley(utility, 3, rng=np.random.default_rng(0), permutations=30, tolerance=0.1)
    assert len(cut_calls) < len(full_calls)
    assert full_calls.count(frozenset({0, 1, 2})) == 1  # v(N) is computed once a round
    assert 0.65 <= phi.sum() <= 0.7  # each permutation telescopes to .65 or .7


def test_coalition_model_is_the_example_weighted_fedavg_step() -> None:
    base = np.array([1.0, -1.0], dtype=np.float32)
    rows = np.array([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]], dtype=np.float32)
    weights = np.array([1.0, 3.0, 0.0])
    np.testing.assert_allclose(coalition_model(base, rows, weights, []), base)
    # (1·[1, 0] + 3·[0, 2]) / 4 = [.25, 1.5]
    np.testing.assert_allclose(coalition_model(base, rows, weights, [0, 1]), [1.25, 0.5])
    # Counts that sum to 0 (hidden): equal weights.
    np.testing.assert_allclose(coalition_model(base, rows, weights, [2]), [5.0, 3.0])


def test_contribution_is_refused_under_secure_aggregation(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        ["rounds=1", "contribution.method='gtg_shapley'", "privacy.secure_aggregation='secagg+'"],
    )
    with pytest.raises(ConfigError, match=r"secure aggregation hides"):
        run_simulation(cfg, tmp_path / "run")


@pytest.mark.parametrize("method", ["gtg_shapley", "leave_one_out"])
def test_two_label_shuffled_clients_of_ten_rank_last(tmp_path: Path, method: str) -> None:
    """The issue's acceptance check: clients 2 and 7 train on randomly permuted labels
    (useless data); summed over the rounds, their contribution is the lowest."""
    cfg = load_config(
        None,
        [
            "rounds=3",
            "data.num_clients=10",
            "data.partition='iid'",
            "client.epochs=1",
            "attack.kind='label_shuffle'",
            "attack.clients=[2, 7]",
            f"contribution.method='{method}'",
            "contribution.permutations=20",
        ],
    )
    summary = run_simulation(cfg, tmp_path / "run")
    for record in summary["history"]:
        assert sorted(record["contribution"], key=int) == [str(c) for c in range(10)]
    totals = summary["metrics"]["contribution_total"]
    ranked = sorted(totals, key=lambda c: totals[c])
    assert set(ranked[:2]) == {"2", "7"}, totals


def test_label_shuffle_permutes_labels_once_per_client_keeping_class_counts() -> None:
    y = np.repeat(np.arange(5), 20).astype(np.int64)
    train = ArrayDataset(np.arange(100, dtype=np.float32).reshape(100, 1), y)
    a = shuffle_labels(train, seed=0, client_id=3)
    np.testing.assert_array_equal(a.x, train.x)
    np.testing.assert_array_equal(np.bincount(a.y), np.bincount(y))
    assert (a.y != y).mean() > 0.5  # the link between x and y is gone
    np.testing.assert_array_equal(shuffle_labels(train, seed=0, client_id=3).y, a.y)
    assert (shuffle_labels(train, seed=0, client_id=4).y != a.y).any()
