"""The process-pool engine survives a worker that dies."""

import os
import signal

import numpy as np

from fedloom.config import load_config
from fedloom.data import build_federated_dataset
from fedloom.engine.pool import ProcessPoolExecutor
from fedloom.messages import ClientFailure, FitResult, FitTask


def test_killed_worker_costs_at_most_its_task() -> None:
    cfg = load_config(None, ["data.num_clients=6", "client.epochs=1"])
    sizes = build_federated_dataset(cfg.data, cfg.seed).client_sizes().tolist()
    pool = ProcessPoolExecutor(cfg, sizes, workers=2)
    try:
        w0 = np.zeros(pool.size, np.float32)
        tasks = [FitTask(c, 1) for c in range(6)]
        first = pool.fit(tasks, w0)
        assert all(isinstance(o, FitResult) for o in first)

        os.kill(pool.workers[0].process.pid, signal.SIGKILL)
        pool.workers[0].process.join(timeout=10)
        again = pool.fit([FitTask(c, 2) for c in range(6)], w0)
        assert [o.client_id for o in again] == list(range(6))
        failures = [o for o in again if isinstance(o, ClientFailure)]
        assert len(failures) <= 1
        assert all("died" in f.error for f in failures)
        assert sum(isinstance(o, FitResult) for o in again) >= 5
    finally:
        pool.close()
