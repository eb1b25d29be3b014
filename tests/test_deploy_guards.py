"""The guard rails against a real malicious client over gRPC (issue 9, hole 2): an
authenticated ``fedloom client`` process whose every update is a 3e38 vector claiming
10^15 examples. The server rejects it each round with its reason and counts it, the
model stays finite and close to the clean run's, and the honest clients finish."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation
from fedloom.server.guards import NORM_REJECTED
from fedloom.store import RunStore

from .deploy_helpers import fedloom, set_args

SETS = [
    "rounds=2",
    "data.num_clients=3",
    "server.min_fit_clients=3",
    "client.epochs=1",
    "eval.every=2",
    "deploy.heartbeat_interval_s=0.5",
    "deploy.heartbeat_timeout_s=6",
    "deploy.poll_timeout_s=1",
    "deploy.wait_for_clients_s=120",
]


def _final(run: Path) -> tuple[np.ndarray, list[dict], list[dict]]:
    with RunStore.open(run) as store:
        ckpt = store.latest_checkpoint()
        assert ckpt is not None
        return ckpt.tensors["global"], store.history(), store.failures()


def test_a_hostile_client_process_cannot_wreck_the_model(procs, tmp_path: Path) -> None:
    server = procs(
        fedloom(
            "server", "--address", "127.0.0.1:0", "--out", str(tmp_path / "run"), *set_args(SETS)
        )
    )
    port = int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    address = f"127.0.0.1:{port}"
    honest = [
        procs(fedloom("client", "--server", address, "--insecure", "--partition", str(i)))
        for i in (0, 1)
    ]
    hostile = procs(
        fedloom(
            "client",
            "--import",
            "tests.hostile_stages",
            "--server",
            address,
            "--insecure",
            "--partition",
            "2",
        )
    )
    assert server.wait(300) == 0, server.output
    for c in [*honest, hostile]:
        assert c.wait(300) == 0, c.output
    w, history, failures = _final(tmp_path / "run")
    assert np.all(np.isfinite(w)) and float(np.abs(w).max()) < 10.0
    assert [r[NORM_REJECTED] for r in history] == [1, 1]
    assert all(r["aggregated"] and r["clients_succeeded"] == 2 for r in history)
    assert {f["client_id"] for f in failures} == {2}
    assert all("rejected by the guard rails" in f["error"] for f in failures)
    # The clean run: the same experiment with three honest clients (a deployment equals
    # its simulation, tests/test_deploy.py), against which the attacked model is close.
    clean = tmp_path / "clean"
    clean_summary = run_simulation(load_config(None, SETS), clean)
    clean_w, _, _ = _final(clean)
    distance = float(np.linalg.norm(w - clean_w) / np.linalg.norm(clean_w))
    print(
        f"relative L2 distance to the clean run: {distance:.4f}; accuracy "
        f"{history[-1]['accuracy']:.4f} vs {clean_summary['final']['accuracy']:.4f}"
    )
    assert distance < 0.3, distance
    accuracy = history[-1]["accuracy"]
    assert accuracy > clean_summary["final"]["accuracy"] - 0.15
