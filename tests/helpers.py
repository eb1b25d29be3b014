"""Small data sets built by hand, run-directory helpers and a plain FedAvg strategy,
shared by the test modules.

Kept apart from ``conftest.py`` because tests call them with arguments (a plain
function reads better than a fixture factory), and importable as ``tests.helpers``
like :mod:`tests.deploy_helpers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.base import PlainServer
from fedloom.client.runtime import ClientRuntime
from fedloom.client_store import ClientState
from fedloom.config import RunConfig, ServerConfig
from fedloom.data.base import ArrayDataset, ClientData, FederatedDataset
from fedloom.engine.simulation import run_simulation
from fedloom.messages import GLOBAL, FitResult, FitTask, Scalar
from fedloom.server.aggregators import MeanAggregator
from fedloom.server.optimizers import make_server_optimizer
from fedloom.server.strategy import Strategy
from fedloom.store import Checkpoint, RunStore
from fedloom.strategies import build_client_runtime, build_learner


def toy_dataset(n: int = 40, clients: int = 2) -> FederatedDataset:
    """``clients`` clients of ``n`` five-feature examples, label = [x0 > 0].

    Separable and tiny, so a trainer fits it in milliseconds and a test that checks
    the training arithmetic (against torch.optim, across runs) is not slowed by data.
    Each client's test split is its first 8 training examples; the global test set is
    their concatenation. Always the same numbers (seed 0).
    """
    rng = np.random.default_rng(0)
    parts = []
    for c in range(clients):
        x = rng.normal(size=(n, 5)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        parts.append(ClientData(c, f"c{c}", ArrayDataset(x, y), ArrayDataset(x[:8], y[:8])))
    test = ArrayDataset.concat([p.test for p in parts if p.test is not None])
    return FederatedDataset("toy", "tabular", parts, test, 2, (5,))


def latest_checkpoint(run_dir: Path) -> Checkpoint:
    """The last checkpoint a run directory holds (there must be one)."""
    with RunStore.open(run_dir) as store:
        ckpt = store.latest_checkpoint()
    assert ckpt is not None
    return ckpt


def final_weights(run_dir: Path) -> np.ndarray:
    """The global model of the run's last checkpoint."""
    return latest_checkpoint(run_dir).tensors["global"]


class InterruptError(Exception):
    """What :func:`interrupt_after` stops a run with, as a crash or Ctrl-C would."""


def interrupt_after(cfg: RunConfig, run_dir: Path, last_round: int) -> None:
    """Run ``cfg`` into ``run_dir`` and stop it with an exception after ``last_round``."""

    def stop(record: dict[str, Any]) -> None:
        if record["round"] == last_round:
            raise InterruptError

    with pytest.raises(InterruptError):
        run_simulation(cfg, run_dir, on_round=stop)


def client_runtime(cfg: RunConfig, data: FederatedDataset) -> ClientRuntime:
    """The client side of ``cfg`` over ``data``, as every engine builds it."""
    learner = build_learner(cfg, data)
    return build_client_runtime(
        cfg, learner, lambda c: data.clients[c], num_clients=data.num_clients
    )


def fit_once(
    runtime: ClientRuntime,
    weights: np.ndarray,
    *,
    client: int,
    round: int,
    config: Mapping[str, Scalar] | None = None,
    state: ClientState | None = None,
) -> FitResult:
    """One fit task of ``client`` in ``round`` from the global model ``weights``."""
    task = FitTask(client_id=client, round=round, model_version=round - 1, config=config or {})
    return runtime.fit(task, {GLOBAL: weights}, ClientState() if state is None else state)


def fedavg_strategy(dimension: int) -> Strategy:
    """Plain FedAvg over ``dimension`` parameters: every client sampled, the example-
    weighted mean, a server step of 1 (the new model is the old one plus the mean)."""
    sampling = ServerConfig(fraction_fit=1.0, min_fit_clients=1, optimizer="sgd", lr=1.0)
    return Strategy(
        algorithm=PlainServer(),
        aggregator=MeanAggregator(),
        optimizer=make_server_optimizer(sampling, dimension),
        sampling=sampling,
        codecs=[],
        min_aggregate_clients=1,
        dimension=dimension,
    )
