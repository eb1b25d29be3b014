"""SecAgg+ inside the round loop: simulation equals the plain unweighted mean of updates."""

from pathlib import Path

import numpy as np
import pytest

from fedloom.client.trainer import LocalTrainer
from fedloom.config import ConfigError, load_config
from fedloom.data import build_federated_dataset
from fedloom.engine.simulation import run_simulation
from fedloom.messages import FitTask
from fedloom.store import RunStore

SECURE = [
    "data.num_clients=8",
    "client.epochs=1",
    "privacy.secure_aggregation=secagg+",
    "privacy.secagg_clip_range=4.0",
]


def test_secure_round_equals_unweighted_mean_of_updates(tmp_path: Path) -> None:
    cfg = load_config(None, [*SECURE, "rounds=1"])
    summary = run_simulation(cfg, tmp_path / "run")
    record = summary["history"][0]
    assert record["secagg_contributors"] == 8 and record["secagg_bytes_up"] > 0
    with RunStore.open(tmp_path / "run") as store:
        ckpt = store.latest_checkpoint()
    assert ckpt is not None

    trainer = LocalTrainer(cfg, build_federated_dataset(cfg.data, cfg.seed))
    w0 = trainer.initial_vector()
    deltas = [trainer.fit(FitTask(c, 1), w0).delta for c in range(8)]
    expected = w0 + np.mean(deltas, axis=0)
    step = 4.0 / (2**15 - 1)  # quantization step of the default 16 bits over [-4, 4]
    np.testing.assert_allclose(ckpt.tensors["global"], expected, atol=step)
    assert not np.array_equal(ckpt.tensors["global"], expected)  # quantized, not plain


def test_secure_aggregation_with_central_dp_learns(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            *SECURE,
            "rounds=5",
            "strategy=dp-fedavg",
            "privacy.noise_multiplier=0.1",
            "server.sampling=fixed",
        ],
    )
    summary = run_simulation(cfg, tmp_path / "run")
    assert all(r["secagg_contributors"] == 8 for r in summary["history"])
    assert summary["history"][-1]["epsilon"] > 0
    assert summary["final"]["accuracy"] > 0.5


def test_secure_aggregation_is_refused_on_the_pool() -> None:
    with pytest.raises(ConfigError, match="pool engine"):
        load_config(None, [*SECURE, "engine.name=pool"])


def test_ckks_round_equals_unweighted_mean_of_updates(tmp_path: Path) -> None:
    """CKKS (TenSEAL) as the alternative to SecAgg+: the mean to ~1e-7, no quantization."""
    overrides = [
        "data.num_clients=5",
        "client.epochs=1",
        "privacy.secure_aggregation=ckks",
        "rounds=1",
    ]
    cfg = load_config(None, overrides)
    summary = run_simulation(cfg, tmp_path / "run")
    assert summary["history"][0]["secagg_contributors"] == 5
    with RunStore.open(tmp_path / "run") as store:
        ckpt = store.latest_checkpoint()
    assert ckpt is not None
    trainer = LocalTrainer(cfg, build_federated_dataset(cfg.data, cfg.seed))
    w0 = trainer.initial_vector()
    mean = np.mean([trainer.fit(FitTask(c, 1), w0).delta for c in range(5)], axis=0)
    got = ckpt.tensors["global"] - w0
    assert np.linalg.norm(got - mean) / np.linalg.norm(mean) < 1e-4
