"""The loop's built-in callbacks: evaluation, the round record, checkpoints, early stop.

The run wires them in this order: evaluation (fills the record's metrics), the
strategy's own (e.g. the privacy ledger), the user's, then recording and checkpointing,
so what is stored is the complete record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.callbacks import Callback, RunContext
from fedloom.data.base import ArrayDataset
from fedloom.messages import EvalResult, EvalTask
from fedloom.registry import CALLBACKS

log = logging.getLogger("fedloom.server")

#: The server's own evaluation of a model vector: metrics such as loss and accuracy.
CentralEvaluator = Callable[[np.ndarray], dict[str, float]]


class Evaluation(Callback):
    """Centralized (server test set) and federated (clients' test sets) evaluation.

    Runs every ``every`` rounds and in the last. Federated metrics are example-weighted
    means (``fed_loss``, ``fed_accuracy``, …); metrics a client reports with the
    ``personalized_`` prefix are plain means over clients (each client's own model on its
    own test set counts once).
    """

    def __init__(
        self,
        *,
        every: int,
        centralized: bool,
        federated: bool,
        central_evaluator: CentralEvaluator | None,
        eval_clients: Sequence[int],
    ) -> None:
        self.every = every
        self.centralized = centralized
        self.federated = federated
        self.central_evaluator = central_evaluator
        self.eval_clients = list(eval_clients)

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        run.eval_results = []
        if rnd % self.every != 0 and not run.last:
            return
        server = run.server
        weights = server.state.weights
        if self.centralized and self.central_evaluator is not None:
            model = server.strategy.algorithm.global_for_evaluation(weights)
            metrics = self.central_evaluator(model)
            record.update(metrics)
        # In a deployment the clients that are connected evaluate on their own local test
        # data (the server cannot know who has any); in simulation, those with test sets.
        connected = server.executor.connected_clients()
        evaluators = self.eval_clients if connected is None else list(connected)
        if not (self.federated and evaluators):
            return
        config, broadcast = server.strategy.configure_evaluate(rnd, weights)
        tasks = [
            EvalTask(client_id=c, round=rnd, model_version=rnd, config=config) for c in evaluators
        ]
        results = [
            r
            for r in server.executor.evaluate(tasks, broadcast)
            if isinstance(r, EvalResult) and r.num_examples > 0
        ]
        run.eval_results = results
        record.update(federated_metrics(results))


def federated_metrics(results: Sequence[EvalResult]) -> dict[str, float]:
    """Weighted ``fed_*`` means, and plain per-client means of ``personalized_*`` metrics."""
    out: dict[str, float] = {}
    n = sum(r.num_examples for r in results)
    if not n:
        return out
    names = sorted({k for r in results for k in r.metrics})
    for name in names:
        having = [r for r in results if name in r.metrics]
        if name.startswith("personalized_"):
            out[name] = float(np.mean([r.metrics[name] for r in having]))
        else:
            total = sum(r.num_examples for r in having)
            out[f"fed_{name}"] = sum(r.metrics[name] * r.num_examples for r in having) / total
    return out


class RoundRecorder(Callback):
    """Stores each round's record (and its duration) in the run store."""

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        record["round_s"] = time.perf_counter() - run.round_started
        if run.store is not None:
            run.store.record_round(record)


class Checkpointer(Callback):
    """Saves a checkpoint every ``every`` rounds and in the last."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        if run.store is not None and (rnd % self.every == 0 or run.last):
            run.store.save_checkpoint(run.server.checkpoint())


class EarlyStopping(Callback):
    """Stops when a metric has not improved by ``min_delta`` for ``patience`` evaluations,
    or (``stop_at``) once it reaches a value."""

    def __init__(
        self,
        *,
        metric: str = "accuracy",
        patience: int | None = None,
        min_delta: float = 0.0,
        mode: str = "max",
        stop_at: float | None = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"early stopping mode must be 'max' or 'min', got '{mode}'")
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.sign = 1.0 if mode == "max" else -1.0
        self.stop_at = stop_at
        self.best: float | None = None
        self.stale = 0
        self.reason: str | None = None

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        value = record.get(self.metric)
        if not isinstance(value, int | float):
            return
        if self.stop_at is not None and self.sign * (value - self.stop_at) >= 0:
            self.reason = f"early stop: {self.metric} = {value:.4g} reached {self.stop_at:g}"
            return
        if self.best is None or self.sign * (value - self.best) > self.min_delta:
            self.best, self.stale = float(value), 0
            return
        self.stale += 1
        if self.patience is not None and self.stale >= self.patience:
            self.reason = (
                f"early stop: {self.metric} did not improve on {self.best:.4g} for "
                f"{self.stale} evaluations"
            )

    def stop_before_round(self, rnd: int, run: RunContext) -> str | None:
        return self.reason


@CALLBACKS.register("early-stopping")
def make_early_stopping(options: dict[str, Any]) -> EarlyStopping:
    return EarlyStopping(**options)


@dataclass
class ServerTestBench:
    """The server's test set and an evaluation of any model on any data set, for stages
    that measure more than clean accuracy (e.g. a backdoor's success on triggered inputs).
    The run builds it once and hands it to the strategy's stage callbacks."""

    test_set: ArrayDataset
    evaluate: Callable[[np.ndarray, ArrayDataset], dict[str, float]]
