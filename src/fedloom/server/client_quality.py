"""Model quality across the client population: the spread of per-client accuracy.

A federated mean accuracy can hide clients the model fails: on non-IID data (a
Dirichlet split with small α) a few clients with rare classes sit far below the mean.
This callback keeps every evaluated client's accuracy from the round's federated
evaluation (the results :class:`~fedloom.server.callbacks.Evaluation` leaves in
``RunContext.eval_results``) and writes, in each round that evaluated:

* ``client_accuracies``: client id → accuracy on its own test set;
* ``client_accuracy_mean``: the plain mean over clients (each client counts once, unlike
  ``fed_accuracy``, which weights by test examples);
* ``client_accuracy_worst10``: the mean of the ⌈n / 10⌉ lowest accuracies of the n
  evaluated clients (at least one client): the worst 10 %;
* ``client_accuracy_std``: the population standard deviation over clients.

Under secure aggregation without ``privacy.reveal_client_metrics`` a per-client number
describes one client's data, which the deployment chose to hide: the callback records
none of them and says why in the run store's meta ``client_quality`` (copied into
``summary.json``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedloom.callbacks import Callback, RunContext
from fedloom.messages import EvalResult
from fedloom.registry import CALLBACKS

ACCURACY = "accuracy"
#: Share of the evaluated clients whose mean is the "worst" figure.
WORST_SHARE = 0.1


def client_quality(accuracies: Sequence[float]) -> dict[str, float]:
    """Mean, worst-10 % mean and population std of per-client accuracies (empty: {})."""
    values = np.sort(np.asarray(accuracies, dtype=np.float64))
    if values.size == 0:
        return {}
    worst = max(1, math.ceil(WORST_SHARE * values.size))
    return {
        "client_accuracy_mean": float(values.mean()),
        "client_accuracy_worst10": float(values[:worst].mean()),
        "client_accuracy_std": float(values.std()),
    }


class ClientQuality(Callback):
    """Per-client accuracies and their spread in each evaluated round (module docstring).

    ``hidden``: why per-client metrics are withheld in this run (None: they are not).
    """

    def __init__(self, *, hidden: str | None = None) -> None:
        self.hidden = hidden

    def on_run_start(self, run: RunContext) -> None:
        if self.hidden is not None and run.store is not None:
            run.store.set_meta("client_quality", {"available": False, "reason": self.hidden})

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        if self.hidden is not None:
            return
        per_client = {
            int(r.client_id): float(r.metrics[ACCURACY])
            for r in run.eval_results
            if isinstance(r, EvalResult) and ACCURACY in r.metrics
        }
        if not per_client:
            return
        record["client_accuracies"] = {str(c): round(a, 6) for c, a in sorted(per_client.items())}
        record.update(client_quality(list(per_client.values())))


def hidden_reason(*, secure_aggregation: str, reveal_client_metrics: bool) -> str | None:
    """Why a run withholds per-client metrics, in one line (None: it does not)."""
    if secure_aggregation == "none" or reveal_client_metrics:
        return None
    return (
        f"per-client accuracies are not recorded: secure aggregation ('{secure_aggregation}') "
        "hides per-client metrics unless privacy.reveal_client_metrics = true"
    )


@CALLBACKS.register("client-quality")
def make_client_quality(options: dict[str, Any]) -> ClientQuality:
    hidden = options.get("hidden")
    return ClientQuality(hidden=hidden if isinstance(hidden, str) else None)
