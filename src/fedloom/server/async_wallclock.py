"""Asynchronous rounds on the real clock: FedBuff and FedAsync against real clients.

The virtual-clock loop (:mod:`fedloom.server.async_loop`) decides from device profiles
when each result arrives. Here the clients decide: every free connected client gets a
task at once, with the global model of that moment (up to ``async.concurrency`` tasks in
flight; unset, every connected client), and results are taken in the order they really
come back, through the executor's ``submit_fit`` / ``fit_completed`` (a capability of
every engine, see :class:`~fedloom.server.loop.ClientExecutor`). FedBuff (Nguyen et al.
2022, AISTATS, Algorithm 1) takes a server step when ``buffer_size`` updates have
arrived; FedAsync (Xie et al. 2019, Algorithm 1) at every arrival. An update trained
from version v and applied when the server is at version t has staleness τ = t − v,
discounted by s(τ) = (1 + τ)^(−a) exactly as on the virtual clock (the same
:func:`~fedloom.server.async_loop.adjusted_delta`). There is no round barrier: one
*round* is one server step, so records, callbacks and checkpoints work as in any run.

A client that is lost (its session ends: heartbeats stop) fails its task, which is
recorded and dropped; the others keep the buffer filling. A checkpoint holds the
applied state (the model, its version, every stage's state); tasks in flight and
results that arrived but were not yet applied are not in it, so a resumed server hands
out new tasks from the checkpointed model and those results are lost, never applied.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.messages import ClientFailure, FitResult, FitTask
from fedloom.seeding import derive_rng
from fedloom.server.async_loop import (
    ASYNC_LAUNCH,
    AsyncFederatedServer,
    AsyncSettings,
)
from fedloom.store import Checkpoint

log = logging.getLogger("fedloom.server")

#: How long one wait for results lasts before the loop looks for newly connected clients.
POLL_S = 0.5


@dataclass(frozen=True)
class Launch:
    """A task in flight: its client, the model version it trains from, its number."""

    client_id: int
    version: int
    seq: int


class WallClockAsyncServer(AsyncFederatedServer):
    """FedBuff / FedAsync over an executor's ``submit_fit`` / ``fit_completed``."""

    def __init__(self, *, settings: AsyncSettings, poll_s: float = POLL_S, **kwargs: Any) -> None:
        super().__init__(settings=settings, planned_duration=_no_plan, **kwargs)
        self.poll_s = poll_s
        #: Tasks in flight by their number (the task's ``round``).
        self.running: dict[int, Launch] = {}
        #: Results that arrived and wait for the next server step, in arrival order.
        self.buffer: list[tuple[Launch, FitResult]] = []
        #: Failed or late tasks since the last step (recorded with it).
        self.lost: list[FitResult | ClientFailure] = []
        self._waited = False

    # ------------------------------------------------------------ launching
    def _fill(self) -> int:
        """Give a task to every free connected client, up to the concurrency cap."""
        available = self.executor.connected_clients() if self._waited else None
        if not self._waited or (not self.running and available is not None and not available):
            # At the start, and when no client is left: the executor waits for enough
            # clients (server.min_fit_clients in a deployment), or gives up.
            available = self.executor.available_clients()
            self._waited = True
        pool = range(self.num_clients) if available is None else available
        busy = {launch.client_id for launch in self.running.values()}
        idle = np.array([int(c) for c in pool if int(c) not in busy], dtype=np.int64)
        count = min(self.settings.concurrency - len(self.running), len(idle))
        if count <= 0:
            return 0
        if count < len(idle):
            rng = derive_rng(self.seed, ASYNC_LAUNCH, self.launches)
            idle = np.sort(idle[rng.choice(len(idle), size=count, replace=False)])
        version = self.state.round
        if self.settings.algorithm == "fedasync":  # its step mixes in the starting model
            self.versions.setdefault(version, self.state.weights.copy())
        config, broadcast = self.strategy.configure_fit(version + 1, self.state.weights)
        tasks = []
        for c in idle.tolist():
            self.launches += 1
            self.running[self.launches] = Launch(c, version, self.launches)
            # A task's round is its launch number: unique, so a client's draws differ
            # from one task to the next and every result names exactly one task.
            tasks.append(
                FitTask(client_id=c, round=self.launches, model_version=version, config=config)
            )
        self.executor.submit_fit(tasks, broadcast)
        return len(tasks)

    def _collect(self) -> None:
        for outcome in self.executor.fit_completed(wait_s=self.poll_s):
            launch = self.running.pop(outcome.round, None)
            if launch is None or launch.client_id != outcome.client_id:
                log.warning("an outcome for no task in flight (client %d)", outcome.client_id)
                continue
            if isinstance(outcome, FitResult) and (outcome.vectors or outcome.held):
                self.buffer.append((launch, outcome))
            else:
                self.lost.append(outcome)

    # --------------------------------------------------------------- rounds
    def run_round(self, rnd: int) -> dict[str, Any]:
        s, state = self.settings, self.state
        started = time.perf_counter()
        launched = self._fill()
        while len(self.buffer) < s.buffer_size:
            self._collect()
            launched += self._fill()
        taken, self.buffer = self.buffer[: s.buffer_size], self.buffer[s.buffer_size :]
        lost, self.lost = self.lost, []
        applied = [
            {"client": launch.client_id, "version": launch.version, "task": launch.seq}
            for launch, _ in taken
        ]
        staleness = {launch.seq: state.round - launch.version for launch, _ in taken}
        starts = {
            launch.seq: self.versions.get(launch.version, state.weights) for launch, _ in taken
        }
        outcomes: list[FitResult | ClientFailure] = [*lost, *(r for _, r in taken)]
        result = self.strategy.process_fit(
            rnd,
            outcomes,
            state.weights,
            self.executor.exchange,
            adjust=self._adjuster(staleness, starts, state.weights, key=lambda u: u.round),
        )
        self._record_failures(rnd, result.failures)
        if result.aggregated:
            state.weights = result.weights
            for u in result.updates:
                state.participation[u.client_id] += 1
        state.round = rnd
        # Clients freed while the buffer filled got the model of their moment; those
        # free now get the new one at once (after the last step, nothing more to do).
        if rnd < self.rounds:
            launched += self._fill()
        live = {launch.version for launch in self.running.values()}
        live.update(launch.version for launch, _ in self.buffer)
        self.versions = {v: w for v, w in self.versions.items() if v in live}
        _, broadcast = self.strategy.configure_fit(rnd, state.weights)
        record = self._record(rnd, launched, broadcast, result)
        values = [staleness[a["task"]] for a in applied]
        for a in applied:
            a["staleness"] = staleness[a["task"]]
        record.update(
            {
                "staleness_mean": float(np.mean(values)) if values else None,
                "staleness_max": int(max(values)) if values else None,
                "in_flight": len(self.running),
                "async_updates": applied,
            }
        )
        return self._close_round(rnd, record, result.updates, started)

    # ----------------------------------------------------------- checkpoints
    def checkpoint(self) -> Checkpoint:
        """The applied state only: tasks in flight and the unapplied buffer are lost on a
        resume (their clients get new tasks from the checkpointed model)."""
        ckpt = super(AsyncFederatedServer, self).checkpoint()
        ckpt.meta["async"] = {"clock": "wall", "launches": self.launches}
        return ckpt

    def restore(self, ckpt: Checkpoint, history: list[dict[str, Any]]) -> None:
        super(AsyncFederatedServer, self).restore(ckpt, history)
        meta = ckpt.meta.get("async")
        if not isinstance(meta, dict) or meta.get("clock") != "wall":
            raise ValueError(
                "the checkpoint is not from an asynchronous deployment; resume it with the "
                "command that started it"
            )
        self.launches = int(meta["launches"])


def _no_plan(client_id: int, model_bytes: int) -> float:
    raise AssertionError("the real clock plans no durations")
