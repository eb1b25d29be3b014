"""Run one client task and turn any exception into a failure record with its traceback."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import TypeVar

from fedloom.messages import ClientFailure, EvalTask, FitTask

R = TypeVar("R")


def run_safely(fn: Callable[[], R], task: FitTask | EvalTask) -> R | ClientFailure:
    """Call ``fn``; a client's exception must never take the round (or the worker) down."""
    try:
        return fn()
    except Exception as exc:
        return ClientFailure(
            client_id=task.client_id,
            round=task.round,
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
        )
