"""Gossip topologies, Metropolis–Hastings weights and serverless rounds."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from fedloom.config import ConfigError, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.gossip.topology import (
    adjacency,
    consensus_distance,
    is_connected,
    metropolis_hastings,
    spectral_gap,
)
from fedloom.strategies import check_composition

from .helpers import final_weights, interrupt_after


@pytest.mark.parametrize(
    ("topology", "n", "degrees"),
    [("ring", 8, {2}), ("torus", 16, {4}), ("exponential", 16, {7}), ("complete", 5, {4})],
)
def test_topologies_have_the_expected_degrees(topology: str, n: int, degrees: set[int]) -> None:
    a = adjacency(topology, n)
    assert set(a.sum(axis=1).tolist()) == degrees
    assert np.array_equal(a, a.T) and not a.diagonal().any() and is_connected(a)


def test_erdos_renyi_is_connected_and_seeded() -> None:
    a = adjacency("erdos_renyi", 12, rng=np.random.default_rng(3), p=0.25)
    b = adjacency("erdos_renyi", 12, rng=np.random.default_rng(3), p=0.25)
    assert is_connected(a) and np.array_equal(a, b)


def test_metropolis_hastings_by_hand_on_a_path_of_three() -> None:
    # Path 0 - 1 - 2: degrees 1, 2, 1; each edge weight 1 / (1 + max(d_i, d_j)) = 1/3.
    a = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)
    w = metropolis_hastings(a)
    np.testing.assert_allclose(w, [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])


@pytest.mark.parametrize("topology", ["ring", "torus", "exponential", "complete"])
def test_gossip_matrix_is_symmetric_doubly_stochastic_and_reaches_the_average(
    topology: str,
) -> None:
    w = metropolis_hastings(adjacency(topology, 16))
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    np.testing.assert_allclose(w, w.T)
    assert (w >= 0).all() and spectral_gap(w) > 0
    x = np.random.default_rng(0).normal(size=(16, 5))
    distances = [consensus_distance(x)]
    for _ in range(200):
        x = w @ x
        distances.append(consensus_distance(x))
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(distances))
    assert distances[-1] < 1e-6 * distances[0]
    assert spectral_gap(metropolis_hastings(adjacency("complete", 16))) == pytest.approx(1.0)


def test_consensus_distance_by_hand() -> None:
    models = np.array([[0.0, 0.0], [2.0, 0.0]])  # mean (1, 0); each 1 away
    assert consensus_distance(models) == 1.0


SMALL = ["mode=gossip", "data.num_clients=6", "rounds=3", "client.epochs=1", "eval.every=3"]


def test_complete_graph_gossip_reaches_consensus_every_round(tmp_path: Path) -> None:
    history = run_simulation(
        load_config(None, [*SMALL, "gossip.topology=complete"]), tmp_path / "run"
    )["history"]
    assert all(r["consensus_distance"] < 1e-8 for r in history)
    assert history[-1]["peer_accuracy_min"] == pytest.approx(history[-1]["accuracy"])


def test_ring_gossip_records_disagreement_and_resumes_exactly(tmp_path: Path) -> None:
    overrides = [*SMALL, "gossip.topology=ring", "rounds=4"]
    whole = run_simulation(load_config(None, overrides), tmp_path / "whole")["history"]
    assert all(r["consensus_distance"] > 0 for r in whole)
    assert whole[-1]["peer_accuracy_min"] <= whole[-1]["peer_accuracy_mean"]
    interrupt_after(load_config(None, overrides), tmp_path / "cut", 2)
    run_simulation(load_config(None), tmp_path / "cut", resume=True)
    np.testing.assert_array_equal(
        final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole")
    )


def test_gossip_refuses_a_server_side_privacy_mechanism() -> None:
    cfg = load_config(None, ["mode=gossip", "strategy=dp-fedavg", "privacy.noise_multiplier=1"])
    with pytest.raises(ConfigError, match="no server to add noise"):
        check_composition(cfg)
