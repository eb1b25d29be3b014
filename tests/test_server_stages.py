"""Aggregators, server optimizers and sampling against hand-computed cases."""

import numpy as np
import pytest

from fedloom.config import ServerConfig
from fedloom.server.aggregators import AggregationInput, MeanAggregator, weighted_mean
from fedloom.server.optimizers import ServerAdaptive, ServerMomentum, make_server_optimizer
from fedloom.server.sampling import clients_per_round, sample_clients


def test_weighted_mean_hand_computed() -> None:
    updates = [np.array([1.0, 0.0], np.float32), np.array([4.0, 3.0], np.float32)]
    # (10*[1,0] + 30*[4,3]) / 40 = [130/40, 90/40]
    np.testing.assert_allclose(weighted_mean(updates, [10, 30]), [3.25, 2.25])


def test_weighted_mean_rejects_empty_and_mismatch() -> None:
    with pytest.raises(ValueError):
        weighted_mean([], [])
    with pytest.raises(ValueError):
        weighted_mean([np.zeros(2, np.float32)], [1, 2])


def test_weighted_mean_in_blocks_equals_the_whole_vector_sum_bit_for_bit() -> None:
    """Blocked accumulation (bounded float64 temporaries) changes no bit of the mean:
    each element sees the same float64 sum in the same client order."""
    from fedloom.server import aggregators

    rng = np.random.default_rng(0)
    size = 2 * aggregators._BLOCK + 12_345  # two whole blocks and a partial one
    updates = [rng.standard_normal(size).astype(np.float32) for _ in range(5)]
    weights = [3, 1, 4, 1, 5]
    expected = np.zeros(size, np.float64)
    for update, weight in zip(updates, weights, strict=True):
        expected += (weight / sum(weights)) * update.astype(np.float64)
    np.testing.assert_array_equal(weighted_mean(updates, weights), expected.astype(np.float32))
    with pytest.raises(ValueError, match="different lengths"):
        weighted_mean([np.zeros(3, np.float32), np.zeros(4, np.float32)], [1, 1])


def test_mean_aggregator_weights_clear_updates_and_averages_a_secure_sum() -> None:
    """In the clear the example-weighted mean; of a secure sum, each client counts once."""
    rows = np.array([[1.0, 0.0], [4.0, 3.0]], np.float32)
    clear = AggregationInput(
        round=1, dimension=2, updates=rows, weights=np.array([10.0, 30.0]), count=2
    )
    out, fields = MeanAggregator().aggregate(clear)
    np.testing.assert_allclose(out, [3.25, 2.25])
    assert fields == {} and out.dtype == np.float32
    secure = AggregationInput(
        round=1, dimension=2, updates=None, weights=np.zeros(2), total=rows.sum(0), count=2
    )
    np.testing.assert_allclose(MeanAggregator().aggregate(secure)[0], [2.5, 1.5])
    with pytest.raises(ValueError):
        MeanAggregator().aggregate(
            AggregationInput(round=1, dimension=2, updates=None, weights=np.zeros(0))
        )


def test_fedavg_server_step_is_plain_addition() -> None:
    opt = make_server_optimizer(ServerConfig(optimizer="sgd", lr=1.0), 2)
    w = opt.step(np.array([1.0, 2.0], np.float32), np.array([0.5, -1.0], np.float32))
    np.testing.assert_allclose(w, [1.5, 1.0])


def test_fedavgm_two_steps() -> None:
    opt = ServerMomentum(lr=1.0, momentum=0.9, size=1)
    w = opt.step(np.zeros(1, np.float32), np.array([1.0], np.float32))  # v=1, w=1
    w = opt.step(w, np.array([1.0], np.float32))  # v=0.9+1=1.9, w=2.9
    np.testing.assert_allclose(w, [2.9], rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "expected_v"),
    [
        # v0 = tau^2 = 1e-6, delta^2 = 4
        ("adagrad", 1e-6 + 4.0),
        ("adam", 0.99 * 1e-6 + 0.01 * 4.0),
        # yogi: v - (1-b2) d^2 sign(v - d^2) = 1e-6 + 0.01*4 (sign is -1)
        ("yogi", 1e-6 + 0.01 * 4.0),
    ],
)
def test_fedopt_first_step_hand_computed(name: str, expected_v: float) -> None:
    opt = ServerAdaptive(name, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3, size=1)
    w = opt.step(np.array([1.0], np.float32), np.array([2.0], np.float32))
    m = 0.1 * 2.0
    np.testing.assert_allclose(opt.v, [expected_v], rtol=1e-12)
    np.testing.assert_allclose(w, [1.0 + 0.1 * m / (np.sqrt(expected_v) + 1e-3)], rtol=1e-6)


def test_yogi_differs_from_adam_when_v_exceeds_delta_squared() -> None:
    adam = ServerAdaptive("adam", 1.0, 0.9, 0.5, 1e-3, 1)
    yogi = ServerAdaptive("yogi", 1.0, 0.9, 0.5, 1e-3, 1)
    for opt in (adam, yogi):
        opt.v = np.array([1.0])
        opt.step(np.zeros(1, np.float32), np.array([0.1], np.float32))
    np.testing.assert_allclose(adam.v, [0.5 * 1.0 + 0.5 * 0.01])
    np.testing.assert_allclose(yogi.v, [1.0 - 0.5 * 0.01])  # additive, not multiplicative


def test_optimizer_state_round_trip() -> None:
    a = ServerAdaptive("adam", 0.1, 0.9, 0.99, 1e-3, 3)
    a.step(np.zeros(3, np.float32), np.ones(3, np.float32))
    b = ServerAdaptive("adam", 0.1, 0.9, 0.99, 1e-3, 3)
    b.load_state(a.state())
    u = np.array([0.5, -1.0, 2.0], np.float32)
    np.testing.assert_array_equal(
        a.step(np.ones(3, np.float32), u), b.step(np.ones(3, np.float32), u)
    )


def test_sampling_size_and_determinism() -> None:
    assert clients_per_round(100, 0.1, 2) == 10
    assert clients_per_round(10, 0.05, 3) == 3
    assert clients_per_round(5, 1.0, 10) == 5
    a = sample_clients(1000, 0.1, 2, np.random.default_rng(7))
    b = sample_clients(1000, 0.1, 2, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 100 and list(a) == sorted(a)
