"""SecAgg+ inside the round loop: simulation equals the plain unweighted mean of updates."""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

import fedloom.engine.inprocess as inprocess
from fedloom.client.runtime import ClientRuntime
from fedloom.client_store import ClientStateStore
from fedloom.config import ConfigError, RunConfig, load_config
from fedloom.data import build_federated_dataset
from fedloom.engine.simulation import run_simulation
from fedloom.exchange import ExchangeRequest
from fedloom.messages import GLOBAL, HOLD, FitResult, FitTask
from fedloom.privacy.secagg.config import STAGES, Stage
from fedloom.report import summarize_history
from fedloom.store import RunStore

from .helpers import client_runtime, fit_once


def _runtime(cfg: RunConfig) -> ClientRuntime:
    return client_runtime(cfg, build_federated_dataset(cfg.data, cfg.seed))


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

    runtime = _runtime(cfg)
    w0 = runtime.initial_vector()
    # The same clients in the clear (no HOLD in the task config): their plain updates.
    deltas = [fit_once(runtime, w0, client=c, round=1).delta for c in range(8)]
    expected = w0 + np.mean(deltas, axis=0)
    step = 4.0 / (2**15 - 1)  # quantization step of the default 16 bits over [-4, 4]
    np.testing.assert_allclose(ckpt.tensors["global"], expected, atol=step)
    assert not np.array_equal(ckpt.tensors["global"], expected)  # quantized, not plain


def test_secure_run_totals_count_model_downloads_and_protocol_traffic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SecAgg+ run's totals are what crossed the wire, counted here at the exchange."""
    wire = {"up": 0, "down": 0}
    real = inprocess.exchange_locally

    def counting(
        runtime: ClientRuntime, request: ExchangeRequest, outgoing: Mapping[int, bytes]
    ) -> dict[int, bytes]:
        wire["down"] += sum(len(b) for b in outgoing.values())
        replies = real(runtime, request, outgoing)
        wire["up"] += sum(len(b) for b in replies.values())
        return replies

    monkeypatch.setattr(inprocess, "exchange_locally", counting)
    cfg = load_config(None, [*SECURE, "rounds=2", "eval.every=2"])
    summary = run_simulation(cfg, tmp_path / "run")
    model_bytes = 4 * _runtime(cfg).initial_vector().size
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
    real = inprocess.exchange_locally

    def vanishing(
        runtime: ClientRuntime, request: ExchangeRequest, outgoing: Mapping[int, bytes]
    ) -> dict[int, bytes]:
        replies = real(runtime, request, outgoing)
        keep = STAGES[request.stage] is Stage.ADVERTISE_KEYS
        return {c: r for c, r in replies.items() if keep or c == min(replies)}

    monkeypatch.setattr(inprocess, "exchange_locally", vanishing)
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
    w0 = _runtime(cfg).initial_vector()
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
    runtime = _runtime(cfg)
    w0 = runtime.initial_vector()
    mean = np.mean([fit_once(runtime, w0, client=c, round=1).delta for c in range(5)], axis=0)
    got = ckpt.tensors["global"] - w0
    assert np.linalg.norm(got - mean) / np.linalg.norm(mean) < 1e-4


def test_held_updates_of_a_round_that_never_aggregated_are_dropped() -> None:
    """A secure round below min_aggregate_clients never runs its protocol; nothing lingers."""
    cfg = load_config(None, [*SECURE, "rounds=2"])
    runtime = _runtime(cfg)
    executor = inprocess.InProcessExecutor(runtime, ClientStateStore())
    broadcast = {GLOBAL: runtime.initial_vector()}

    def tasks(rnd: int, clients: int) -> list[FitTask]:
        config = {HOLD: "secagg"}
        return [
            FitTask(client_id=c, round=rnd, model_version=rnd - 1, config=config)
            for c in range(clients)
        ]

    results = executor.fit(tasks(1, 3), broadcast)
    assert all(isinstance(r, FitResult) and r.held and not r.vectors for r in results)
    assert sorted(runtime._held) == [(1, 0), (1, 1), (1, 2)]
    executor.fit(tasks(2, 2), broadcast)
    assert sorted(runtime._held) == [(2, 0), (2, 1)]
    executor.close()
    assert runtime._held == {}
