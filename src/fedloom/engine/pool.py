"""A pool of long-lived worker processes that keep the model and data and receive only vectors.

Each worker builds the data set and the model once, from the run config (both are
deterministic in the seed), then serves tasks for the whole run. Per round a worker
receives the global vector once as raw bytes, and per task only a client id; it sends
back the update as raw bytes. Tasks are handed out dynamically, largest client first,
so uneven client sizes still keep every core busy.

Workers run one torch thread each: with many small clients, process parallelism beats
intra-op threading. A worker that dies takes only its in-flight task with it; that task
comes back as a failure and the remaining tasks go to the surviving workers.

State a client keeps across rounds (local DP's privacy ledger,
:meth:`LocalTrainer.client_state <fedloom.client.trainer.LocalTrainer.client_state>`)
lives in the parent, not in the workers: a client may land on a different worker each
round, and a per-worker ledger would split its history. Each fit task carries the
client's share of that state; the worker installs it (replacing whatever the previous
task left), trains, and returns the client's updated share with the result, which the
parent merges. A task that fails or whose worker dies returns nothing, so the state is
unchanged, as it is when the in-process trainer raises. The result is the in-process
state exactly, whichever worker ran each client, and it is what checkpoints carry.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from fedloom.config import RunConfig
from fedloom.messages import ClientFailure, EvalResult, EvalTask, FitResult, FitTask
from fedloom.params import decode_vector, encode_vector
from fedloom.privacy.secagg import SecAggConfig
from fedloom.privacy.secagg.transport import SecureSum
from fedloom.server.loop import LocalClients

Task = FitTask | EvalTask
Outcome = FitResult | EvalResult | ClientFailure


def _worker_main(conn: Connection, cfg_json: str) -> None:
    """Entry point of a worker process: build once, then serve tasks until told to stop."""
    try:
        import torch

        from fedloom.client.safety import run_safely
        from fedloom.client.trainer import LocalTrainer
        from fedloom.config import config_from_json
        from fedloom.data import build_federated_dataset

        cfg = config_from_json(cfg_json)
        torch.set_num_threads(cfg.engine.torch_threads)
        trainer = LocalTrainer(cfg, build_federated_dataset(cfg.data, cfg.seed))
        size = trainer.num_parameters
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", size))
    vector = np.zeros(size, dtype=np.float32)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "weights":
            vector = decode_vector(conn.recv_bytes(), size)
        elif kind == "fit":
            task = FitTask(msg[1], msg[2], msg[3], msg[4])
            trainer.restore_client_state(msg[5])
            out = run_safely(partial(trainer.fit, task, vector), task)
            state = trainer.client_state(task.client_id) if isinstance(out, FitResult) else {}
            _send_outcome(conn, out, state)
        elif kind == "eval":
            etask = EvalTask(msg[1], msg[2])
            _send_outcome(conn, run_safely(partial(trainer.evaluate_client, etask, vector), etask))


def _send_outcome(conn: Connection, out: Outcome, state: dict[str, Any] | None = None) -> None:
    """Send a result; a fit result carries the client's updated state (see module doc)."""
    if isinstance(out, ClientFailure):
        conn.send(("fail", out.client_id, out.round, out.error, out.traceback))
    elif isinstance(out, EvalResult):
        conn.send(("eval", out.client_id, out.round, out.num_examples, out.loss, out.accuracy))
    else:
        has_delta = out.delta is not None
        conn.send(
            (
                "fit",
                out.client_id,
                out.round,
                out.num_examples,
                out.straggler,
                out.metrics,
                has_delta,
                state or {},
            )
        )
        if out.delta is not None:
            conn.send_bytes(encode_vector(out.delta))


def _state_of(state: dict[str, Any], client_id: int) -> dict[str, Any]:
    """One client's share of the client state: ``{part: {id: entry}}`` for its id only."""
    key = str(client_id)
    return {part: {key: by_id[key]} for part, by_id in state.items() if key in by_id}


@dataclass
class _Worker:
    process: Any
    conn: Connection
    alive: bool = True


class ProcessPoolExecutor(LocalClients):
    """Runs client tasks on ``workers`` processes (0 = one per CPU core)."""

    def __init__(
        self,
        cfg: RunConfig,
        client_sizes: Sequence[int],
        workers: int = 0,
        start_timeout_s: float = 300.0,
    ) -> None:
        self.client_sizes = list(client_sizes)
        count = workers or os.cpu_count() or 1
        ctx = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        self.size = 0
        #: Authoritative client state, shaped as LocalTrainer.client_state() (module doc).
        self._client_state: dict[str, Any] = {}
        cfg_json = cfg.model_dump_json()
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, cfg_json), daemon=True)
            proc.start()
            child.close()
            self.workers.append(_Worker(proc, parent))
        for w in self.workers:
            if not w.conn.poll(start_timeout_s):
                self.close()
                raise RuntimeError(f"a pool worker did not start within {start_timeout_s:.0f} s")
            kind, payload = w.conn.recv()
            if kind != "ready":
                self.close()
                raise RuntimeError(f"a pool worker failed to start:\n{payload}")
            self.size = int(payload)

    def fit(
        self, tasks: Sequence[FitTask], global_vector: np.ndarray
    ) -> list[FitResult | ClientFailure]:
        return [o for o in self._run(tasks, global_vector) if not isinstance(o, EvalResult)]

    def evaluate(
        self, tasks: Sequence[EvalTask], global_vector: np.ndarray
    ) -> list[EvalResult | ClientFailure]:
        return [o for o in self._run(tasks, global_vector) if not isinstance(o, FitResult)]

    def _run(self, tasks: Sequence[Task], global_vector: np.ndarray) -> list[Outcome]:
        payload = encode_vector(global_vector)
        for w in self._alive():
            self._send(w, ("weights",), payload)
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
                        t.client_id, t.round, "no live pool worker to run this client", ""
                    )
        return [results[(t.client_id, t.round)] for t in tasks]

    def _dispatch(self, i: int, pending: deque[Task], inflight: dict[int, Task]) -> None:
        task = pending.popleft()
        if isinstance(task, FitTask):
            msg: tuple[Any, ...] = (
                "fit",
                task.client_id,
                task.round,
                task.drop_stragglers,
                task.clip_norm,
                _state_of(self._client_state, task.client_id),
            )
        else:
            msg = ("eval", task.client_id, task.round)
        if self._send(self.workers[i], msg):
            inflight[i] = task
        else:
            pending.appendleft(task)
            alive = [j for j, w in enumerate(self.workers) if w.alive and j not in inflight]
            if alive:
                self._dispatch(alive[0], pending, inflight)

    def _send(self, w: _Worker, msg: tuple[Any, ...], payload: bytes | None = None) -> bool:
        try:
            w.conn.send(msg)
            if payload is not None:
                w.conn.send_bytes(payload)
            return True
        except (BrokenPipeError, EOFError, OSError):
            w.alive = False
            return False

    def _receive(self, i: int, task: Task) -> Outcome:
        w = self.workers[i]
        try:
            msg = w.conn.recv()
            if msg[0] == "fail":
                return ClientFailure(msg[1], msg[2], msg[3], msg[4])
            if msg[0] == "eval":
                return EvalResult(msg[1], msg[2], msg[3], msg[4], msg[5])
            delta = decode_vector(w.conn.recv_bytes(), self.size) if msg[6] else None
            for part, entries in msg[7].items():
                self._client_state.setdefault(part, {}).update(entries)
            return FitResult(msg[1], msg[2], delta, msg[3], straggler=msg[4], metrics=msg[5])
        except (EOFError, OSError):
            w.alive = False
            code = w.process.exitcode
            return ClientFailure(
                task.client_id, task.round, f"pool worker process died (exit code {code})", ""
            )

    def _alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive]

    def secure_sum(
        self, rnd: int, client_ids: Sequence[int], vector_length: int, config: SecAggConfig
    ) -> SecureSum:
        raise NotImplementedError(
            "secure aggregation is not available on the pool engine (the config refuses it)"
        )

    def client_state(self) -> dict[str, Any]:
        return copy.deepcopy(self._client_state)

    def restore_client_state(self, state: dict[str, Any]) -> None:
        self._client_state = copy.deepcopy(state)

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
