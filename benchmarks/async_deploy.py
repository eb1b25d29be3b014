"""Synchronous FedAvg against FedBuff over the real gRPC deployment, one slow client.

A ``fedloom server`` on loopback and three client processes on the digits experiment
(one partition each): two answer a task after 0.1 s of added delay, one after
``--slow-s`` (the test helper's slow client, ``python -m tests.deploy_helpers``; the
real CLI client has no delay knob). Both runs use the same number of client updates:
synchronous rounds of all three (each waits for the slow client) against FedBuff steps
of K = 2 (no barrier). Compared on wall time from the first step's record to the last
(the first step also waits for the processes to start) with the client updates applied
in that time, and on final accuracy.

    .venv/bin/python benchmarks/async_deploy.py [--updates 30] [--slow-s 1.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.deploy_helpers import Proc, fedloom, free_port, set_args, slow_client  # noqa: E402

from fedloom.store import RunStore  # noqa: E402

COMMON = [
    "data.num_clients=3",
    "server.min_fit_clients=3",
    "client.epochs=1",
    "deploy.heartbeat_interval_s=0.5",
    "deploy.poll_timeout_s=1",
]


def run(mode: list[str], delays: list[float], out: Path) -> dict[str, Any]:
    address = f"127.0.0.1:{free_port()}"
    server = Proc(fedloom("server", "--address", address, "--out", str(out), *set_args(mode)))
    clients: list[Proc] = []
    try:
        server.wait_for("listening on", timeout=300)
        for i, delay in enumerate(delays):
            args = ["--server", address, "--insecure", "--partition", str(i)]
            clients.append(Proc(slow_client(delay, *args)))
        if server.wait(1200) != 0:
            raise RuntimeError(server.output)
        for c in clients:
            c.wait(300)
    finally:
        for p in [server, *clients]:
            p.kill()
    summary = json.loads((out / "summary.json").read_text())
    history = summary["history"]
    store = RunStore.open(out)
    try:
        times = [t for _, t in store.round_times()]
    finally:
        store.close()
    # From the first step's record to the last: the first step also waits for the
    # clients to start (torch import), which is no part of training.
    span = times[-1] - times[0]
    after_first = sum(r["clients_succeeded"] for r in history[1:])
    return {
        "server_steps": len(history),
        "client_updates": sum(r["clients_succeeded"] for r in history),
        "s_after_first_step": round(span, 2),
        "updates_per_s_after_first_step": round(after_first / span, 2),
        "final_accuracy": summary["final"]["accuracy"],
        "staleness_max": max((r.get("staleness_max") or 0) for r in history),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=30, help="client updates per run")
    p.add_argument("--slow-s", type=float, default=1.5)
    args = p.parse_args()
    delays = [0.1, 0.1, args.slow_s]
    variants = {
        "sync FedAvg (3 per round)": ["mode=sync", f"rounds={args.updates // 3}"],
        "FedBuff (K = 2)": ["mode=async", "async.buffer_size=2", f"rounds={args.updates // 2}"],
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in variants.items():
            results[name] = run([*COMMON, *sets], delays, Path(tmp) / name.split()[0])
            print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
