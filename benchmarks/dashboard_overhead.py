"""Does serving the live dashboard slow a deployment's rounds? 200 clients, with and without.

Run: ``python benchmarks/dashboard_overhead.py`` (about 3 minutes on 2 busy cores) or
``--rounds/--clients/--pairs`` to change the size. Everything runs in this process on
127.0.0.1 on free ports, and every thread and server it starts is stopped before it exits.

Workload: a real ``run_server`` deployment (gRPC, the default ``[deploy]`` settings) of
the built-in digits experiment with ``--clients`` clients, each a ``run_client`` thread
of this process (a ``RuntimeApp`` over the shared data set, so set-up does not build it
200 times), every client sampled every round, one local epoch of the default logistic
regression. "With" serves the dashboard in the server process exactly as
``fedloom server --dashboard`` does (its own thread, the run store re-read when it
changes, the session registry's status snapshot every second) and keeps one
browser-like client connected to its event stream, reading and parsing every event.

Measured: a round's time is the gap between consecutive round records in the run store
(``recorded_at``); round 1 (which includes waiting for the clients) is left out, and the
median of the remaining rounds is taken per run. Runs alternate without / with / with /
without (ABBA, ``--pairs`` times) so that a shared VM's changing load falls on both
alike; the table gives each run's median and the ratio of the medians of all rounds of
each kind. The 1-minute load average is printed because other work changes every number.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedloom.config import RunConfig, load_config  # noqa: E402
from fedloom.store import RunStore  # noqa: E402


def make_config(clients: int, rounds: int) -> RunConfig:
    return load_config(
        None,
        [
            f"rounds={rounds}",
            f"data.num_clients={clients}",
            f"server.min_fit_clients={clients}",
            "client.epochs=1",
            "deploy.wait_for_clients_s=600",
            "deploy.max_workers=256",
        ],
    )


class SharedDataApps:
    """``RuntimeApp``s of the experiment's data set, built once for every client thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: Any = None

    def __call__(self, cfg: RunConfig, client_id: int) -> Any:
        from fedloom.data import build_federated_dataset
        from fedloom.engine.grpc.client import RuntimeApp
        from fedloom.strategies import build_client_runtime, build_learner

        with self._lock:
            if self._data is None:
                self._data = build_federated_dataset(cfg.data, cfg.seed)
            data = self._data
            runtime = build_client_runtime(
                cfg,
                build_learner(cfg, data),
                lambda cid: data.clients[cid],
                num_clients=data.num_clients,
            )
        return RuntimeApp(runtime, client_id)


class EventReader:
    """A browser-like reader of the dashboard's event stream: reads and parses each event."""

    def __init__(self, port: int) -> None:
        self.events = 0
        self.closing = False
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            self.conn.request("GET", "/events", headers={"Accept": "text/event-stream"})
            resp = self.conn.getresponse()
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.startswith(b"data: "):
                    json.loads(line[6:])
                    self.events += 1
        except (OSError, http.client.HTTPException):
            return
        except AttributeError:  # the connection was closed under the reading thread
            if not self.closing:
                raise

    def close(self) -> None:
        self.closing = True
        self.conn.close()
        self.thread.join(timeout=10)


def one_run(cfg: RunConfig, out_dir: Path, *, dashboard: bool) -> tuple[list[float], int]:
    """Round durations (rounds 2..R) of one deployment run; events the reader parsed."""
    from fedloom.cli.dashboard import ServerDashboard
    from fedloom.engine.deploy import ServerSecurity, run_server
    from fedloom.engine.grpc.client import Credentials, run_client

    listening = threading.Event()
    port: list[int] = []
    dash = ServerDashboard(out_dir, "127.0.0.1:0", None) if dashboard else None
    reader = EventReader(dash.server.port) if dash is not None else None
    errors: list[BaseException] = []

    def serve() -> None:
        def on_listening(p: int) -> None:
            port.append(p)
            listening.set()

        try:
            run_server(
                cfg,
                out_dir,
                "127.0.0.1:0",
                ServerSecurity(),
                on_listening=on_listening,
                on_registry=dash.on_registry if dash is not None else None,
            )
        except BaseException as err:  # reported below
            errors.append(err)
            listening.set()

    apps = SharedDataApps()
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    listening.wait(600)
    if errors:
        raise errors[0]
    creds = Credentials(insecure=True)
    clients = [
        threading.Thread(
            target=run_client,
            args=(f"127.0.0.1:{port[0]}", apps, creds),
            kwargs={"partition": i, "max_wait_s": 600},
            daemon=True,
        )
        for i in range(cfg.data.num_clients)
    ]
    for c in clients:
        c.start()
    server.join(timeout=3600)
    for c in clients:
        c.join(timeout=60)
    events = 0
    if reader is not None:
        events = reader.events
        reader.close()
    if dash is not None:
        dash.stop()
    if errors:
        raise errors[0]
    with RunStore.open(out_dir) as store:
        times = [t for _, t in store.round_times()]
    return [b - a for a, b in itertools.pairwise(times)], events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=1, help="ABBA blocks (default 1)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    import logging

    logging.getLogger("fedloom").setLevel(logging.ERROR)
    cfg = make_config(args.clients, args.rounds)
    rows: list[tuple[str, float, int, int]] = []
    kinds: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="fedloom-dash-bench-") as tmp:
        order = [False, True, True, False] * args.pairs
        for i, on in enumerate(order):
            print(f"run {i + 1}/{len(order)}: dashboard {'on' if on else 'off'}", file=sys.stderr)
            durations, events = one_run(cfg, Path(tmp) / f"run{i}", dashboard=on)
            kinds[on].extend(durations)
            rows.append(
                ("with" if on else "without", statistics.median(durations), len(durations), events)
            )
    load = os.getloadavg()[0]
    print(
        f"\n{args.clients} clients, {args.rounds} rounds a run, load average {load:.1f}, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}\n"
    )
    print("| run | dashboard | median s/round | rounds timed | events read |")
    print("|---|---|---|---|---|")
    for i, (kind, med, n, events) in enumerate(rows):
        print(f"| {i + 1} | {kind} | {med:.3f} | {n} | {events if kind == 'with' else '—'} |")
    off, on = statistics.median(kinds[False]), statistics.median(kinds[True])
    print(
        f"\nmedian s/round: without {off:.3f}, with {on:.3f}; ratio with/without "
        f"{on / off:.3f} ({(on / off - 1) * 100:+.1f} %)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
