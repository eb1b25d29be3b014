"""TensorBoard tracker: event files a ``tensorboard --logdir DIR`` shows live.

Each round's numeric record fields are scalars at step = round (``accuracy``,
``fed_accuracy``, ``client_accuracy_worst10``, ``epsilon``, ``bytes_up`` …); the
config is a text summary (``config``, JSON) and a hyper-parameter summary (the
flattened config, for TensorBoard's HParams tab). Files go to ``DIR/<run directory
name>``, so several runs logged to one DIR show side by side. Written through
``torch.utils.tensorboard`` (PyTorch is already a dependency; it needs the
``tensorboard`` package, the ``tensorboard`` extra). A resumed run purges the events
after its checkpoint's round, which it records again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedloom.callbacks import Callback, RunContext
from fedloom.config import ConfigError
from fedloom.registry import CALLBACKS
from fedloom.server.tracking import flatten_config, numeric_fields, require_extra

#: Record fields TensorBoard's HParams tab offers as the runs' metrics.
HPARAM_METRICS = ("accuracy", "loss", "fed_accuracy", "client_accuracy_worst10")


class TensorBoardTracker(Callback):
    """Writes the run's records as TensorBoard scalars (module docstring)."""

    after_record = True

    def __init__(self, *, directory: str) -> None:
        require_extra("tensorboard", extra="tensorboard", key="tracking.tensorboard")
        self.directory = Path(directory)
        self._writer: Any = None
        self._purge_from: int | None = None

    def on_restore(self, run: RunContext) -> None:
        self._purge_from = int(run.server.state.round) + 1

    def on_run_start(self, run: RunContext) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        name = Path(run.store.run_dir).name if run.store is not None else "run"
        self._writer = SummaryWriter(str(self.directory / name), purge_step=self._purge_from)
        if self._purge_from is not None:
            return  # a resume: the first stretch wrote the config
        config = run.store.config() if run.store is not None else {}
        self._writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```", 0)
        params = flatten_config(config)
        for summary in hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0)):
            self._writer.file_writer.add_summary(summary)
        self._writer.flush()

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        if self._writer is None:
            return
        for key, value in numeric_fields(record).items():
            self._writer.add_scalar(key, value, rnd)
        self._writer.flush()  # a live dashboard reads the file as the run goes

    def on_run_end(self, run: RunContext) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@CALLBACKS.register("tensorboard")
def make_tensorboard(options: dict[str, Any]) -> TensorBoardTracker:
    directory = options.get("dir")
    if not isinstance(directory, str) or not directory:
        raise ConfigError("the tensorboard callback needs option 'dir' (tracking.tensorboard)")
    return TensorBoardTracker(directory=directory)
