"""Client selectors: uniform (unchanged draw), power-of-choice and Oort by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedloom.config import ConfigError, load_config
from fedloom.messages import FitResult
from fedloom.server.sampling import sample_clients
from fedloom.server.selection import OortSelector, PowerOfChoiceSelector, UniformSelector
from fedloom.strategies import check_composition


def _update(client_id: int, loss: float, n: int = 10) -> FitResult:
    return FitResult(
        client_id=client_id,
        round=1,
        model_version=0,
        vectors={},
        num_examples=n,
        metrics={"train_loss": loss},
    )


def test_uniform_selector_draws_exactly_what_fixed_size_sampling_drew() -> None:
    pool = np.arange(30)
    for seed in range(5):
        expected = sample_clients(30, 0.2, 1, np.random.default_rng(seed))
        got = UniformSelector().select(1, pool, 6, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, expected)


def test_power_of_choice_asks_the_highest_loss_candidates() -> None:
    selector = PowerOfChoiceSelector(candidates=6)
    losses = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.7, 4: 0.2, 5: 0.3}
    selector.observe(1, [_update(c, loss) for c, loss in losses.items()], {})
    # Candidates = the whole pool of six: the three largest losses are clients 1, 3, 2.
    got = selector.select(2, np.arange(6), 3, np.random.default_rng(0))
    np.testing.assert_array_equal(got, [1, 2, 3])


def test_power_of_choice_tries_unseen_clients_first() -> None:
    selector = PowerOfChoiceSelector(candidates=4)
    selector.observe(1, [_update(0, 5.0), _update(1, 4.0)], {})
    got = selector.select(2, np.arange(4), 2, np.random.default_rng(0))
    np.testing.assert_array_equal(got, [2, 3])  # never seen: infinite estimated loss


def test_oort_utility_by_hand() -> None:
    oort = OortSelector(alpha=2.0, preferred_duration_s=10.0)
    oort.observe(
        3,
        [_update(0, 0.5, n=100), _update(1, 0.5, n=100), _update(2, 1.0, n=50)],
        {0: 5.0, 1: 20.0, 2: 10.0},
    )
    bonus = math.sqrt(0.1 * math.log(4) / 3)
    assert oort.utility(0, 4) == pytest.approx(100 * 0.5 + bonus)  # fast: no penalty
    assert oort.utility(1, 4) == pytest.approx((100 * 0.5 + bonus) * (10 / 20) ** 2)
    assert oort.utility(2, 4) == pytest.approx(50 * 1.0 + bonus)  # exactly T: no penalty


def test_oort_explores_a_shrinking_fraction_and_exploits_the_rest() -> None:
    oort = OortSelector(epsilon=0.5, epsilon_decay=1.0, epsilon_min=0.5)
    oort.observe(1, [_update(c, 1.0 if c < 5 else 0.01) for c in range(10)], {})
    got = oort.select(2, np.arange(20), 6, np.random.default_rng(0))
    assert len(set(got.tolist())) == 6
    assert sum(c >= 10 for c in got) == 3  # half explores the ten unseen clients
    assert set(got[got < 10].tolist()) <= {0, 1, 2, 3, 4}  # the rest: high utility only
    assert oort.epsilon(1) == 0.5
    assert OortSelector().epsilon(200) == 0.2


def test_selector_state_round_trips() -> None:
    oort = OortSelector()
    oort.observe(4, [_update(3, 0.25, n=7)], {3: 1.5})
    other = OortSelector()
    other.load_state(oort.state())
    assert other.utility(3, 9) == oort.utility(3, 9)


def test_biased_selection_is_refused_with_central_dp() -> None:
    cfg = load_config(
        None, ["strategy=dp-fedavg", "privacy.noise_multiplier=1.0", "server.selection=oort"]
    )
    with pytest.raises(ConfigError, match="uniform sampling"):
        check_composition(cfg)
    with pytest.raises(ConfigError, match="unknown client selector 'fastest'"):
        check_composition(load_config(None, ["server.selection=fastest"]))
