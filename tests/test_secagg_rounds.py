"""SecAgg+ inside the round loop: simulation equals the plain unweighted mean of updates."""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

import fedloom.engine.inprocess as inprocess
from fedloom.client.trainer import LocalTrainer
from fedloom.config import ConfigError, load_config
from fedloom.data import build_federated_dataset
from fedloom.engine.simulation import run_simulation
from fedloom.messages import FitTask
from fedloom.privacy.secagg.config import Stage
from fedloom.privacy.secagg.transport import Exchange, SecAggParticipant
from fedloom.report import summarize_history
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


def test_secure_run_totals_count_model_downloads_and_protocol_traffic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SecAgg+ run's totals are what crossed the wire, counted here at the exchange."""
    wire = {"up": 0, "down": 0}
    real = inprocess.exchange_in_process

    def counting(participants: Mapping[int, SecAggParticipant]) -> Exchange:
        inner = real(participants)

        def exchange(stage: Stage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
            wire["down"] += sum(len(b) for b in outgoing.values())
            replies = inner(stage, outgoing)
            wire["up"] += sum(len(b) for b in replies.values())
            return replies

        return exchange

    monkeypatch.setattr(inprocess, "exchange_in_process", counting)
    cfg = load_config(None, [*SECURE, "rounds=2", "eval.every=2"])
    summary = run_simulation(cfg, tmp_path / "run")
    model_bytes = (
        4 * LocalTrainer(cfg, build_federated_dataset(cfg.data, cfg.seed)).initial_vector().size
    )
    downloads = 2 * 8 * model_bytes  # the global model, to each of 8 clients, in 2 rounds
    assert wire["up"] > 0 and wire["down"] > 0
    metrics = summary["metrics"]
    assert metrics["bytes_up_total"] == wire["up"]  # no update travels in the clear
    assert metrics["bytes_down_total"] == downloads + wire["down"]
    for rec in summary["history"]:  # secagg_bytes_* are the breakdown, not extra
        assert rec["bytes_up"] == rec["secagg_bytes_up"]
        assert rec["bytes_down"] == 8 * model_bytes + rec["secagg_bytes_down"]
    # fedloom report on an unfinished run derives the same totals from the history.
    partial = summarize_history(summary["history"])["metrics"]
    assert partial["bytes_up_total"] == wire["up"]
    assert partial["bytes_down_total"] == downloads + wire["down"]


def test_an_aborted_secure_round_keeps_the_model_and_counts_its_traffic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """All but one client vanish after advertising keys: the round aborts, named, counted."""
    real = inprocess.exchange_in_process

    def vanishing(participants: Mapping[int, SecAggParticipant]) -> Exchange:
        inner = real(participants)

        def exchange(stage: Stage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
            replies = inner(stage, outgoing)
            keep = stage is Stage.ADVERTISE_KEYS
            return {c: r for c, r in replies.items() if keep or c == min(replies)}

        return exchange

    monkeypatch.setattr(inprocess, "exchange_in_process", vanishing)
    cfg = load_config(None, [*SECURE, "rounds=1"])
    summary = run_simulation(cfg, tmp_path / "run")
    (record,) = summary["history"]
    assert "aborted at stage share_keys" in record["secagg_aborted"]
    assert "secure aggregation aborted" in caplog.text  # the cause, logged once
    assert "min_aggregate_clients" not in caplog.text  # not a misleading second reason
    assert record["clients_succeeded"] == 0
    assert record["secagg_bytes_up"] > 0 and record["bytes_up"] == record["secagg_bytes_up"]
    with RunStore.open(tmp_path / "run") as store:
        ckpt = store.latest_checkpoint()
    assert ckpt is not None
    w0 = LocalTrainer(cfg, build_federated_dataset(cfg.data, cfg.seed)).initial_vector()
    np.testing.assert_array_equal(ckpt.tensors["global"], w0)


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
    record = summary["history"][0]
    assert record["secagg_contributors"] == 5
    assert record["bytes_up"] == record["secagg_bytes_up"] > 0  # ciphertexts, key, sum
    with RunStore.open(tmp_path / "run") as store:
        ckpt = store.latest_checkpoint()
    assert ckpt is not None
    trainer = LocalTrainer(cfg, build_federated_dataset(cfg.data, cfg.seed))
    w0 = trainer.initial_vector()
    mean = np.mean([trainer.fit(FitTask(c, 1), w0).delta for c in range(5)], axis=0)
    got = ckpt.tensors["global"] - w0
    assert np.linalg.norm(got - mean) / np.linalg.norm(mean) < 1e-4


def test_held_updates_of_a_round_that_never_aggregated_are_dropped() -> None:
    """A secure round below min_aggregate_clients never calls secure_sum; nothing lingers."""
    cfg = load_config(None, [*SECURE, "rounds=2"])
    trainer = LocalTrainer(cfg, build_federated_dataset(cfg.data, cfg.seed))
    executor = inprocess.InProcessExecutor(trainer)
    w0 = trainer.initial_vector()
    executor.fit([FitTask(c, 1, secure=True) for c in range(3)], w0)
    assert sorted(executor._held) == [(1, 0), (1, 1), (1, 2)]
    executor.fit([FitTask(c, 2, secure=True) for c in range(2)], w0)
    assert sorted(executor._held) == [(2, 0), (2, 1)]
    executor.close()
    assert executor._held == {}
