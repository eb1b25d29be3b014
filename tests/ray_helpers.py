"""A two-node Ray cluster on this machine, and a runtime that kills its own actor.

Both are used by ``tests/test_ray.py``. The cluster's processes run with this checkout's
``src`` and the repository root on ``PYTHONPATH``, so actors import this fedloom and
this module (for :func:`dying_runtime`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fedloom
from fedloom.client.runtime import ClientRuntime
from fedloom.client_store import ClientState
from fedloom.messages import Broadcast, FitTask

REPO = Path(__file__).resolve().parents[1]
STARTED = "Ray runtime started"
START_TIMEOUT_S = 180.0
START_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TwoNodeCluster:
    """``ray start --head`` and one ``ray start --address`` worker node, 1 CPU each.

    Each node runs with ``--block`` in its own process group, so stopping it (SIGTERM to
    the group) takes down every process that node started, and nothing else.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fl-ray-"))  # short: Ray's socket paths
        self.port = 0  # the head's GCS port and address, chosen by start()
        self.address = ""
        self.nodes: list[subprocess.Popen[str]] = []
        self.failures: list[str] = []  # the output of nodes that exited before starting
        self.env = dict(os.environ)
        src = Path(fedloom.__file__).resolve().parents[1]
        self.env["PYTHONPATH"] = os.pathsep.join([str(src), str(REPO)])
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Said explicitly for both nodes: from Ray 2.60 a head started without it turns on
        # token authentication when ~/.ray/auth_token exists (any local ``ray.init()``
        # writes one), while a joining node stays without, and the GCS refuses it.
        self.env["RAY_AUTH_MODE"] = "disabled"

    def _ray(self) -> str:
        return str(Path(sys.executable).with_name("ray"))

    def _start(self, name: str, *args: str) -> bool:
        """Starts one node; True once it says it started, False if it exited first.

        A node that exits before starting is stopped and its output kept in
        ``self.failures``, not raised: :meth:`start` decides whether to try again (the
        ports :func:`free_port` hands out are only known to be free when it looks).
        """
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [
                self._ray(),
                "start",
                *args,
                "--num-cpus=1",
                "--object-store-memory=100000000",
                "--node-ip-address=127.0.0.1",
                f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={self.root / name}",
                "--disable-usage-stats",
                "--block",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        self.nodes.append(proc)
        started = threading.Event()
        ended = threading.Event()

        def drain() -> None:  # keeps the pipe from filling up while the node runs
            assert proc.stdout is not None
            with log:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if STARTED in line:
                        started.set()
            ended.set()

        threading.Thread(target=drain, daemon=True).start()
        # Whichever comes first: the node says it started, its output ends, or 3 minutes.
        deadline = time.monotonic() + START_TIMEOUT_S
        while not started.wait(timeout=1.0):
            if ended.is_set() or time.monotonic() > deadline:
                self._stop_node(proc)
                self.failures.append(f"--- {log.name} ---\n{_tail(Path(log.name))}")
                return False
        return True

    def start(self) -> TwoNodeCluster:
        """Head, then worker; if either exits before starting, both are stopped and the
        pair starts again on fresh ports (a worker that cannot join its head will not
        join it on a second try either), up to ``START_ATTEMPTS`` times."""
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            self.address = f"127.0.0.1:{self.port}"
            head = [
                "--head",
                f"--port={self.port}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=false",
            ]
            if self._start(f"head-{attempt}", *head):
                if self._start(f"worker-{attempt}", f"--address={self.address}"):
                    return self
                logs = self.root / f"head-{attempt}" / "session_latest" / "logs"
                for gcs_log in sorted(logs.glob("gcs_server.*")):
                    self.failures.append(f"--- the head's {gcs_log.name} ---\n{_tail(gcs_log, 20)}")
            self.stop(remove=False)
        raise RuntimeError(
            f"the two-node Ray cluster did not start in {START_ATTEMPTS} attempts; the "
            "output of the nodes that exited:\n" + "\n".join(self.failures)
        )

    @staticmethod
    def _stop_node(proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def stop(self, *, remove: bool = True) -> None:
        # One node at a time, the worker before the head: a worker node whose head is gone
        # first waits a minute for it to come back before it exits.
        for proc in reversed(self.nodes):
            self._stop_node(proc)
        self.nodes = []
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def dying_runtime(
    factory: Callable[[], ClientRuntime], marker: str, client_id: int, round: int
) -> ClientRuntime:
    """The factory's runtime, except that the first actor to train ``client_id`` in
    ``round`` kills its own process with SIGKILL (as the OOM killer would) before
    answering. ``marker`` (created exclusively) makes it happen once per run; it holds the
    pid of the process that died."""
    runtime = factory()
    fit = runtime.fit

    def fit_or_die(task: FitTask, broadcast: Broadcast, state: ClientState) -> Any:
        if task.client_id == client_id and task.round == round:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return fit(task, broadcast, state)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        return fit(task, broadcast, state)

    runtime.fit = fit_or_die  # type: ignore[method-assign]
    return runtime
