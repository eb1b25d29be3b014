"""The default engine: clients run one after another in this process.

Exact and reproducible, and with the flat-parameter trainer nearly free of per-client
overhead, so it is also the reference every other engine is compared against.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from fedloom.client.safety import run_safely
from fedloom.client.trainer import LocalTrainer
from fedloom.messages import ClientFailure, EvalResult, EvalTask, FitResult, FitTask


class InProcessExecutor:
    def __init__(self, trainer: LocalTrainer) -> None:
        self.trainer = trainer

    def fit(
        self, tasks: Sequence[FitTask], global_vector: np.ndarray
    ) -> list[FitResult | ClientFailure]:
        return [run_safely(partial(self.trainer.fit, t, global_vector), t) for t in tasks]

    def evaluate(
        self, tasks: Sequence[EvalTask], global_vector: np.ndarray
    ) -> list[EvalResult | ClientFailure]:
        return [
            run_safely(partial(self.trainer.evaluate_client, t, global_vector), t) for t in tasks
        ]

    def available_clients(self) -> None:
        return None

    def round_metrics(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        return None
