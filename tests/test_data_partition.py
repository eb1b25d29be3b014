"""Partitioners: every sample assigned once, the promised skew, determinism, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.config import ConfigError, DataConfig
from fedloom.data import build_federated_dataset
from fedloom.data.partition import (
    partition_dirichlet,
    partition_iid,
    partition_natural,
    partition_shards,
    stratified_split,
)
from fedloom.data.summary import label_skew


def _labels(n: int = 1000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    """Each index in 0..n-1 appears in exactly one part; parts are sorted int64."""
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "indices within a client must be sorted and unique"
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def _one_line_config_error(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_iid_covers_every_sample_once_with_balanced_sizes() -> None:
    parts = partition_iid(1003, 10, np.random.default_rng(1))
    _assert_exact_cover(parts, 1003)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_covers_every_sample_once_and_respects_min_size() -> None:
    y = _labels(500)
    parts = partition_dirichlet(y, 20, 0.3, np.random.default_rng(2), min_size=5)
    _assert_exact_cover(parts, 500)
    assert min(len(p) for p in parts) >= 5


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    def mean_skew(alpha: float) -> float:
        skews = []
        for seed in range(4):
            cfg = DataConfig(name="digits", partition="dirichlet", alpha=alpha, num_clients=10)
            skews.append(label_skew(build_federated_dataset(cfg, seed)))
        return float(np.mean(skews))

    skews = [mean_skew(a) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2], skews
    assert skews[0] < 0.15 and skews[2] > 0.5, skews


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    y = np.repeat([0, 1], 50)  # two classes, each lands (almost) wholly on one client
    with pytest.raises(ConfigError) as exc:
        partition_dirichlet(y, 5, 1e-4, np.random.default_rng(0), min_size=1)
    assert "data.alpha" in _one_line_config_error(exc)


def test_dirichlet_rejects_impossible_minimum() -> None:
    with pytest.raises(ConfigError) as exc:
        partition_dirichlet(_labels(30), 8, 1.0, np.random.default_rng(0), min_size=4)
    assert "data.num_clients" in _one_line_config_error(exc)


def test_shards_cover_every_sample_once() -> None:
    y = _labels(997)
    parts = partition_shards(y, 12, 3, np.random.default_rng(3))
    _assert_exact_cover(parts, 997)
    for part in parts:
        assert len(np.unique(y[part])) <= 2 * 3


def test_shards_give_each_client_at_most_its_shard_count_of_labels() -> None:
    y = np.repeat(np.arange(10), 20)  # 20 shards of 10: no shard straddles two classes
    rng = np.random.default_rng(4)
    y = y[rng.permutation(len(y))]
    parts = partition_shards(y, 10, 2, rng)
    _assert_exact_cover(parts, 200)
    label_counts = [len(np.unique(y[part])) for part in parts]
    assert all(len(part) == 20 for part in parts)
    assert max(label_counts) <= 2
    # shards are dealt at random, not in label order (which would give one label each)
    assert sum(k == 2 for k in label_counts) >= 5


def test_natural_groups_by_key_in_sorted_order() -> None:
    keys = np.array(["b", "a", "c", "a", "b", "b"])
    parts, names = partition_natural(keys)
    assert names == ["a", "b", "c"]
    _assert_exact_cover(parts, len(keys))
    for part, name in zip(parts, names, strict=True):
        assert set(keys[part]) == {name}
    np.testing.assert_array_equal(parts[1], [0, 4, 5])


def test_natural_rejects_empty_keys() -> None:
    with pytest.raises(ConfigError) as exc:
        partition_natural(np.array([], dtype=str))
    _one_line_config_error(exc)


@pytest.mark.parametrize("which", ["iid", "dirichlet", "shards"])
def test_more_clients_than_samples_is_a_config_error(which: str) -> None:
    y = _labels(15)
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError) as exc:
        if which == "iid":
            partition_iid(15, 16, rng)
        elif which == "dirichlet":
            partition_dirichlet(y, 16, 1.0, rng)
        else:
            partition_shards(y, 16, 1, rng)
    assert "data.num_clients" in _one_line_config_error(exc)


def test_shards_reject_more_shards_than_samples() -> None:
    with pytest.raises(ConfigError) as exc:
        partition_shards(_labels(15), 5, 4, np.random.default_rng(0))
    assert "data.shards_per_client" in _one_line_config_error(exc)


@pytest.mark.parametrize("which", ["iid", "dirichlet", "shards"])
def test_partitions_are_deterministic_in_the_generator_seed(which: str) -> None:
    y = _labels(400)

    def run(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        if which == "iid":
            return partition_iid(400, 7, rng)
        if which == "dirichlet":
            return partition_dirichlet(y, 7, 0.5, rng)
        return partition_shards(y, 7, 2, rng)

    first, again, other = run(5), run(5), run(6)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_stratified_split_keeps_class_shares() -> None:
    y = np.concatenate([np.zeros(500), np.ones(300), np.full(200, 2), np.full(7, 3)]).astype(int)
    train, test = stratified_split(y, 0.2, np.random.default_rng(0))
    _assert_exact_cover([train, test], len(y))
    assert len(test) == round(0.2 * len(y))
    for c, n in enumerate([500, 300, 200, 7]):
        assert abs(int((y[test] == c).sum()) - 0.2 * n) <= 1


def test_stratified_split_rejects_a_fraction_that_empties_a_part() -> None:
    with pytest.raises(ConfigError) as exc:
        stratified_split(np.arange(3) % 2, 0.1, np.random.default_rng(0))
    assert "data.test_fraction" in _one_line_config_error(exc)
