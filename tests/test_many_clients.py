"""Clients made on demand (``data.on_demand``): Synthetic(α, β) device by device, from
each device's own seed, so memory does not grow with the number of clients."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest

from fedloom.config import ConfigError, DataConfig, load_config
from fedloom.data import build_federated_dataset
from fedloom.data.base import OnDemandClients
from fedloom.data.synthetic import DeviceMaker, feature_variances
from fedloom.engine.simulation import run_simulation
from tests.helpers import final_weights


def _on_demand(num_clients: int, seed: int = 0, **syn: float | bool) -> OnDemandClients:
    cfg = DataConfig.model_validate(
        {
            "name": "synthetic",
            "num_clients": num_clients,
            "partition": "natural",
            "on_demand": True,
            "synthetic": syn,
        }
    )
    clients = build_federated_dataset(cfg, seed).clients
    assert isinstance(clients, OnDemandClients)
    return clients


def _maker(clients: OnDemandClients) -> DeviceMaker:
    assert isinstance(clients.make, DeviceMaker)
    return clients.make


def test_a_device_is_the_same_whenever_and_wherever_it_is_made() -> None:
    a, b = _on_demand(50, seed=4), _on_demand(50, seed=4)
    for k in (49, 3, 17):  # any order
        np.testing.assert_array_equal(a[k].train.x, b[k].train.x)
        np.testing.assert_array_equal(a[k].train.y, b[k].train.y)
    other = _on_demand(50, seed=5)
    assert not np.array_equal(a[3].train.x[:5], other[3].train.x[:5])
    # The sizes known up front are the sizes of the data made later, split 90/10.
    for k in range(10):
        n = len(a[k].train) + len(a[k].test or [])
        assert len(a[k].train) == a.train_sizes[k] == int(0.9 * n) and n >= 50


def test_only_the_last_few_devices_stay_in_memory() -> None:
    clients = _on_demand(100)
    for k in range(0, 100, 7):
        _ = clients[k]
    assert len(clients._recent) <= 8
    assert clients[98] is clients[98]  # the most recent one is kept, not made again


def test_on_demand_labels_are_the_argmax_of_each_device_model() -> None:
    maker = _maker(_on_demand(20, seed=3))
    for k in range(20):
        w, b, _ = maker.latent(maker.rng(k))
        x, y = maker.samples(k)
        np.testing.assert_array_equal(y, (x.astype(np.float64) @ w.T + b).argmax(axis=1))


def test_on_demand_latents_and_features_follow_the_definition() -> None:
    # Same checks as for the eager generator: alpha and beta are standard deviations,
    # Sigma_jj = j^-1.2 within a device, and IID devices share W and b with v = 0.
    maker = _maker(_on_demand(10, alpha=2.0, beta=0.0))
    ws, vs = zip(
        *((w, v) for w, _, v in (maker.latent(maker.rng(k)) for k in range(5000))), strict=True
    )
    w_means = np.array([w.mean() for w in ws])
    assert abs(w_means.var() / (4.0 + 1 / 600) - 1) < 0.08
    assert abs(np.array([v.mean() for v in vs]).var() * 60 - 1) < 0.08
    clients = _on_demand(200, seed=2, alpha=1.0, beta=1.0)
    centred = [clients[k].train.x - clients[k].train.x.mean(axis=0) for k in range(200)]
    variance = np.concatenate(centred).astype(np.float64).var(axis=0)
    np.testing.assert_allclose(variance, feature_variances(60), rtol=0.08)
    iid = _maker(_on_demand(5, iid=True))
    w0, b0, v0 = iid.latent(iid.rng(0))
    w3, b3, _ = iid.latent(iid.rng(3))
    np.testing.assert_array_equal(w0, w3)
    np.testing.assert_array_equal(b0, b3)
    assert not v0.any()


def test_server_test_set_is_bounded() -> None:
    cfg = DataConfig(name="synthetic", num_clients=20_000, partition="natural", on_demand=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = build_federated_dataset(cfg, 0)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    # The local test sets of the first devices, in order.
    first = data.clients[0].test
    assert first is not None
    np.testing.assert_array_equal(data.test.x[: len(first)], first.x)
    # Every device's test set together would be ~11% of the training examples.
    assert len(data.test) < 0.05 * data.client_sizes().sum()
    # All 20,000 devices' data would be ~2 GB; the test set of 1,000 is ~10 MB.
    assert grown_mb < 400, grown_mb
    assert data.num_clients == 20_000 and data.client_sizes().sum() > 0


def test_on_demand_is_synthetic_only_and_not_pooled() -> None:
    with pytest.raises(ConfigError, match=r"only data\.name = 'synthetic'"):
        load_config(None, ["data.on_demand=true"])
    cfg = DataConfig(name="synthetic", num_clients=5, partition="natural", on_demand=True)
    with pytest.raises(ConfigError, match="pools every client's data"):
        build_federated_dataset(cfg, 0).pooled_train()


def test_on_demand_run_is_the_same_on_the_pool(tmp_path: Path) -> None:
    base = [
        "data.name=synthetic",
        "data.on_demand=true",
        "data.num_clients=300",
        "server.fraction_fit=0.02",
        "model.name=logreg",
        "client.epochs=1",
        "rounds=2",
        "eval.max_examples=500",
    ]
    # Federated evaluation makes every client once more (each has its own test set).
    summary = run_simulation(
        load_config(None, [*base, "eval.federated=true", "eval.every=2"]), tmp_path / "inprocess"
    )
    assert all(r["clients_succeeded"] == 6 for r in summary["history"])
    assert summary["final"]["fed_accuracy"] is not None
    assert len((tmp_path / "inprocess" / "clients.txt").read_text().splitlines()) == 301
    run_simulation(
        load_config(None, [*base, "engine.name=pool", "engine.workers=2"]), tmp_path / "pool"
    )
    np.testing.assert_allclose(
        final_weights(tmp_path / "pool"), final_weights(tmp_path / "inprocess"), atol=1e-6
    )
