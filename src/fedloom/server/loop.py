"""The round loop: sample, configure, run clients, let the strategy conclude, call back.

The loop knows stages only through the :class:`~fedloom.server.strategy.Strategy` and
clients only through a :class:`ClientExecutor` (the engine). It has no branch for any
algorithm or privacy mechanism: evaluation, recording, checkpointing, early stopping and
the privacy-budget stop are callbacks (:mod:`fedloom.server.callbacks`). Failed clients
come back as :class:`~fedloom.messages.ClientFailure` records; the strategy decides from
its minimums whether the round's update is applied. The loop never waits on anything
itself, so it cannot hang.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedloom.callbacks import Callback, RunContext
from fedloom.exchange import ExchangeRequest
from fedloom.messages import (
    Broadcast,
    ClientFailure,
    EvalResult,
    EvalTask,
    FitResult,
    FitTask,
)
from fedloom.params import encoded_nbytes
from fedloom.server.strategy import FitOutcome, Strategy
from fedloom.store import Checkpoint

log = logging.getLogger("fedloom.server")


class ClientExecutor(Protocol):
    """Runs client tasks somewhere (this process, a pool, a cluster, the network)."""

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast
    ) -> list[FitResult | ClientFailure]: ...

    def evaluate(
        self, tasks: Sequence[EvalTask], broadcast: Broadcast
    ) -> list[EvalResult | ClientFailure]: ...

    def submit_fit(self, tasks: Sequence[FitTask], broadcast: Broadcast) -> None:
        """Start ``tasks`` without waiting for them; :meth:`fit_completed` returns them.

        The asynchronous loop on a real clock hands out work one client at a time, each
        with the model of the moment, and applies results in the order they come back.
        """
        ...

    def fit_completed(self, *, wait_s: float) -> list[FitResult | ClientFailure]:
        """Submitted tasks that have finished since the last call, each exactly once.

        Waits up to ``wait_s`` for the first when none has finished (returns [] then,
        and at once when nothing is in flight). A task whose client is lost comes back
        as a :class:`~fedloom.messages.ClientFailure`, one past its deadline as a
        straggler; an engine that runs tasks itself may finish them all in this call.
        """
        ...

    def exchange(self, request: ExchangeRequest, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        """Deliver protocol messages to participants; their replies (see fedloom.exchange)."""
        ...

    def available_clients(self) -> Sequence[int] | None:
        """Client ids to sample from (None: every client). May wait for enough clients."""
        ...

    def connected_clients(self) -> Sequence[int] | None:
        """Clients reachable right now, without waiting (None: all of them)."""
        ...

    def round_metrics(self) -> dict[str, Any]:
        """Engine-specific counters for the round record (e.g. rejected messages)."""
        ...

    def save_client_state(self) -> dict[str, Any]:
        """A JSON-able reference to the clients' state as of now, for a checkpoint."""
        ...

    def load_client_state(self, manifest: Mapping[str, Any]) -> None:
        """Go back to the client state a checkpoint's :meth:`save_client_state` named."""
        ...

    def close(self) -> None: ...


@dataclass
class ServerState:
    """Everything needed to continue a run after the last completed round."""

    round: int
    weights: np.ndarray
    participation: np.ndarray  # per client: rounds whose aggregate included its update
    history: list[dict[str, Any]] = field(default_factory=list)


class FederatedServer:
    """Runs rounds of a strategy against a client executor."""

    def __init__(
        self,
        *,
        strategy: Strategy,
        executor: ClientExecutor,
        initial_weights: np.ndarray,
        num_clients: int,
        rounds: int,
        seed: int,
        callbacks: Sequence[Callback] = (),
        store: Any = None,
    ) -> None:
        self.strategy = strategy
        self.executor = executor
        self.num_clients = num_clients
        self.rounds = rounds
        self.seed = seed
        self.store = store
        #: In order; the wiring puts evaluation first and recording, checkpoints last.
        self.callbacks = list(callbacks)
        #: Why the run ended before ``rounds`` (e.g. the privacy budget), else None.
        self.stopped_reason: str | None = None
        self.state = ServerState(
            round=0,
            weights=initial_weights.astype(np.float32, copy=True),
            participation=np.zeros(num_clients, dtype=np.int64),
        )
        self._run = RunContext(server=self, store=store)

    # ------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Checkpoint:
        tensors, stage_meta = self.strategy.state()
        tensors = {
            "global": self.state.weights,
            "participation": self.state.participation,
            **tensors,
        }
        meta: dict[str, Any] = {
            "round": self.state.round,
            "optimizer": self.strategy.optimizer.name,
            # All randomness is derived from (seed, purpose, round, client); see seeding.py.
            "rng": {"scheme": "SeedSequence(seed, purpose, round, client)", "seed": self.seed},
            "stages": stage_meta,
            "client_state": self.executor.save_client_state(),
        }
        return Checkpoint(round=self.state.round, tensors=tensors, meta=meta)

    def restore(self, ckpt: Checkpoint, history: list[dict[str, Any]]) -> None:
        """Continue from a checkpoint: weights, stage state, participation, client state."""
        self.state.round = ckpt.round
        self.state.weights = ckpt.tensors["global"].astype(np.float32)
        self.state.participation = ckpt.tensors["participation"].astype(np.int64)
        self.strategy.load_state(
            {k: v for k, v in ckpt.tensors.items() if "/" in k}, ckpt.meta.get("stages", {})
        )
        self.state.history = [r for r in history if r["round"] <= ckpt.round]
        self.executor.load_client_state(ckpt.meta.get("client_state", {}))
        for cb in self.callbacks:
            cb.on_restore(self._run)

    # ------------------------------------------------------------------ rounds
    def run(self, on_round: Callable[[dict[str, Any]], None] | None = None) -> ServerState:
        """Run the remaining rounds, or until a callback stops the run."""
        for cb in self.callbacks:
            cb.on_run_start(self._run)
        while self.state.round < self.rounds:
            reason = self._stop_reason(self.state.round + 1)
            if reason is not None:
                self._stop(reason)
                break
            record = self.run_round(self.state.round + 1)
            if on_round is not None:
                on_round(record)
        for cb in self.callbacks:
            cb.on_run_end(self._run)
        return self.state

    def _stop_reason(self, rnd: int) -> str | None:
        for cb in self.callbacks:
            reason = cb.stop_before_round(rnd, self._run)
            if reason is not None:
                return reason
        return None

    def _stop(self, reason: str) -> None:
        log.warning("%s", reason)
        self.stopped_reason = reason
        if self.store is not None:
            self.store.set_meta("stopped_reason", reason)

    def run_round(self, rnd: int) -> dict[str, Any]:
        state, strategy = self.state, self.strategy
        started = time.perf_counter()
        available = self.executor.available_clients()
        pool = np.arange(self.num_clients) if available is None else np.asarray(available)
        sampled = strategy.sample(rnd, pool, self.seed)
        config, broadcast = strategy.configure_fit(rnd, state.weights)
        tasks = [
            FitTask(
                client_id=int(c),
                round=rnd,
                model_version=state.round,
                config=strategy.client_config(rnd, int(c), config, broadcast),
            )
            for c in sampled
        ]
        outcomes = self.executor.fit(tasks, broadcast)
        result = strategy.process_fit(rnd, outcomes, state.weights, self.executor.exchange)
        self._record_failures(rnd, result.failures)
        if result.aggregated:
            state.weights = result.weights
            for u in result.updates:
                state.participation[u.client_id] += 1
        record = self._record(rnd, len(sampled), broadcast, result)
        state.round = rnd
        return self._close_round(rnd, record, result.updates, started)

    def _close_round(
        self, rnd: int, record: dict[str, Any], updates: list[FitResult], started: float
    ) -> dict[str, Any]:
        """Every loop ends a round alike: the executor's metrics join the record, the
        callbacks see it (with the round's updates), and it enters the history."""
        record.update(self.executor.round_metrics())
        self._run.last = rnd == self.rounds or self._stop_reason(rnd + 1) is not None
        self._run.fit_results = updates
        self._run.round_started = started
        self.state.history.append(record)
        for cb in self.callbacks:
            cb.on_round_end(rnd, record, self._run)
        return record

    def _record(
        self, rnd: int, sampled: int, broadcast: Broadcast, result: FitOutcome
    ) -> dict[str, Any]:
        updates = result.updates
        record: dict[str, Any] = {
            "round": rnd,
            "accuracy": None,
            "loss": None,
            "fed_accuracy": None,
            "fed_loss": None,
            "train_loss": _weighted_metric(updates, "train_loss"),
            "clients_sampled": sampled,
            "clients_succeeded": len(updates),
            "clients_failed": len(result.failures),
            "stragglers_dropped": result.stragglers_dropped,
            "aggregated": result.aggregated,
            **_round_traffic(sampled, broadcast, result.bytes_up, result.fields),
            "epsilon": None,
        }
        record.update(result.fields)
        return record

    def _record_failures(self, rnd: int, failures: list[ClientFailure]) -> None:
        for f in failures:
            log.warning("round %d: client %d failed: %s", rnd, f.client_id, f.error)
            if f.traceback:
                log.debug("client %d traceback:\n%s", f.client_id, f.traceback)
            if self.store is not None:
                self.store.record_failure(rnd, f.client_id, f.error, f.traceback)


def _round_traffic(
    sampled: int, broadcast: Broadcast, clear_up: int, fields: dict[str, Any]
) -> dict[str, int]:
    """The round's ``bytes_down`` / ``bytes_up``: every byte the round put on the wire.

    Down is the broadcast sent to each sampled client; up is the clear uploads returned,
    both as encoded (compressed arrays count their compact size: ``clear_up`` is what the
    strategy measured before its codecs decoded the uploads).
    Under secure aggregation the uploads travel inside the protocol instead
    (``FitResult.held``), so its traffic (``secagg_bytes_*``, kept in the record as the
    breakdown) is added here: these two fields stay the one source the run totals and
    reports sum, and a secure run is comparable with a plain one.
    """
    down = sum(encoded_nbytes(v) for v in broadcast.values())
    return {
        "bytes_down": sampled * down + fields.get("secagg_bytes_down", 0),
        "bytes_up": clear_up + fields.get("secagg_bytes_up", 0),
    }


def _weighted_metric(updates: list[FitResult], name: str) -> float | None:
    pairs = [(u.metrics[name], u.num_examples) for u in updates if name in u.metrics]
    n = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / n if n else None
