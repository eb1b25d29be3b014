"""MLflow tracker: one MLflow run per fedloom run, in a file store or on a server.

* params: the flattened config (``client.lr``, ``data.partition`` …), logged once;
* metrics: every numeric field of each round record at step = round;
* artifacts, when the run directory's outputs are written: ``summary.json``,
  ``history.csv``, ``config.json``, the plots (``*.png``) and the final checkpoint
  (``checkpoint/round_NNNNN.safetensors``: the global model and the stages' state).

The URI is a tracking server (``http://host:5000``) or a local file store (``file:///…``
or a plain path, made absolute). MLflow 3 keeps its file store in maintenance mode and
refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set; since the user asked for a file
store, this tracker sets that variable for its own process when the URI is one (to
read the store elsewhere, e.g. ``mlflow ui``, set it there too). Only ``MlflowClient``
is used (no global active run), so a Python program's own MLflow runs are untouched.
The MLflow run id is kept in the run store's meta (``mlflow_run_id``): a resumed
fedloom run logs into the same MLflow run. Needs ``mlflow-skinny`` (the ``mlflow``
extra).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedloom.callbacks import Callback, RunContext
from fedloom.config import ConfigError
from fedloom.registry import CALLBACKS
from fedloom.server.tracking import flatten_config, numeric_fields, require_extra

#: MLflow's limits: entries per log_batch call, and characters of a param value.
MAX_BATCH_PARAMS = 100
MAX_BATCH_METRICS = 1000
MAX_PARAM_CHARS = 6000
#: Run-store meta key of the MLflow run this fedloom run logs into.
RUN_ID_META = "mlflow_run_id"
ARTIFACTS = ("summary.json", "history.csv", "config.json")


def tracking_uri(uri: str) -> str:
    """A plain path becomes an absolute ``file://`` URI; anything with a scheme stays."""
    scheme = urlparse(uri).scheme
    if scheme and len(scheme) > 1:  # "C:" is a drive, not a scheme
        return uri
    return Path(uri).expanduser().resolve().as_uri()


class MLflowTracker(Callback):
    """Logs the run into one MLflow run (module docstring)."""

    after_record = True

    def __init__(self, *, uri: str, experiment: str) -> None:
        require_extra("mlflow", extra="mlflow", key="tracking.mlflow")
        self.uri = tracking_uri(uri)
        self.experiment = experiment
        self._client: Any = None
        self.run_id: str | None = None

    def _connect(self) -> Any:
        if urlparse(self.uri).scheme == "file":
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def on_run_start(self, run: RunContext) -> None:
        from mlflow.entities import Param

        self._client = client = self._connect()
        store = run.store
        previous = store.get_meta(RUN_ID_META) if store is not None else None
        if isinstance(previous, str) and previous:
            self.run_id = previous  # a resume: same MLflow run, params already logged
            client.update_run(previous, status="RUNNING")
            return
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = (
            found.experiment_id if found is not None else client.create_experiment(self.experiment)
        )
        name = Path(store.run_dir).name if store is not None else None
        tags = {"fedloom.run_dir": str(Path(store.run_dir).resolve())} if store is not None else {}
        created = client.create_run(experiment_id, run_name=name, tags=tags)
        self.run_id = created.info.run_id
        if store is not None:
            store.set_meta(RUN_ID_META, self.run_id)
        config = store.config() if store is not None else {}
        params = [
            Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(flatten_config(config).items())
        ]
        for i in range(0, len(params), MAX_BATCH_PARAMS):
            client.log_batch(self.run_id, params=params[i : i + MAX_BATCH_PARAMS])

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        if self._client is None or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, rnd) for k, v in numeric_fields(record).items()]
        for i in range(0, len(metrics), MAX_BATCH_METRICS):
            self._client.log_batch(self.run_id, metrics=metrics[i : i + MAX_BATCH_METRICS])

    def on_outputs_written(self, out_dir: Path, summary: dict[str, Any]) -> None:
        if self._client is None or self.run_id is None:
            return
        out_dir = Path(out_dir)
        for name in ARTIFACTS:
            if (out_dir / name).is_file():
                self._client.log_artifact(self.run_id, str(out_dir / name))
        for plot in sorted(out_dir.glob("*.png")):
            self._client.log_artifact(self.run_id, str(plot), artifact_path="plots")
        checkpoints = sorted((out_dir / "checkpoints").glob("round_*.safetensors"))
        if checkpoints:
            self._client.log_artifact(self.run_id, str(checkpoints[-1]), artifact_path="checkpoint")
        status = "FAILED" if summary.get("outcome") == "failed" else "FINISHED"
        self._client.set_terminated(self.run_id, status=status)


@CALLBACKS.register("mlflow")
def make_mlflow(options: dict[str, Any]) -> MLflowTracker:
    uri = options.get("uri")
    if not isinstance(uri, str) or not uri:
        raise ConfigError("the mlflow callback needs option 'uri' (tracking.mlflow)")
    return MLflowTracker(uri=uri, experiment=str(options.get("experiment", "fedloom")))
