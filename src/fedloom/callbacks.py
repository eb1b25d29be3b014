"""Callbacks: what happens around a round (evaluation, recording, checkpointing, early
stopping, the privacy-budget stop, a user's own tracker), outside the round loop.

A callback overrides the hooks it needs; the loop calls them in order. Users register
their own in :data:`fedloom.registry.CALLBACKS` (or pass instances through the Python
API). The shape is pfl-research's ``after_central_iteration``: a hook may stop the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunContext:
    """What callbacks may look at: the server, the run store, and the round's results."""

    server: Any
    store: Any = None
    #: True during the run's last round (the configured number, or a stop ahead).
    last: bool = False
    #: The round's usable fit results (their metrics; vectors may be empty).
    fit_results: list[Any] = field(default_factory=list)
    #: ``time.perf_counter()`` when the current round started.
    round_started: float = 0.0
    #: The round's federated-evaluation results, one per client that evaluated (empty in
    #: a round without federated evaluation); set by the evaluation callback, which runs
    #: first, for stages that look at clients one by one (the client-quality spread).
    eval_results: list[Any] = field(default_factory=list)


class Callback:
    """No-op hooks; override what you need."""

    #: True for a callback that only reads the round record (a tracker, an exporter): the
    #: run places it after the record is stored, so it sees every field of it, including
    #: those the user's callbacks add, and it must not change the record.
    after_record: bool = False

    def on_run_start(self, run: RunContext) -> None:
        """Before the first round (of this process: also after a resume)."""

    def on_restore(self, run: RunContext) -> None:
        """After the server state was restored from a checkpoint."""

    def stop_before_round(self, rnd: int, run: RunContext) -> str | None:
        """A reason to stop before round ``rnd`` (None: go on)."""
        return None

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        """After round ``rnd`` aggregated; ``record`` may be extended before it is stored."""

    def on_run_end(self, run: RunContext) -> None:
        """After the last round, or a stop."""

    def on_outputs_written(self, out_dir: Path, summary: dict[str, Any]) -> None:
        """After the run directory's outputs (summary.json, history.csv, the plots) are
        written at the end of the run: for callbacks that ship them elsewhere."""
