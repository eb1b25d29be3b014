"""Models built by several threads at once get the same initial weights as one built
alone: construction seeds torch's process-wide generator, so builds must not overlap
(clients run as threads of one process in deployments and their tests)."""

from __future__ import annotations

import threading

import torch

from fedloom.client.models import build_model
from fedloom.config import load_config
from fedloom.data import build_federated_dataset


def test_concurrent_builds_equal_a_lone_build() -> None:
    cfg = load_config(None, ["data.num_clients=2", "model.name='mlp'"])
    data = build_federated_dataset(cfg.data, cfg.seed)
    reference = [p.detach().clone() for p in build_model(cfg.model, data, 7).parameters()]
    threads, start = 8, threading.Barrier(8)
    built: list[list[torch.Tensor]] = []
    lock = threading.Lock()

    def build() -> None:
        start.wait()
        for _ in range(5):
            params = [p.detach().clone() for p in build_model(cfg.model, data, 7).parameters()]
            with lock:
                built.append(params)

    workers = [threading.Thread(target=build) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(300)
    assert len(built) == threads * 5
    for params in built:
        assert all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))
