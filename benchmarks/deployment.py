"""Deployment speed: fedloom's gRPC transport against raw sockets (the floor), on loopback.

Run: ``python benchmarks/deployment.py`` (about 3 minutes on 2 idle cores; at most 8) or
``--quick`` (10M parameters, 50 clients; under a minute); ``--parts a`` runs only part (a)
(``b``, ``c``, or any combination, likewise). Everything runs on 127.0.0.1
on free ports; every process, thread and socket the script starts is stopped before it
exits. It prints one Markdown table (the README's deployment table) on stdout, progress
on stderr.

(a) **Transfer throughput.** One round with one client: the server sends a
    100M-parameter float32 vector (400 MB) to the client, whose app returns the vector it
    received as its update (no compute), and the server receives 400 MB back. Timed is
    ``GrpcExecutor.fit`` in the server process, end to end (encode, stream, client
    decode and encode, receive, length and finiteness checks): 800 MB moved. fedloom
    runs with TLS (1 MiB chunks, the default, and 4 MiB) and, for reference, plaintext.
    Contenders that show what the bytes cost without fedloom:

    * **raw TCP socket (the floor)**: the same bytes server -> client -> server with
      ``sendall`` / ``recv_into`` into buffers allocated before the clock starts;
    * **raw TLS socket**: the same through Python's ``ssl`` with the same certificates;
    * **bare grpcio streams over TLS** (the transport's floor): a server-streaming call
      of pre-cut 1 MiB messages down and a client-streaming call of the same objects
      back, copied once into a preallocated buffer; no protobuf, no fedloom code. Its
      server is a process of its own, so its peak memory (the vector to send, one
      receive buffer, and what grpcio holds in flight) is the floor for fedloom's.

    The receiving side is always a separate process that takes the whole vector before
    sending it back, as a fedloom client does. Every contender does one untimed warm-up
    copy, then N timed ones; the best is reported (and the median). Connection set-up
    and TLS handshakes are outside every timing. Peak memory is VmHWM from
    ``/proc/self/status`` above each process's RSS after its imports.
(b) **Many clients.** One server process (``--role server``, measured alone: its
    ``/proc`` VmRSS/VmHWM and CPU time) and N lightweight clients as threads, 50 per
    client process (``run_client`` with an app that echoes a 10,000-parameter vector; no
    torch work). Every round samples every client. Reported: rounds per second after one
    warm-up round, server CPU per round, the server's memory before any client connects
    and at its peak, its CPU while the clients only poll and send heartbeats, and every
    failed client-round, rejected message and re-registration (signs of starvation).
    The client processes share the same cores, so this is the whole system's rate.
    **The fleet** (``--fleet``, default 2,000; none with ``--quick``): that many clients
    connected at once, all heartbeating (``--fleet-heartbeat-s``, default 1 s as in
    ``[deploy]``; gRPC Python spends about 0.3-0.6 ms of server CPU per call here, so a
    longer interval frees most of a core), 100 sampled per round (a seeded draw per
    round). Its clients are coroutines speaking the wire protocol over their own TLS
    connections, 500 per process (``--role fleet``): the same calls a ``run_client``
    makes, without its two threads per client, which on two cores would starve the
    server being measured. Also reported: the server's memory per idle connected client
    (VmRSS with every client connected, before any round, minus before the first one,
    over the clients). Any honest client-round that fails, any client lost or refused,
    and the fleet reports no numbers.
(c) **Protocol overhead.** The same one-client round through a byte-counting TCP proxy
    (in the server process) between client and server: bytes in the TCP streams (TLS
    records, HTTP/2 frames, gRPC and protobuf framing, plus the heartbeats and polls
    during the round) divided by the raw vector bytes, down + up (2 x 4 bytes x
    parameters). TCP/IP headers are not counted. Also the idle traffic of one connected
    client (a heartbeat every 1 s, the long poll renewed every 5 s) and the connection
    set-up bytes (TLS handshake, HTTP/2 preface, Register).

Why it is fair: fedloom and the floors move the same bytes over the same loopback
between two processes in the same order, with the same certificates, on the same
machine in the same invocation, and the fedloom server runs with the ``[deploy]``
defaults ``fedloom server`` uses (256 worker threads, 1 s heartbeats, 5 s long polls).
The floors are what no protocol can beat here; the ratios say what fedloom's framing,
chunking and copies cost on top. Both sides are Python, so are the floors' (the kernel
and the TLS library do their copying; Python only loops). The 1-minute load average is
printed because other work on the machine changes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from fedloom.config import RunConfig
    from fedloom.messages import EvalResult, EvalTask, FitResult, FitTask

HOST = "127.0.0.1"
MB = 1e6
MiB = 1 << 20
SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]


# --- /proc readings --------------------------------------------------------------------------


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes, from ``/proc/PID/status``."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def proc_cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- child processes -------------------------------------------------------------------------


class Proc:
    """A child process of this script; a reader thread collects its combined output."""

    def __init__(self, role: str, args: Sequence[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--role", role, *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.role = role
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := regex.search(line):
                    return m
            if self.popen.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        tail = "\n".join(self.lines[-40:])
        raise RuntimeError(f"{self.role}: '{pattern}' not seen within {timeout:.0f} s:\n{tail}")

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._reader.join(timeout=5)


# --- raw socket floor ------------------------------------------------------------------------


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, total = 0, len(view)
    while got < total:
        n = sock.recv_into(view[got:], min(total - got, 4 * MiB))
        if n == 0:
            raise ConnectionError(f"peer closed after {got} of {total} bytes")
        got += n


def raw_floor(payload: bytes, certs: Path | None, repeats: int) -> tuple[list[float], str]:
    """Seconds per server → client → server copy of ``payload``; TLS when ``certs`` is set."""
    back = bytearray(len(payload))
    view = memoryview(back)
    with socket.create_server((HOST, 0)) as listener:
        listener.settimeout(60)
        port = listener.getsockname()[1]
        args = ["--port", str(port), "--nbytes", str(len(payload)), "--repeats", str(repeats)]
        if certs is not None:
            args += ["--ca", str(certs / "ca.pem")]
        child = Proc("echo", args)
        try:
            raw, _ = listener.accept()
            raw.settimeout(120)
            conn: socket.socket = raw
            cipher = "none"
            if certs is not None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
                conn = ctx.wrap_socket(raw, server_side=True)
                c = conn.cipher() if isinstance(conn, ssl.SSLSocket) else None
                cipher = f"{c[1]} {c[0]}" if c else "?"
            times = []
            with conn:
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    conn.sendall(payload)
                    recv_exact(conn, view)
                    times.append(time.perf_counter() - t0)
            if back != payload:
                raise RuntimeError("raw copy returned different bytes")
            if child.wait(60) != 0:
                raise RuntimeError("echo child failed:\n" + "\n".join(child.lines[-20:]))
            return times, cipher
        finally:
            child.stop()


def _echo_main(args: argparse.Namespace) -> int:
    buf = bytearray(args.nbytes)
    view = memoryview(buf)
    raw = socket.create_connection((HOST, args.port), timeout=60)
    raw.settimeout(120)
    conn: socket.socket = raw
    if args.ca:
        ctx = ssl.create_default_context(cafile=args.ca)
        conn = ctx.wrap_socket(raw, server_hostname=HOST)
    with conn:
        for _ in range(args.repeats):
            recv_exact(conn, view)
            conn.sendall(view)
    return 0


# --- bare grpcio floor -----------------------------------------------------------------------

GRPC_FLOOR = "/bench.Copy/"


def grpc_floor(
    params: int, certs: Path, chunk_bytes: int, repeats: int
) -> tuple[list[float], float]:
    """Seconds per round trip through bare grpcio streams over TLS, without fedloom, and
    the server's peak RSS above its start-up over the vector's bytes.

    What the transport costs when the application adds nothing: the server (a process of
    its own, measured like fedloom's) holds the vector as pre-cut ``chunk_bytes`` messages
    (no protobuf, no per-round copy), streams them down, and copies what comes back into a
    preallocated buffer; the client (another process) keeps the chunks it receives and
    streams the same objects back. Timed in the client, from the first request to the last
    reply. The server's memory is therefore one vector to send plus one receive buffer plus
    whatever grpcio holds in flight: the transport's own floor for fedloom's server peak.
    """
    server_args = ["--vector-size", str(params), "--chunk-bytes", str(chunk_bytes)]
    server = Proc("grpc-server", [*server_args, "--certs", str(certs)])
    client: Proc | None = None
    try:
        port = server.wait_for(r"^PORT (\d+)$", 120).group(1)
        client = Proc(
            "grpc-client",
            [
                "--port",
                port,
                "--ca",
                str(certs / "ca.pem"),
                "--repeats",
                str(repeats),
                "--nbytes",
                str(4 * params),
                "--chunk-bytes",
                str(chunk_bytes),
            ],
        )
        times = json.loads(client.wait_for(r"^TIMES (.*)$", 300).group(1))
        client.wait(30)
        server.send("done")
        result = json.loads(server.wait_for(r"^RESULT (.*)$", 60).group(1))
        server.wait(30)
        if not result["intact"]:
            raise RuntimeError("bare grpcio copy returned different bytes")
        return [float(t) for t in times], (result["peak"] - result["baseline"]) / (4 * params)
    finally:
        if client is not None:
            client.stop()
        server.stop()


def _grpc_server_main(args: argparse.Namespace) -> int:
    """The bare grpcio floor's server (see :func:`grpc_floor`); prints PORT, then a RESULT
    line once the benchmark writes a line to its stdin."""
    from concurrent import futures

    import grpc
    import numpy as np

    size, step = args.vector_size, args.chunk_bytes // 4
    chunks: list[bytes] = []
    backs: list[bytearray] = []  # the receive buffer, allocated after the baseline
    received = [0]

    def down(request: bytes, context: grpc.ServicerContext) -> Any:
        yield from chunks

    def up(requests: Any, context: grpc.ServicerContext) -> bytes:
        view, off = memoryview(backs[0]), 0
        for c in requests:
            view[off : off + len(c)] = c
            off += len(c)
        received[0] = off
        return str(off).encode()

    handler = grpc.method_handlers_generic_handler(  # no (de)serializers: bytes as they are
        "bench.Copy",
        {
            "Down": grpc.unary_stream_rpc_method_handler(down),
            "Up": grpc.stream_unary_rpc_method_handler(up),
        },
    )
    limit = max(8 << 20, 2 * args.chunk_bytes)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    server.add_generic_rpc_handlers((handler,))
    certs = Path(args.certs)
    creds = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())]
    )
    port = server.add_secure_port(f"{HOST}:0", creds)
    server.start()
    baseline = proc_memory()["VmRSS"]
    # The vector to send, already cut (each chunk its own bytes object: one vector in all),
    # and the buffer it comes back into: what fedloom's server holds, the global model and
    # one receive buffer.
    chunks.extend(
        np.full(min(step, size - i), 0.5, dtype=np.float32).tobytes() for i in range(0, size, step)
    )
    backs.append(bytearray(4 * size))
    print(f"PORT {port}", flush=True)
    sys.stdin.readline()
    peak = proc_memory()["VmHWM"]
    server.stop(0).wait(5)
    got = np.frombuffer(backs[0], dtype=np.float32)
    intact = received[0] == 4 * size and bool((got == 0.5).all())
    print(
        "RESULT " + json.dumps({"baseline": baseline, "peak": peak, "intact": intact}), flush=True
    )
    return 0


def _grpc_client_main(args: argparse.Namespace) -> int:
    import grpc

    limit = max(8 << 20, 2 * args.chunk_bytes)
    creds = grpc.ssl_channel_credentials(root_certificates=Path(args.ca).read_bytes())
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]
    times = []
    with grpc.secure_channel(f"{HOST}:{args.port}", creds, options=options) as channel:
        down = channel.unary_stream(GRPC_FLOOR + "Down")
        up = channel.stream_unary(GRPC_FLOOR + "Up")
        grpc.channel_ready_future(channel).result(timeout=30)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            got = list(down(b"", timeout=120))
            reply = up(iter(got), timeout=120)
            times.append(time.perf_counter() - t0)
            if int(reply) != args.nbytes:
                raise RuntimeError(f"server got {int(reply)} of {args.nbytes} bytes")
            del got
    print("TIMES " + json.dumps(times), flush=True)
    return 0


# --- byte-counting proxy ---------------------------------------------------------------------


class CountingProxy:
    """Forwards 127.0.0.1:port → the target port, counting the bytes in each direction."""

    def __init__(self, target_port: int) -> None:
        self._target = (HOST, target_port)
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self.up = 0  # client → server
        self.down = 0  # server → client
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return self.down, self.up

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            try:
                upstream = socket.create_connection(self._target, timeout=10)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            for s in (conn, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pumps = [
                threading.Thread(target=self._pump, args=(conn, upstream, True), daemon=True),
                threading.Thread(target=self._pump, args=(upstream, conn, False), daemon=True),
            ]
            with self._lock:
                self._socks += [conn, upstream]
                self._threads += pumps
            for t in pumps:
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        buf = bytearray(1 << 18)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                dst.sendall(view[:n])
                with self._lock:
                    if up:
                        self.up += n
                    else:
                        self.down += n
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in threads:
            t.join(timeout=5)


# --- fedloom server and clients (child processes) --------------------------------------------


def _server_main(args: argparse.Namespace) -> int:
    """Serve ``--rounds`` rounds of FitTasks to ``--clients`` clients; print a RESULT line."""
    import numpy as np

    from fedloom.config import DeployConfig, load_config
    from fedloom.engine.deploy import ServerSecurity, server_credentials
    from fedloom.engine.grpc import max_message_bytes
    from fedloom.engine.grpc.server import (
        DeployOptions,
        FederationServicer,
        GrpcExecutor,
        Registry,
        start_grpc_server,
    )
    from fedloom.messages import GLOBAL, FitResult, FitTask

    logging.basicConfig(level=logging.WARNING, format="server %(levelname)s: %(message)s")
    d = DeployConfig()
    options = dataclasses.replace(
        DeployOptions.from_config(d),
        round_timeout_s=args.round_timeout_s,
        chunk_bytes=args.chunk_bytes,
        wait_for_clients_s=args.wait_s,
        heartbeat_interval_s=args.heartbeat_s,
        poll_timeout_s=args.poll_s,
        heartbeat_timeout_s=max(d.heartbeat_timeout_s, 10 * args.heartbeat_s),
    )
    max_workers = args.max_workers or d.max_workers
    registry = Registry(
        args.clients, args.vector_size, load_config(None, []).model_dump_json(), options=options
    )
    address = f"{HOST}:0"
    sec = ServerSecurity()
    if args.certs:
        certs = Path(args.certs)
        sec = ServerSecurity(tls_cert=certs / "server.pem", tls_key=certs / "server.key")
    servicer = FederationServicer(registry, options, None)
    server, port = start_grpc_server(
        servicer,
        address,
        server_credentials(address, sec),
        max_workers=max_workers,
        max_message_bytes=max_message_bytes(args.chunk_bytes),
    )
    executor = GrpcExecutor(registry, options)
    proxy = CountingProxy(port) if args.proxy else None
    result: dict[str, Any] = {"max_workers": max_workers}
    try:
        print(f"PORT {proxy.port if proxy else port}", flush=True)
        result["rss_baseline"] = proc_memory()["VmRSS"]
        t0 = time.perf_counter()
        executor.wait_for_clients(args.clients)
        result["connect_s"] = time.perf_counter() - t0
        result["rss_connected"] = proc_memory()["VmRSS"]
        result["heartbeat_s"] = args.heartbeat_s
        result["poll_s"] = args.poll_s
        # Let every client settle into its first long poll before measuring traffic.
        time.sleep(args.settle_s if args.proxy or args.idle_s > 0 else 0.2)
        if proxy:
            result["setup_bytes"] = sum(proxy.totals()) / args.clients
        if args.idle_s > 0:
            b0, c0, t0 = proxy.totals() if proxy else (0, 0), proc_cpu_s(), time.perf_counter()
            time.sleep(args.idle_s)
            b1, c1, t1 = proxy.totals() if proxy else (0, 0), proc_cpu_s(), time.perf_counter()
            result["idle_cpu_frac"] = (c1 - c0) / (t1 - t0)
            result["idle_bytes_per_s"] = (sum(b1) - sum(b0)) / (t1 - t0) / args.clients
        vector = np.full(args.vector_size, 0.5, dtype=np.float32)
        rounds: list[dict[str, float]] = []
        sample = args.sample or args.clients
        for rnd in range(1, args.rounds + 1):
            chosen = np.random.default_rng(rnd).choice(args.clients, sample, replace=False)
            tasks = [
                FitTask(client_id=int(c), round=rnd, model_version=rnd - 1) for c in sorted(chosen)
            ]
            b0, c0 = proxy.totals() if proxy else (0, 0), proc_cpu_s()
            t0 = time.perf_counter()
            outcomes = executor.fit(tasks, {GLOBAL: vector})
            seconds = time.perf_counter() - t0
            cpu = proc_cpu_s() - c0
            good = sum(
                isinstance(o, FitResult)
                and o.delta is not None
                and o.delta.size == args.vector_size
                and float(o.delta[-1]) == 0.5
                for o in outcomes
            )
            del outcomes
            row = {"seconds": seconds, "cpu_s": cpu, "ok": good, "sampled": sample}
            if proxy:
                time.sleep(0.3)  # the PushReply and the stream trailers
                b1 = proxy.totals()
                row["down"], row["up"] = b1[0] - b0[0], b1[1] - b0[1]
            rounds.append(row)
        result["rounds"] = rounds
        mem = proc_memory()
        result["rss_peak"], result["rss_end"] = mem["VmHWM"], mem["VmRSS"]
        result["rejected"] = dict(registry.rejections)
        result["sessions"] = len(registry.sessions)
        result["alive_at_end"] = len(registry.alive_clients())
        del vector
    finally:
        executor.close(wait=True)  # as DeploymentExecutor.close
        server.stop(grace=2.0).wait(5.0)
        if proxy:
            proxy.close()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


@dataclass
class EchoApp:
    """A client that returns the global vector it received as its update: no compute."""

    cfg: RunConfig
    client_id: int

    def fit(self, task: FitTask, broadcast: dict[str, np.ndarray]) -> FitResult:
        from fedloom.messages import DELTA, GLOBAL, FitResult

        return FitResult(
            client_id=task.client_id,
            round=task.round,
            model_version=task.model_version,
            num_examples=1,
            vectors={DELTA: broadcast[GLOBAL]},
        )

    def evaluate(self, task: EvalTask, broadcast: dict[str, np.ndarray]) -> EvalResult:
        from fedloom.messages import EvalResult

        return EvalResult(
            client_id=task.client_id,
            round=task.round,
            num_examples=1,
            metrics={"loss": 0.0, "accuracy": 1.0},
        )


def _clients_main(args: argparse.Namespace) -> int:
    """Run ``--count`` clients as threads until the server ends the run; print a CLIENTS line."""
    from fedloom.engine.grpc.client import Credentials, run_client

    logging.basicConfig(level=logging.WARNING, format="client %(levelname)s: %(message)s")
    address = sys.stdin.readline().strip() if args.server == "-" else args.server
    if not address:
        return 1  # the benchmark went away before the server started
    baseline = proc_memory()["VmRSS"]
    creds = Credentials(root_cert=Path(args.ca)) if args.ca else Credentials(insecure=True)
    stop = threading.Event()
    done: list[int] = []
    errors: list[str] = []

    def one(partition: int) -> None:
        try:
            done.append(
                run_client(
                    address,
                    EchoApp,
                    creds,
                    partition=partition,
                    name=f"bench-{partition}",
                    num_examples=1,
                    max_wait_s=60.0,
                    chunk_bytes=args.chunk_bytes,
                    stop=stop,
                )
            )
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=one, args=(args.first_id + i,), daemon=True)
        for i in range(args.count)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        stop.set()
        for t in threads:
            t.join(10)
    mem = proc_memory()
    print(
        "CLIENTS "
        + json.dumps(
            {
                "tasks": sum(done),
                "errors": errors[:5],
                "n_errors": len(errors),
                "baseline": baseline,
                "peak": mem["VmHWM"],
            }
        ),
        flush=True,
    )
    return 0 if not errors else 1


def _fleet_main(args: argparse.Namespace) -> int:
    """Run ``--count`` lightweight clients as coroutines of one event loop; print a CLIENTS
    line. Each speaks the wire protocol itself over its own TLS connection (register,
    a heartbeat every interval the server names, long polls, an echoed update for each
    fit task): what a fleet of small devices puts on the server, at a fraction of the
    CPU that a thread pair per client (``run_client``) costs on this side."""
    import asyncio

    import grpc

    address = sys.stdin.readline().strip() if args.server == "-" else args.server
    if not address:
        return 1
    baseline = proc_memory()["VmRSS"]
    creds = grpc.ssl_channel_credentials(Path(args.ca).read_bytes())
    done: list[int] = []
    errors: list[str] = []

    async def main() -> None:
        clients = [
            _fleet_client(address, creds, args.first_id + i, done, errors)
            for i in range(args.count)
        ]
        await asyncio.wait_for(asyncio.gather(*clients), args.timeout_s)

    try:
        asyncio.run(main())
    except TimeoutError:
        errors.append(f"the run did not end within {args.timeout_s:.0f} s")
    mem = proc_memory()
    report = {
        "tasks": sum(done),
        "errors": errors[:5],
        "n_errors": len(errors),
        "baseline": baseline,
        "peak": mem["VmHWM"],
    }
    print("CLIENTS " + json.dumps(report), flush=True)
    return 0 if not errors else 1


async def _fleet_client(
    address: str, creds: Any, partition: int, done: list[int], errors: list[str]
) -> None:
    """One fleet client (see :func:`_fleet_main`); counts its tasks, records its errors."""
    import asyncio

    import grpc

    from fedloom.engine.grpc import PROTOCOL_VERSION, SERVICE, SESSION_HEADER
    from fedloom.engine.grpc import fedloom_pb2 as pb

    base = f"/{SERVICE}/"
    tasks = 0
    async with grpc.aio.secure_channel(address, creds) as channel:
        register = channel.unary_unary(base + "Register")
        heartbeat = channel.unary_unary(base + "Heartbeat")
        pull = channel.unary_stream(base + "PullTask")
        push = channel.stream_unary(base + "PushResult")
        request = pb.RegisterRequest(
            protocol_version=PROTOCOL_VERSION, partition=partition, name=f"fleet-{partition}"
        )
        for attempt in range(30):  # the server may still be starting, or busy with others
            try:
                raw = await register(request.SerializeToString(), timeout=60)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
        else:
            errors.append(f"client {partition} could not register")
            return
        reply = pb.RegisterReply.FromString(raw)
        if not reply.accepted:
            errors.append(f"client {partition} refused: {reply.reason}")
            return
        sid = reply.session_id
        metadata = ((SESSION_HEADER, sid),)

        async def beat() -> None:
            beat = pb.HeartbeatRequest(session_id=sid).SerializeToString()
            while True:
                await asyncio.sleep(reply.heartbeat_interval_s)
                answer = await heartbeat(beat, metadata=metadata, timeout=60)
                if not pb.HeartbeatReply.FromString(answer).known:
                    errors.append(f"client {partition}: the server forgot its session")
                    return

        beating = asyncio.create_task(beat())
        stage = "start"
        try:
            poll = pb.PullRequest(session_id=sid).SerializeToString()
            while True:
                header: Any = None
                chunks: list[bytes] = []
                stage = "pull"
                async for raw in pull(poll, metadata=metadata, timeout=120):
                    message = pb.TaskMessage.FromString(raw)
                    if message.WhichOneof("part") == "header":
                        header = message.header
                    else:
                        chunks.append(message.chunk)
                if header is None or header.kind in (pb.TASK_STOP, pb.TASK_PAUSE):
                    break
                if header.kind != pb.TASK_FIT:
                    continue
                payload = b"".join(chunks)  # the global vector, echoed as the update
                head = pb.ResultHeader(
                    session_id=sid, task_id=header.task_id, round=header.round, num_examples=1
                )
                head.vectors.add(name="delta", size=len(payload) // 4)

                async def result(head: Any = head, payload: bytes = payload) -> Any:
                    yield pb.ResultMessage(header=head).SerializeToString()
                    yield pb.ResultMessage(chunk=payload).SerializeToString()

                stage = "push"
                answer = await push(result(), metadata=metadata, timeout=120)
                accepted = pb.PushReply.FromString(answer)
                if not accepted.accepted:
                    errors.append(f"client {partition}: result refused: {accepted.reason}")
                tasks += 1
        except grpc.aio.AioRpcError as err:
            errors.append(
                f"client {partition}, {stage}: {err.code().name}: {err.details()} "
                f"({err.debug_error_string()[:300]})"
            )
        finally:
            beating.cancel()
            done.append(tasks)


# --- orchestration ---------------------------------------------------------------------------


@dataclass
class FedloomRun:
    """The server's RESULT plus what the client processes reported."""

    server: dict[str, Any]
    clients: list[dict[str, Any]]

    @property
    def rounds(self) -> list[dict[str, float]]:
        return list(self.server["rounds"])


def fedloom_run(
    certs: Path | None,
    *,
    vector_size: int,
    clients: int = 1,
    client_procs: int = 1,
    rounds: int = 1,
    chunk_bytes: int = MiB,
    proxy: bool = False,
    idle_s: float = 0.0,
    max_workers: int = 0,
    timeout_s: float = 300.0,
    sample: int = 0,
    heartbeat_s: float = 1.0,
    poll_s: float = 5.0,
    client_role: str = "clients",
) -> FedloomRun:
    """Start a server process and client processes, run the rounds, stop everything."""
    server_args = [
        "--vector-size",
        str(vector_size),
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--chunk-bytes",
        str(chunk_bytes),
        "--idle-s",
        str(idle_s),
        "--max-workers",
        str(max_workers),
        "--round-timeout-s",
        str(timeout_s),
        "--sample",
        str(sample),
        "--heartbeat-s",
        str(heartbeat_s),
        "--poll-s",
        str(poll_s),
        "--wait-s",
        str(max(120.0, timeout_s)),
    ]
    if certs is not None:
        server_args += ["--certs", str(certs)]
    if proxy:
        server_args.append("--proxy")
    procs: list[Proc] = []
    try:
        # Client processes import while the server starts; they read its address from stdin.
        server = Proc("server", server_args)
        procs.append(server)
        per = -(-clients // client_procs)
        for first in range(0, clients, per):
            args = [
                "--server",
                "-",
                "--first-id",
                str(first),
                "--count",
                str(min(per, clients - first)),
                "--chunk-bytes",
                str(chunk_bytes),
                "--timeout-s",
                str(timeout_s + 60),
            ]
            if certs is not None:
                args += ["--ca", str(certs / "ca.pem")]
            procs.append(Proc(client_role, args))
        port = int(server.wait_for(r"^PORT (\d+)$", max(60.0, timeout_s)).group(1))
        for p in procs[1:]:
            p.send(f"{HOST}:{port}")
        result = json.loads(server.wait_for(r"^RESULT (.*)$", timeout_s + 60).group(1))
        reports: list[dict[str, Any]] = []
        for p in procs[1:]:
            try:
                reports.append(json.loads(p.wait_for(r"^CLIENTS (.*)$", 30).group(1)))
            except RuntimeError:  # still retrying: the server stopped before telling it
                reports.append({"hung": True, "tail": p.lines[-5:]})
        server.wait(30)
        return FedloomRun(result, reports)
    finally:
        for p in procs:
            p.stop()


def run_problems(run: FedloomRun, clients: int) -> list[str]:
    """Why a run's numbers are not results: a round without every client's correct
    update, a client process that reported errors or did not finish, or a message the
    server rejected from these honest clients. Empty when the run is clean."""
    problems: list[str] = []
    for i, r in enumerate(run.rounds, 1):
        sampled = int(r.get("sampled", clients))
        if r["ok"] != sampled:
            problems.append(f"round {i}: {sampled - int(r['ok'])} of {sampled} updates failed")
    if run.server.get("alive_at_end", clients) != clients:
        problems.append(f"only {run.server['alive_at_end']} of {clients} clients alive at the end")
    for report in run.clients:
        if report.get("hung"):
            problems.append("a client process never finished: " + " / ".join(report["tail"]))
        elif report.get("n_errors"):
            problems.append(
                f"{report['n_errors']} client(s) reported errors, e.g. {report['errors'][0]}"
            )
    rejected = sum(run.server.get("rejected", {}).values())
    if rejected:
        problems.append(f"the server rejected {rejected} messages from honest clients")
    return problems


def attempt(clients: int, **kwargs: Any) -> tuple[FedloomRun | None, list[str]]:
    """:func:`fedloom_run`, with what makes its numbers unusable (or that it never ended)."""
    try:
        run = fedloom_run(clients=clients, **kwargs)
    except RuntimeError as err:
        return None, [f"the run did not finish: {err}"]
    return run, run_problems(run, clients)


# --- the table -------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    return f"{n / MB:,.0f} MB" if n >= 10 * MB else f"{n / MB:,.1f} MB"


def machine_info() -> str:
    import grpc
    import numpy
    from google.protobuf import __version__ as pb_version
    from google.protobuf.internal import api_implementation

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, "
        f"{mem:.1f} GiB RAM; Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"protobuf {pb_version} ({api_implementation.Type()}), numpy {numpy.__version__}, "
        f"{ssl.OPENSSL_VERSION}"
    )


class Table:
    """A Markdown table, readable as plain text, ready for the README."""

    def __init__(self, header: Sequence[str]) -> None:
        self.rows: list[list[str]] = [list(header)]

    def add(self, *cells: str) -> None:
        self.rows.append(list(cells))

    def render(self) -> str:
        widths = [max(len(r[i]) for r in self.rows) for i in range(len(self.rows[0]))]
        lines = []
        for k, row in enumerate(self.rows):
            lines.append(
                "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
            )
            if k == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


def many_clients_rows(
    table: Table, run: FedloomRun, n_clients: int, idle_s: float, *, sample: int = 0
) -> None:
    """Part (b)'s rows, from a clean run (see :func:`run_problems`)."""
    s = run.server
    timed = run.rounds[1:]
    total = sum(r["seconds"] for r in timed)
    failed = sum(int(r.get("sampled", n_clients)) - r["ok"] for r in run.rounds)
    per_round = sample or n_clients
    heartbeat = s.get("heartbeat_s", 1.0)
    setting = (
        f"{n_clients} clients, TLS, 10k params, heartbeat {heartbeat:g} s, "
        f"max_workers {s['max_workers']}"
    )
    sampled = f"{sample} of {n_clients} sampled" if sample else "all clients sampled"
    table.add(
        "(b)",
        f"rounds per second, {sampled}",
        setting,
        f"{len(timed) / total:.2f} rounds/s (median round "
        f"{statistics.median(r['seconds'] for r in timed):.2f} s)",
        f"{per_round * len(timed) / total:,.0f} client updates/s; "
        f"server CPU {statistics.median(r['cpu_s'] for r in timed):.2f} s/round",
    )
    table.add(
        "(b)",
        "server memory (VmRSS)",
        setting,
        f"{s['rss_peak'] / MB:,.0f} MB peak",
        f"{s['rss_baseline'] / MB:,.0f} MB before any client (imports + gRPC server); "
        f"{(s['rss_connected'] - s['rss_baseline']) / n_clients / 1e3:,.0f} kB per idle "
        f"connected client",
    )
    rejected = sum(s["rejected"].values())
    table.add(
        "(b)",
        "server idle CPU, clients only polling and heartbeating",
        f"{n_clients} clients, {idle_s:.0f} s window",
        f"{100 * s['idle_cpu_frac']:.0f} % of one core",
        f"all {n_clients} connected in {s['connect_s']:.1f} s; failed client-rounds "
        f"{failed}, rejected messages {rejected}, re-registrations "
        f"{s['sessions'] - n_clients}",
    )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="10M parameters, 50 clients: < 1 min")
    p.add_argument("--params", type=int, help="parameters for (a) (default 100M, quick 10M)")
    p.add_argument("--clients", type=int, help="clients for (b) (default 200, quick 50)")
    p.add_argument(
        "--repeats", type=int, help="timed copies in (a) after a warm-up; best kept (3; quick 2)"
    )
    p.add_argument("--rounds", type=int, help="timed rounds in (b) (default 10, quick 5)")
    p.add_argument("--max-workers", type=int, default=0, help="server threads (0: deploy default)")
    p.add_argument("--parts", default="abc", help="parts to run: 'a' for (a) only (default abc)")
    # child roles
    p.add_argument(
        "--role",
        choices=["main", "server", "clients", "fleet", "echo", "grpc-server", "grpc-client"],
        default="main",
    )
    p.add_argument("--vector-size", type=int, default=0)
    p.add_argument("--chunk-bytes", type=int, default=MiB)
    p.add_argument("--certs", default="")
    p.add_argument("--proxy", action="store_true")
    p.add_argument("--idle-s", type=float, default=0.0)
    p.add_argument("--settle-s", type=float, default=1.0)
    p.add_argument("--wait-s", type=float, default=120.0)
    p.add_argument("--round-timeout-s", type=float, default=300.0)
    p.add_argument("--sample", type=int, default=0, help="clients per round (0: all)")
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.add_argument("--poll-s", type=float, default=5.0, help="the server's long-poll timeout")
    p.add_argument(
        "--fleet", type=int, help="clients of the fleet row in (b) (default 2000; quick 0: none)"
    )
    p.add_argument(
        "--fleet-heartbeat-s", type=float, default=1.0, help="the fleet's heartbeat interval"
    )
    p.add_argument("--server", default="")
    p.add_argument("--ca", default="")
    p.add_argument("--first-id", type=int, default=0)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--nbytes", type=int, default=0)
    args = p.parse_args(argv)
    if args.role == "server":
        return _server_main(args)
    if args.role == "clients":
        return _clients_main(args)
    if args.role == "fleet":
        return _fleet_main(args)
    if args.role == "echo":
        return _echo_main(args)
    if args.role == "grpc-server":
        return _grpc_server_main(args)
    if args.role == "grpc-client":
        return _grpc_client_main(args)
    return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    import numpy as np

    from fedloom.engine.grpc.certs import make_dev_certs
    from fedloom.params import encode_vector

    quick = args.quick
    load_before = os.getloadavg()[0]
    params = args.params or (10_000_000 if quick else 100_000_000)
    n_clients = args.clients or (50 if quick else 200)
    repeats = args.repeats or (2 if quick else 3)
    rounds = args.rounds or (5 if quick else 10)
    idle_s = 2.0 if quick else 10.0
    raw = params * 4
    started = time.perf_counter()
    table = Table(["part", "what", "setting", "result", "vs floor / note"])
    refused: list[str] = []

    def refuse(part: str, what: str, setting: str, problems: Sequence[str]) -> None:
        """A part whose transfer failed or whose clients erred reports no numbers."""
        table.add(part, what, setting, "NOT MEASURED", "; ".join(problems))
        refused.append(f"{part} {what} ({setting}): {'; '.join(problems)}")
        log(f"{part} not measured: {'; '.join(problems)}")

    with tempfile.TemporaryDirectory(prefix="fedloom-bench-") as tmp:
        certs = Path(tmp) / "certs"
        make_dev_certs(certs, [HOST, "localhost"], [])

        if "a" in args.parts:
            # (a) transfer throughput
            payload = encode_vector(np.full(params, 0.5, dtype=np.float32))
            moved = 2 * len(payload)

            def speed(times: Sequence[float]) -> str:
                best = min(times)
                return (
                    f"{moved / MB / best:,.0f} MB/s ({best:.2f} s; "
                    f"median of {len(times)} {statistics.median(times):.2f} s)"
                )

            setting = f"{params / 1e6:,.0f}M params = {fmt_bytes(raw)} each way"
            log(f"(a) raw TCP floor, {setting}")
            # Every contender runs one untimed warm-up copy first (fresh buffers, TCP and
            # HTTP/2 windows opening up), then ``repeats`` timed ones.
            tcp_times, _ = raw_floor(payload, None, repeats + 1)
            tcp_times = tcp_times[1:]
            log("(a) raw TLS floor (Python ssl)")
            tls_times, cipher = raw_floor(payload, certs, repeats + 1)
            tls_times = tls_times[1:]
            log("(a) bare grpcio floor (TLS, 1 MiB messages)")
            del payload
            grpc_times, grpc_peak = grpc_floor(params, certs, MiB, repeats + 1)
            grpc_times = grpc_times[1:]
            tcp, grpc_tls = min(tcp_times), min(grpc_times)
            table.add("(a)", "raw TCP socket copy (the floor)", setting, speed(tcp_times), "floor")
            table.add(
                "(a)",
                "raw TLS socket copy",
                f"Python ssl, {cipher}",
                speed(tls_times),
                f"{tcp / min(tls_times):.2f} of raw TCP",
            )
            table.add(
                "(a)",
                "bare grpcio streams, TLS (transport floor)",
                "1 MiB messages, no fedloom code",
                speed(grpc_times),
                f"{tcp / grpc_tls:.2f} of raw TCP; peak RSS above start-up: server "
                f"{grpc_peak:.3f}x the vector",
            )
            variants = (
                [(True, MiB), (False, MiB)]
                if quick
                else [(True, MiB), (True, 4 * MiB), (False, MiB)]
            )
            for tls, chunk in variants:
                name = "TLS" if tls else "plaintext"
                log(f"(a) fedloom gRPC {name}, chunk {chunk // MiB} MiB")
                what = f"fedloom GrpcExecutor.fit, {name}"
                setting = f"chunk {chunk // MiB} MiB, 1 client process"
                run, problems = attempt(
                    1,
                    certs=certs if tls else None,
                    vector_size=params,
                    rounds=repeats + 1,
                    chunk_bytes=chunk,
                    max_workers=args.max_workers,
                )
                if run is None or problems:
                    refuse("(a)", what, setting, problems)
                    continue
                times = [r["seconds"] for r in run.rounds[1:]]
                best = min(times)
                s, c = run.server, run.clients[0]
                vs = f"{tcp / best:.2f} of raw TCP"
                if tls:
                    vs += f", {grpc_tls / best:.2f} of bare grpcio TLS"
                table.add(
                    "(a)",
                    what,
                    setting,
                    speed(times),
                    f"{vs}; peak RSS above start-up: server "
                    f"{(s['rss_peak'] - s['rss_baseline']) / raw:.3f}x, client "
                    f"{(c['peak'] - c['baseline']) / raw:.3f}x the vector",
                )

        if "b" in args.parts:
            # (b) many clients
            procs = max(1, -(-n_clients // 50))
            log(f"(b) {n_clients} clients in {procs} processes, {rounds} rounds + 1 warm-up")

            def many(label: str, count: int, *, procs: int, sample: int = 0, **kwargs: Any) -> None:
                """One many-clients row: echoed 10,000-parameter updates, or no numbers.

                ``sample`` clients per round (0: all of them); ``kwargs`` go to ``attempt``.
                """
                run, problems = attempt(
                    count,
                    certs=certs,
                    vector_size=10_000,
                    client_procs=procs,
                    rounds=rounds + 1,
                    idle_s=idle_s,
                    max_workers=args.max_workers,
                    sample=sample,
                    **kwargs,
                )
                if run is None or problems:
                    refuse(
                        "(b)", f"{label}: rounds/s, memory, idle CPU", f"{count} clients", problems
                    )
                else:
                    many_clients_rows(table, run, count, idle_s, sample=sample)

            many("many clients", n_clients, procs=procs, timeout_s=120.0)
            fleet = args.fleet if args.fleet is not None else (0 if quick else 2000)
            if fleet:
                # A fleet: every client connected and heartbeating, 100 of them sampled per
                # round. Its clients are coroutines (``--role fleet``), 500 per process:
                # 2,000 thread pairs of ``run_client`` would starve this machine's own cores.
                fleet_sample = min(100, fleet)
                procs = max(1, -(-fleet // 500))
                log(f"(b) fleet: {fleet} clients in {procs} processes, {fleet_sample} per round")
                many(
                    "fleet",
                    fleet,
                    procs=procs,
                    timeout_s=300.0,
                    sample=fleet_sample,
                    heartbeat_s=args.fleet_heartbeat_s,
                    client_role="fleet",
                )

        # (c) protocol overhead
        sizes = [1_000_000] if quick else [1_000_000, params]
        cases = [(1_000_000, True), (1_000_000, False)] + [(n, True) for n in sizes[1:]]
        if "c" not in args.parts:
            cases = []
        idle_rates: dict[str, float] = {}
        for size, tls in cases:
            name = "TLS" if tls else "plaintext"
            log(f"(c) overhead through a counting proxy: {size:,} params, {name}")
            run, problems = attempt(
                1,
                certs=certs if tls else None,
                vector_size=size,
                rounds=1,
                proxy=True,
                idle_s=idle_s if size == 1_000_000 else 0.0,
                max_workers=args.max_workers,
            )
            if run is None or problems:
                refuse(
                    "(c)", "wire bytes per round ÷ raw vector bytes", f"{size:,}, {name}", problems
                )
                continue
            r = run.rounds[0]
            vec = 4 * size
            if size == 1_000_000:
                idle_rates[name] = run.server["idle_bytes_per_s"]
            table.add(
                "(c)",
                "wire bytes per round ÷ raw vector bytes",
                f"{size / 1e6:,.0f}M params, {name}, chunk 1 MiB",
                f"{(r['down'] + r['up']) / (2 * vec):.4f}",
                f"down {r['down'] / vec:.4f}, up {r['up'] / vec:.4f}; "
                f"{(r['down'] + r['up'] - 2 * vec) / 1e3:,.1f} kB above the raw bytes; "
                f"connection set-up {run.server['setup_bytes'] / 1e3:,.1f} kB",
            )
        for name, rate in idle_rates.items():
            table.add(
                "(c)",
                "idle traffic per connected client",
                f"{name}, heartbeat 1 s, poll 5 s",
                f"{rate:,.0f} B/s",
                f"{rate * 3600 / MB:,.1f} MB per hour",
            )

    print(f"fedloom deployment benchmark ({'quick' if quick else 'full'}), loopback {HOST}")
    print(f"machine: {machine_info()}")
    print(
        f"1-minute load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; anything else running shares the cores"
    )
    print(table.render())
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    for line in refused:
        print(f"ERROR: {line}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
