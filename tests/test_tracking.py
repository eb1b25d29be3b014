"""Experiment tracking: what the TensorBoard and MLflow callbacks wrote, read back with
each tool's own reader, holds every round's numeric record fields; a deployment logs
through the same callbacks; a missing package is one line naming the extra."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from fedloom.config import ConfigError, RunConfig, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.server.tracking import numeric_fields

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def _config(tmp_path: Path, *extra: str) -> RunConfig:
    return load_config(
        None,
        [
            "rounds=3",
            "data.num_clients=4",
            "client.epochs=1",
            f"tracking.tensorboard='{tmp_path / 'tb'}'",
            f"tracking.mlflow='{tmp_path / 'mlruns'}'",
            *extra,
        ],
    )


def _scalars(event_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]} | {
        "__tensors__": {i: 0.0 for i, _ in enumerate(acc.Tags()["tensors"])}
    }


def _mlflow_run(store: Path) -> tuple[Any, Any]:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("fedloom")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def _check_every_round(
    history: list[dict[str, Any]], tb: dict[str, dict[int, float]], client: Any, run: Any
) -> None:
    for record in history:
        rnd = record["round"]
        fields = numeric_fields(record)
        assert {"accuracy", "loss", "bytes_up", "round_s"} <= set(fields)
        for key, value in fields.items():
            assert tb[key][rnd] == pytest.approx(value, rel=1e-6), key
            logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            assert logged[rnd] == pytest.approx(value, rel=1e-9), key


def test_tensorboard_and_mlflow_hold_every_rounds_metrics_config_and_artifacts(
    tmp_path: Path,
) -> None:
    summary = run_simulation(_config(tmp_path), tmp_path / "run")
    tb = _scalars(tmp_path / "tb" / "run")
    client, run = _mlflow_run(tmp_path / "mlruns")
    assert len(summary["history"]) == 3
    _check_every_round(summary["history"], tb, client, run)
    # The config: TensorBoard text/hparams summaries; MLflow params, flattened.
    assert tb["__tensors__"]
    assert run.data.params["client.lr"] == "0.1"
    assert run.data.params["data.num_clients"] == "4"
    assert run.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "history.csv", "config.json", "plots", "checkpoint"} <= names
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/accuracy.png" in plots
    (ckpt,) = client.list_artifacts(run.info.run_id, "checkpoint")
    assert ckpt.path == "checkpoint/round_00003.safetensors"


def test_a_deployment_logs_through_the_same_callbacks(tmp_path: Path) -> None:
    from fedloom.engine.deploy import ServerSecurity, run_server
    from fedloom.engine.grpc.client import BuiltinApp, Credentials, run_client
    from tests.deploy_helpers import federate_in_threads

    cfg = _config(tmp_path, "rounds=2", "data.num_clients=2", "server.min_fit_clients=2")
    summary, _ = federate_in_threads(
        lambda on_listening: run_server(
            cfg, tmp_path / "deploy", "127.0.0.1:0", ServerSecurity(), on_listening=on_listening
        ),
        [
            lambda address, i=i: run_client(
                address,
                BuiltinApp,
                Credentials(insecure=True),
                partition=i,
                max_wait_s=120,
                state_dir=tmp_path / "state",
            )
            for i in range(2)
        ],
    )
    tb = _scalars(tmp_path / "tb" / "deploy")
    client, run = _mlflow_run(tmp_path / "mlruns")
    assert len(summary["history"]) == 2
    _check_every_round(summary["history"], tb, client, run)


@pytest.mark.parametrize(
    ("key", "module", "extra"),
    [("tensorboard", "tensorboard", "tensorboard"), ("mlflow", "mlflow", "mlflow")],
)
def test_a_missing_package_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    cfg = load_config(None, ["rounds=1", f"tracking.{key}='{tmp_path / 'out'}'"])
    with pytest.raises(ConfigError) as err:
        run_simulation(cfg, tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message
    assert f"tracking.{key}" in message and f"fedloom[{extra}]" in message


def test_a_resumed_run_logs_into_the_same_mlflow_run(tmp_path: Path) -> None:
    from tests.helpers import interrupt_after

    interrupt_after(_config(tmp_path), tmp_path / "run", 2)
    summary = run_simulation(_config(tmp_path), tmp_path / "run", resume=True)
    client, run = _mlflow_run(tmp_path / "mlruns")  # one MLflow run, not two
    assert run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "accuracy")}
    assert steps == {1, 2, 3}
    tb = _scalars(tmp_path / "tb" / "run")
    assert set(tb["accuracy"]) == {1, 2, 3}
    assert tb["accuracy"][3] == pytest.approx(summary["history"][-1]["accuracy"])
