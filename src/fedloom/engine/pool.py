"""A pool of long-lived worker processes that keep the model and data and receive only vectors.

Each worker builds the data set and the model once, from the run config (both are
deterministic in the seed), then serves tasks for the whole run. Per round a worker
receives the global vector once as raw bytes, and per task only a client id; it sends
back the update as raw bytes. Tasks are handed out dynamically, largest client first,
so uneven client sizes still keep every core busy.

Workers run one torch thread each: with many small clients, process parallelism beats
intra-op threading. With ``engine.device`` on CUDA the workers spread over the GPUs
present (worker i on ``cuda:(i mod n_gpus)``); updates still come back as CPU vectors.
A worker that dies takes only its in-flight task with it; that task comes back as a
failure and the remaining tasks go to the surviving workers.

State a client keeps across rounds (a local-DP ledger, SCAFFOLD's control variate,
personal layers) lives in the parent's :class:`~fedloom.client_store.ClientStateStore`,
not in the workers: a client may land on a different worker each round. Each task
carries the client's state as bytes; the worker trains and returns the updated state
with the result, which the parent stores. A task that fails or whose worker dies returns
nothing, so the state is unchanged, as it is when the in-process runtime raises. The
result is the in-process state exactly, whichever worker ran each client.

Workers build their :class:`~fedloom.client.runtime.ClientRuntime` from a picklable
factory (the wiring passes one made from the run config). Secure aggregation needs
every client's held upload in one place, so this engine answers no protocol exchange
(the configuration refuses the combination).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import torch

from fedloom.client.device import resolve_device, worker_device
from fedloom.client.runtime import ClientRuntime
from fedloom.client.safety import run_safely
from fedloom.client_store import ClientState, ClientStateStore
from fedloom.config import ConfigError
from fedloom.engine.inprocess import LocalClients
from fedloom.exchange import ExchangeRequest
from fedloom.messages import Broadcast, ClientFailure, EvalResult, EvalTask, FitResult, FitTask
from fedloom.params import decode_array, encode_array

Task = FitTask | EvalTask
Outcome = FitResult | EvalResult | ClientFailure


RuntimeFactory = Callable[[], ClientRuntime]


def _worker_main(
    conn: Connection, factory: RuntimeFactory, torch_threads: int, device: str = "cpu"
) -> None:
    """Entry point of a worker process: build once, then serve tasks until told to stop."""
    try:
        torch.set_num_threads(torch_threads)
        runtime = factory().on_device(torch.device(device))
        size = runtime.learner.num_parameters
    except ConfigError as err:  # the user's to fix: their one line, not a traceback
        conn.send(("config", str(err)))
        return
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", size))
    broadcast: dict[str, np.ndarray] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "broadcast":
            broadcast = {name: decode_array(conn.recv_bytes(), n, dt) for name, n, dt in msg[1]}
        elif kind == "fit":
            task: FitTask = msg[1]
            state = ClientState.from_bytes(msg[2])
            out = run_safely(partial(runtime.fit, task, broadcast, state), task)
            _send_outcome(conn, out, state.to_bytes() if isinstance(out, FitResult) else None)
        elif kind == "eval":
            etask: EvalTask = msg[1]
            state = ClientState.from_bytes(msg[2])
            _send_outcome(
                conn, run_safely(partial(runtime.evaluate, etask, broadcast, state), etask)
            )


def _send_outcome(conn: Connection, out: Outcome, state: bytes | None = None) -> None:
    """Send a result; a fit result carries the client's updated state (see module doc)."""
    if isinstance(out, ClientFailure | EvalResult):
        conn.send(("outcome", out))
        return
    vectors = out.vectors
    out.vectors = {}
    encoded = {k: encode_array(v) for k, v in vectors.items()}
    conn.send(("fit", out, [(k, int(v.size), encoded[k][0]) for k, v in vectors.items()], state))
    for _, data in encoded.values():
        conn.send_bytes(data)


@dataclass
class _Worker:
    process: Any
    conn: Connection
    alive: bool = True


class ProcessPoolExecutor(LocalClients):
    """Runs client tasks on ``workers`` processes (0 = one per CPU core)."""

    def __init__(
        self,
        factory: RuntimeFactory,
        client_sizes: Sequence[int],
        store: ClientStateStore,
        *,
        workers: int = 0,
        torch_threads: int = 1,
        device: str = "cpu",
        start_timeout_s: float = 300.0,
    ) -> None:
        self.client_sizes = list(client_sizes)
        self.store = store
        count = workers or os.cpu_count() or 1
        base = resolve_device(device)  # refused here, before any worker starts
        gpus = torch.cuda.device_count() if base.type == "cuda" else 0
        #: Where each worker trains: worker i on cuda:(i mod gpus), or all on the CPU.
        self.devices = [worker_device(i, base, gpus=gpus) for i in range(count)]
        ctx = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        self.size = 0
        for i in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(child, factory, torch_threads, str(self.devices[i])),
                daemon=True,
            )
            proc.start()
            child.close()
            self.workers.append(_Worker(proc, parent))
        for w in self.workers:
            if not w.conn.poll(start_timeout_s):
                self.close()
                raise RuntimeError(f"a pool worker did not start within {start_timeout_s:.0f} s")
            kind, payload = w.conn.recv()
            if kind == "config":
                self.close()
                raise ConfigError(payload)
            if kind != "ready":
                self.close()
                raise RuntimeError(f"a pool worker failed to start:\n{payload}")
            self.size = int(payload)

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast
    ) -> list[FitResult | ClientFailure]:
        return [o for o in self._run(tasks, broadcast) if not isinstance(o, EvalResult)]

    def evaluate(
        self, tasks: Sequence[EvalTask], broadcast: Broadcast
    ) -> list[EvalResult | ClientFailure]:
        return [o for o in self._run(tasks, broadcast) if not isinstance(o, FitResult)]

    def exchange(self, request: ExchangeRequest, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        raise NotImplementedError(
            "the pool engine runs no protocol exchange (secure aggregation is refused with it)"
        )

    def _run(self, tasks: Sequence[Task], broadcast: Broadcast) -> list[Outcome]:
        encoded = {k: encode_array(v) for k, v in broadcast.items()}
        header = ("broadcast", [(k, int(v.size), encoded[k][0]) for k, v in broadcast.items()])
        payloads = [data for _, data in encoded.values()]
        for w in self._alive():
            self._send(w, header, payloads)
        pending = deque(sorted(tasks, key=lambda t: -self.client_sizes[t.client_id]))
        inflight: dict[int, Task] = {}
        results: dict[tuple[int, int], Outcome] = {}
        for i, w in enumerate(self.workers):
            if w.alive and pending:
                self._dispatch(i, pending, inflight)
        while inflight:
            ready = wait([self.workers[i].conn for i in inflight])
            for i in [i for i in list(inflight) if self.workers[i].conn in ready]:
                task = inflight.pop(i)
                out = self._receive(i, task)
                results[(task.client_id, task.round)] = out
                if self.workers[i].alive and pending:
                    self._dispatch(i, pending, inflight)
            if not inflight and pending:
                # Every worker died: what is left cannot run.
                while pending:
                    t = pending.popleft()
                    results[(t.client_id, t.round)] = ClientFailure(
                        client_id=t.client_id,
                        round=t.round,
                        error="no live pool worker to run this client",
                    )
        return [results[(t.client_id, t.round)] for t in tasks]

    def _dispatch(self, i: int, pending: deque[Task], inflight: dict[int, Task]) -> None:
        task = pending.popleft()
        kind = "fit" if isinstance(task, FitTask) else "eval"
        msg = (kind, task, self.store.get(task.client_id).to_bytes())
        if self._send(self.workers[i], msg):
            inflight[i] = task
        else:
            pending.appendleft(task)
            alive = [j for j, w in enumerate(self.workers) if w.alive and j not in inflight]
            if alive:
                self._dispatch(alive[0], pending, inflight)

    def _send(self, w: _Worker, msg: tuple[Any, ...], payloads: Sequence[bytes] = ()) -> bool:
        try:
            w.conn.send(msg)
            for payload in payloads:
                w.conn.send_bytes(payload)
            return True
        except (BrokenPipeError, EOFError, OSError):
            w.alive = False
            return False

    def _receive(self, i: int, task: Task) -> Outcome:
        w = self.workers[i]
        try:
            msg = w.conn.recv()
            if msg[0] == "outcome":
                outcome: Outcome = msg[1]
                return outcome
            result: FitResult = msg[1]
            result.vectors = {
                name: decode_array(w.conn.recv_bytes(), n, dt) for name, n, dt in msg[2]
            }
            if msg[3] is not None:
                self.store.put(task.client_id, ClientState.from_bytes(msg[3]), round=task.round)
            return result
        except (EOFError, OSError):
            w.alive = False
            code = w.process.exitcode
            return ClientFailure(
                client_id=task.client_id,
                round=task.round,
                error=f"pool worker process died (exit code {code})",
            )

    def _alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive]

    def save_client_state(self) -> dict[str, Any]:
        return self.store.manifest()

    def load_client_state(self, manifest: Mapping[str, Any]) -> None:
        self.store.restore(manifest)

    def close(self) -> None:
        for w in self.workers:
            if w.alive:
                self._send(w, ("stop",))
        for w in self.workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
            w.conn.close()
        self.workers = []
