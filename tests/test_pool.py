"""The process-pool engine survives a worker that dies."""

import os
import signal
from functools import partial

import numpy as np

from fedloom.client_store import ClientStateStore
from fedloom.config import load_config
from fedloom.data import build_federated_dataset
from fedloom.engine.pool import ProcessPoolExecutor
from fedloom.messages import GLOBAL, ClientFailure, FitResult, FitTask
from fedloom.strategies import simulation_runtime


def _tasks(rnd: int) -> list[FitTask]:
    return [FitTask(client_id=c, round=rnd, model_version=rnd - 1) for c in range(6)]


def test_killed_worker_costs_at_most_its_task() -> None:
    cfg = load_config(None, ["data.num_clients=6", "client.epochs=1"])
    sizes = build_federated_dataset(cfg.data, cfg.seed).client_sizes().tolist()
    factory = partial(simulation_runtime, cfg.model_dump_json())
    pool = ProcessPoolExecutor(factory, sizes, ClientStateStore(), workers=2)
    try:
        broadcast = {GLOBAL: np.zeros(pool.size, np.float32)}
        first = pool.fit(_tasks(1), broadcast)
        assert all(isinstance(o, FitResult) for o in first)

        os.kill(pool.workers[0].process.pid, signal.SIGKILL)
        pool.workers[0].process.join(timeout=10)
        again = pool.fit(_tasks(2), broadcast)
        assert [o.client_id for o in again] == list(range(6))
        failures = [o for o in again if isinstance(o, ClientFailure)]
        assert len(failures) <= 1
        assert all("died" in f.error for f in failures)
        assert sum(isinstance(o, FitResult) for o in again) >= 5
    finally:
        pool.close()
