"""Helpers for the deployment tests: start servers and clients, read their output.

Also runnable as ``python -m tests.deploy_helpers`` to start a *slow* client (a built-in
client whose every task sleeps first): the straggler and kill-mid-round drills need
one, and the real CLI client has no such knob on purpose.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedloom.config import RunConfig
    from fedloom.engine.grpc.auth import TokenStore
    from fedloom.engine.grpc.server import DeployOptions, Registry

ROOT = Path(__file__).resolve().parents[1]


#: The names a development server certificate is issued for: every test serves on loopback.
LOOPBACK_NAMES = ["localhost", "127.0.0.1"]


def dev_certs(out: Path, identities: Sequence[str]) -> Path:
    """A development PKI in ``out`` (as ``fedloom certs`` writes it): the CA, a server
    certificate for :data:`LOOPBACK_NAMES` and one client certificate per identity (its
    common name). Returns ``out``."""
    from fedloom.engine.grpc.certs import make_dev_certs

    make_dev_certs(out, LOOPBACK_NAMES, list(identities))
    return out


def tls_server_args(certs: Path) -> list[str]:
    """A serving command's TLS arguments: the dev PKI's server certificate and key."""
    return ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]


def mtls_server_args(certs: Path) -> list[str]:
    """:func:`tls_server_args` plus ``--client-ca``: callers must show a certificate of
    the dev CA, whose common name is their identity (mutual TLS)."""
    return [*tls_server_args(certs), "--client-ca", str(certs / "ca.pem")]


def mtls_client_args(certs: Path, identity: str) -> list[str]:
    """A dialling command's mutual-TLS arguments: trust the dev CA, prove ``identity``."""
    return [
        "--root-cert",
        str(certs / "ca.pem"),
        "--cert",
        str(certs / f"{identity}.pem"),
        "--key",
        str(certs / f"{identity}.key"),
    ]


def set_args(overrides: Sequence[str]) -> list[str]:
    """``--set KEY=VALUE`` arguments for a CLI command, one pair per override."""
    return [a for o in overrides for a in ("--set", o)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process whose combined output is collected by a reader thread."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = regex.search(line)
                if m:
                    return m
            if self.popen.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"'{pattern}' not seen within {timeout} s; output:\n{self.output}")

    def wait(self, timeout: float = 120.0) -> int:
        code = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


def num_parameters(cfg: RunConfig) -> int:
    """The size of the experiment's model vector (what a server's Registry is built with)."""
    from fedloom.data import build_federated_dataset
    from fedloom.strategies import build_learner

    return build_learner(cfg, build_federated_dataset(cfg.data, cfg.seed)).binding.spec.size


@contextmanager
def serving(
    registry: Registry,
    options: DeployOptions | None = None,
    tokens: TokenStore | None = None,
    max_workers: int = 4,
) -> Iterator[int]:
    """A plaintext gRPC server for ``registry`` on a free loopback port, in this process.

    Yields the port; the server stops when the block ends.
    """
    from fedloom.engine.grpc.server import DeployOptions, FederationServicer, start_grpc_server

    servicer = FederationServicer(registry, options or DeployOptions(), tokens)
    server, port = start_grpc_server(servicer, "127.0.0.1:0", None, max_workers=max_workers)
    try:
        yield port
    finally:
        server.stop(0).wait(5)


def fedloom(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedloom.cli", *args]


def slow_client(delay_s: float, *args: str) -> list[str]:
    return [sys.executable, "-m", "tests.deploy_helpers", "--delay", str(delay_s), *args]


def key_guarded_server(*args: str) -> list[str]:
    """``fedloom server ARGS`` in a process where TenSEAL cannot hold a secret key.

    Creating a key pair (``tenseal.context``) raises, and every context loaded from
    bytes is checked for a secret key; at exit the process prints how many public
    contexts it loaded and how many held a secret key, for the test to assert.
    """
    return [sys.executable, "-m", "tests.deploy_helpers", "--key-guarded-server", *args]


def _key_guarded_server_main(argv: list[str]) -> int:
    import tenseal

    from fedloom.cli import main

    loaded = {"public": 0, "secret": 0}
    original = tenseal.context_from

    def no_keygen(*_: object, **__: object) -> None:
        raise RuntimeError("the server process tried to create a CKKS key pair")

    def checked(data: bytes, *a: object, **k: object) -> object:
        context = original(data, *a, **k)
        loaded["secret" if context.has_secret_key() else "public"] += 1
        return context

    tenseal.context = no_keygen  # type: ignore[assignment]
    tenseal.context_from = checked  # type: ignore[assignment]
    try:
        code = main(argv)
    finally:
        print(
            f"contexts loaded: {loaded['public']} public, {loaded['secret']} with a secret key",
            flush=True,
        )
    return code


def _slow_main() -> int:
    from fedloom.engine.grpc.client import BuiltinApp, Credentials, run_client
    from fedloom.messages import FitResult, FitTask

    p = argparse.ArgumentParser()
    p.add_argument("--delay", type=float, required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--root-cert", type=Path)
    p.add_argument("--token", default="")
    p.add_argument("--partition", type=int, required=True)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--secagg-stall", default="", help="stage at which to announce and stall")
    p.add_argument("--he-stall", action="store_true", help="announce and stall at CKKS encrypt")
    p.add_argument("--state-dir", type=Path, help="as 'fedloom client --state-dir'")
    p.add_argument(
        "--gate",
        type=Path,
        help="hold the first fit task until this file exists (announced when it starts)",
    )
    args = p.parse_args()

    if args.he_stall:
        from fedloom.privacy import he_protocol

        original_encrypt = he_protocol.encrypt_for_round

        def stalling_encrypt(update: np.ndarray, payload: bytes) -> bytes:
            print("ckks encrypt stage reached", flush=True)
            time.sleep(60)
            return original_encrypt(update, payload)

        he_protocol.encrypt_for_round = stalling_encrypt  # type: ignore[assignment]

    if args.secagg_stall:
        from fedloom.privacy.secagg import Stage
        from fedloom.privacy.secagg.transport import SecAggParticipant

        original = SecAggParticipant.respond

        def stalling(self: SecAggParticipant, stage: Stage, payload: bytes) -> bytes:
            if stage.value == args.secagg_stall:
                print(f"secagg stage {stage.value} reached", flush=True)
                time.sleep(60)
            return original(self, stage, payload)

        SecAggParticipant.respond = stalling  # type: ignore[method-assign]

    class SlowApp(BuiltinApp):
        def fit(self, task: FitTask, broadcast: dict[str, np.ndarray]) -> FitResult:
            if args.gate is not None and not args.gate.exists():
                print(f"holding task {task.round} until the gate opens", flush=True)
                while not args.gate.exists():
                    time.sleep(0.05)
            time.sleep(args.delay)
            return super().fit(task, broadcast)

    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    creds = Credentials(root_cert=args.root_cert, token=args.token, insecure=args.insecure)
    done = run_client(
        args.server,
        SlowApp,
        creds,
        partition=args.partition,
        max_wait_s=60,
        state_dir=args.state_dir,
    )
    print(f"run over; this client completed {done} tasks", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--key-guarded-server"]:
        sys.exit(_key_guarded_server_main(sys.argv[2:]))
    sys.exit(_slow_main())


def federate_in_threads(
    serve: Callable[[Callable[[int], None]], dict[str, Any]],
    clients: Sequence[Callable[[str], Any]],
    timeout_s: float = 600.0,
) -> tuple[dict[str, Any], list[Any]]:
    """Run a server and its clients in threads of this process; (summary, client results).

    ``serve(on_listening)`` runs the server until its last round; each client is called
    with ``HOST:PORT`` once the server listens (the event, never a sleep). Fails if the
    server does not listen, or it or a client does not finish, within ``timeout_s``.
    """
    port: list[int] = []
    listening = threading.Event()
    summary: dict[str, Any] = {}
    results: list[Any] = []

    def on_listening(p: int) -> None:
        port.append(p)
        listening.set()

    server = threading.Thread(target=lambda: summary.update(serve(on_listening)), daemon=True)
    server.start()
    assert listening.wait(timeout_s), "the server did not start listening"
    workers = [
        threading.Thread(target=lambda c=c: results.append(c(f"127.0.0.1:{port[0]}")), daemon=True)
        for c in clients
    ]
    for w in workers:
        w.start()
    server.join(timeout=timeout_s)
    for w in workers:
        w.join(timeout=timeout_s)
    assert not server.is_alive(), "the server did not finish"
    assert len(results) == len(clients), "a client did not finish"
    return summary, results
