"""Asynchronous FedBuff over the gRPC deployment, with real processes of different speeds.

Every wait is on an event: a printed line of the server or a client, a round record in
the run store, a process exit. The slow client is held on its first task by a gate file
that the test opens only once the server has applied three buffers, so "no round
barrier" does not depend on how fast this machine is.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from fedloom.engine.grpc.auth import add_token
from fedloom.store import RunStore

from .deploy_helpers import Proc, fedloom, free_port, set_args, slow_client

SLOW, KILLED = 3, 2


@pytest.mark.slow
def test_fedbuff_deployment_no_barrier_staleness_kill_and_resume(procs, tmp_path: Path) -> None:
    """FedBuff (K = 2) with four client processes: two quick (0.2 s a task), one slower
    (0.6 s), one held on its first task. Buffers are applied while the held client still
    trains its first task; its update, from version 0, is applied with staleness > 0. The
    slower client is killed mid-run: its task in flight is a recorded failure once its
    session times out, and buffers keep being applied. SIGTERM stops the server (clients
    wait), ``--resume`` continues from the last applied buffer: every round recorded once,
    every applied update counted once, no task from before the stop applied after it."""
    tokens = tmp_path / "tokens.txt"
    names = [add_token(tokens, f"site-{i}") for i in range(4)]
    port = free_port()
    address = f"127.0.0.1:{port}"
    out = tmp_path / "run"
    gate = tmp_path / "gate"
    server_args = ["server", "--address", address, "--tokens", str(tokens)]
    sets = [
        "mode=async",
        "async.buffer_size=2",
        "rounds=100000",  # ended by the resume's --set rounds=...
        "data.num_clients=4",
        "server.min_fit_clients=3",
        "client.epochs=1",
        "eval.every=10000",
        "deploy.heartbeat_interval_s=0.5",
        "deploy.heartbeat_timeout_s=4",
        "deploy.poll_timeout_s=1",
        "deploy.wait_for_clients_s=300",
    ]
    server = procs(fedloom(*server_args, "--out", str(out), *set_args(sets)))
    server.wait_for(r"listening on", timeout=300)

    def client(i: int, delay: float, *extra: str) -> Proc:
        args = ["--server", address, "--insecure", "--token", names[i], "--partition", str(i)]
        return procs(slow_client(delay, *args, *extra))

    # The held client registers first, so it is among the first three and trains from
    # version 0 (the server starts at server.min_fit_clients = 3).
    held = client(SLOW, 0.0, "--gate", str(gate))
    held.wait_for(rf"registered as client {SLOW}", timeout=300)
    quick = [client(0, 0.2), client(1, 0.2)]
    slower = client(KILLED, 0.6)
    held.wait_for(r"holding task", timeout=300)

    # No barrier: three buffers applied while the held client is on its first task.
    server.wait_for(r"^round 3:", timeout=300)
    early = _history(out)
    assert len(early) >= 3 and not any(_clients_in(r) & {SLOW} for r in early)

    # Kill the slower client once it contributed; progress goes on without it.
    killed_after = _wait_record(out, lambda r: KILLED in _clients_in(r))
    slower.kill()
    server.wait_for(rf"client {KILLED} \(site-{KILLED}\) lost: no heartbeat", timeout=300)
    lost_at = len(_history(out))
    _wait_record(out, lambda r: r["round"] >= lost_at + 2)
    store = RunStore.open(out)
    try:
        failures = [f for f in store.failures() if f["client_id"] == KILLED]
    finally:
        store.close()
    assert failures and "client lost" in failures[0]["error"]
    assert failures[0]["round"] > killed_after["round"]

    # Open the gate: the held update arrives, stale (from version 0, applied much later).
    gate.write_text("open")
    first = _wait_record(out, lambda r: SLOW in _clients_in(r))
    held_update = next(a for a in first["async_updates"] if a["client"] == SLOW)
    assert held_update["version"] == 0
    assert held_update["staleness"] == first["round"] - 1 >= 3
    assert first["staleness_max"] >= held_update["staleness"] > 0
    assert all(r["staleness_max"] is not None for r in _history(out))

    # Stop to be resumed: the clients wait for the server.
    server.popen.send_signal(signal.SIGTERM)
    assert server.wait(300) == 130, server.output
    assert "Traceback" not in server.output
    for c in [*quick, held]:
        c.wait_for(r"waiting for it to come back", timeout=300)
        assert c.popen.poll() is None
    store = RunStore.open(out)
    try:
        ckpt = store.latest_checkpoint()
        before = store.history()
    finally:
        store.close()
    assert ckpt is not None
    stopped = ckpt.round
    assert stopped >= first["round"]
    final = stopped + 4

    resumed = procs(fedloom(*server_args, "--resume", str(out), *set_args([f"rounds={final}"])))
    assert resumed.wait(300) == 0, resumed.output
    for c in [*quick, held]:
        assert c.wait(300) == 0, c.output
        assert "run over; this client completed" in c.output
    summary = json.loads((out / "summary.json").read_text())
    history = summary["history"]
    assert [r["round"] for r in history] == list(range(1, final + 1))
    # What was applied before the stop is kept as it was; after it, only tasks trained
    # from the checkpointed model or later (tasks in flight at the stop were lost).
    assert history[:stopped] == before[:stopped]
    assert all(a["version"] >= stopped for r in history[stopped:] for a in r["async_updates"])
    assert all(r["clients_succeeded"] == 2 for r in history)
    store = RunStore.open(out)
    try:
        last = store.latest_checkpoint()
    finally:
        store.close()
    assert last is not None and last.round == final
    # Every applied update counted once across the restart.
    assert int(last.tensors["participation"].sum()) == sum(r["clients_succeeded"] for r in history)
    assert summary["final"]["accuracy"] is not None


def _clients_in(record: dict[str, Any]) -> set[int]:
    return {int(a["client"]) for a in record.get("async_updates") or []}


def _history(out: Path) -> list[dict[str, Any]]:
    store = RunStore.open(out)
    try:
        return store.history()
    finally:
        store.close()


def _wait_record(out: Path, match: Any, timeout: float = 240.0) -> dict[str, Any]:
    """The first round record ``match`` accepts, polling the run store (an event: the
    server commits each record)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next((r for r in _history(out) if match(r)), None)
        if found is not None:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no such round record within {timeout} s")
