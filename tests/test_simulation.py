"""End-to-end simulation: run directory, resume, engine equivalence, failures, acceptance."""

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.client.runtime import ClientRuntime
from fedloom.client_store import ClientState
from fedloom.config import RunConfig, load_config
from fedloom.engine.simulation import run_centralized, run_simulation
from fedloom.messages import Broadcast, FitResult, FitTask
from fedloom.store import RunStore
from fedloom.strategies import build_learner

from .helpers import final_weights, interrupt_after

SMALL = ["rounds=3", "data.num_clients=6", "client.epochs=1", "checkpoint_every=1"]


def test_run_directory_contract(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [*SMALL, "target_accuracy=0.5", "data.client_test_fraction=0.2", "eval.federated=true"],
    )
    summary = run_simulation(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("summary.json", "history.csv", "run.sqlite", "accuracy.png", "clients.png"):
        assert (run / name).stat().st_size > 0, name
    assert list((run / "checkpoints").glob("*.safetensors"))
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["rounds_completed"] == 3 and on_disk["fedloom_version"]
    assert on_disk["config"]["data"]["num_clients"] == 6
    assert set(on_disk["final"]) >= {"accuracy", "loss"}
    required = {
        "round",
        "accuracy",
        "loss",
        "clients_sampled",
        "clients_succeeded",
        "bytes_up",
        "bytes_down",
        "epsilon",
        "round_s",
    }
    for i, rec in enumerate(on_disk["history"], start=1):
        assert required <= set(rec) and rec["round"] == i
        assert rec["clients_sampled"] == 6 and rec["clients_succeeded"] == 6
        assert rec["fed_accuracy"] is not None and 0.0 <= rec["fed_accuracy"] <= 1.0
    n_params = 64 * 64 + 64 + 64 * 10 + 10
    assert on_disk["history"][0]["bytes_down"] == 6 * 4 * n_params
    assert on_disk["history"][0]["bytes_up"] == 6 * 4 * n_params
    metrics = summary["metrics"]
    # Without secure aggregation the totals are model downloads and clear updates only.
    assert not any(k.startswith("secagg_") for rec in on_disk["history"] for k in rec)
    assert metrics["bytes_down_total"] == metrics["bytes_up_total"] == 3 * 6 * 4 * n_params
    assert metrics["participation_rate"] == 1.0 and metrics["success_rate"] == 1.0
    assert metrics["rounds_to_target"] is not None and metrics["rounds_to_target"] <= 3
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "round" and "accuracy" in header


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedavgm"])
@pytest.mark.parametrize("checkpoint_every", [1, 2])
def test_resume_equals_uninterrupted(tmp_path: Path, strategy: str, checkpoint_every: int) -> None:
    overrides = [*SMALL, "rounds=5", f"strategy={strategy}", f"checkpoint_every={checkpoint_every}"]
    cfg = load_config(None, overrides)
    run_simulation(cfg, tmp_path / "whole")
    interrupt_after(load_config(None, overrides), tmp_path / "cut", 3)
    with RunStore.open(tmp_path / "cut") as store:
        assert [r["round"] for r in store.history()] == [1, 2, 3]
    summary = run_simulation(load_config(None), tmp_path / "cut", resume=True)

    assert [r["round"] for r in summary["history"]] == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(
        final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole")
    )
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert [r["accuracy"] for r in summary["history"]] == [r["accuracy"] for r in whole["history"]]


def test_pool_engine_equals_inprocess(tmp_path: Path) -> None:
    base = [*SMALL, "strategy=fedavgm", "client.straggler_fraction=0.5"]
    run_simulation(load_config(None, base), tmp_path / "inproc")
    run_simulation(
        load_config(None, [*base, "engine.name=pool", "engine.workers=2"]), tmp_path / "pool"
    )
    np.testing.assert_allclose(
        final_weights(tmp_path / "pool"), final_weights(tmp_path / "inproc"), atol=1e-5
    )


def test_failing_client_is_reported_and_round_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = ClientRuntime.fit

    def flaky(
        self: ClientRuntime, task: FitTask, broadcast: Broadcast, state: ClientState
    ) -> FitResult:
        if task.client_id == 2:
            raise RuntimeError("disk on fire")
        return original(self, task, broadcast, state)

    monkeypatch.setattr(ClientRuntime, "fit", flaky)
    summary = run_simulation(load_config(None, SMALL), tmp_path / "run")
    for rec in summary["history"]:
        assert rec["clients_failed"] == 1 and rec["clients_succeeded"] == 5 and rec["aggregated"]
    with RunStore.open(tmp_path / "run") as store:
        failures = store.failures()
    assert len(failures) == 3 and {f["client_id"] for f in failures} == {2}
    assert "RuntimeError: disk on fire" in failures[0]["error"]
    assert "Traceback" in failures[0]["traceback"] and "flaky" in failures[0]["traceback"]
    assert "client 2 failed: RuntimeError: disk on fire" in caplog.text
    assert summary["metrics"]["participation_rate"] == pytest.approx(5 / 6)


def test_too_few_successes_leaves_model_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(
        self: ClientRuntime, task: FitTask, broadcast: Broadcast, state: ClientState
    ) -> FitResult:
        raise ValueError("no data today")

    monkeypatch.setattr(ClientRuntime, "fit", broken)
    cfg = load_config(None, [*SMALL, "server.min_aggregate_clients=2"])
    summary = run_simulation(cfg, tmp_path / "run")
    assert all(not r["aggregated"] and r["clients_failed"] == 6 for r in summary["history"])
    initial = build_learner(cfg, _data(cfg)).initial_vector()
    np.testing.assert_array_equal(final_weights(tmp_path / "run"), initial)


def _data(cfg: RunConfig) -> Any:
    from fedloom.data import build_federated_dataset

    return build_federated_dataset(cfg.data, cfg.seed)


def test_fedavg_drops_stragglers_fedprox_keeps_them(tmp_path: Path) -> None:
    common = [*SMALL, "client.epochs=3", "client.straggler_fraction=0.5"]
    avg = run_simulation(load_config(None, [*common, "strategy=fedavg"]), tmp_path / "avg")
    prox = run_simulation(load_config(None, [*common, "strategy=fedprox"]), tmp_path / "prox")
    dropped = sum(r["stragglers_dropped"] for r in avg["history"])
    assert dropped > 0
    assert sum(r["clients_succeeded"] for r in avg["history"]) == 18 - dropped
    assert all(
        r["stragglers_dropped"] == 0 and r["clients_succeeded"] == 6 for r in prox["history"]
    )


def test_default_demo_reaches_95_percent_within_2_points_of_centralized(tmp_path: Path) -> None:
    """Acceptance for `make demo`: digits, 20 clients, Dirichlet 0.5, FedAvg, 30 rounds."""
    cfg = load_config(None)
    summary = run_simulation(cfg, tmp_path / "demo")
    central = run_centralized(load_config(None))
    federated = summary["final"]["accuracy"]
    assert federated >= 0.95
    assert central["accuracy"] - federated <= 0.02
    assert summary["metrics"]["rounds_to_target"] is not None
    assert math.isfinite(summary["final"]["loss"])
