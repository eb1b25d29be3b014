"""The default engine: clients run one after another in this process.

Exact and reproducible, and with the flat-parameter learner nearly free of per-client
overhead, so it is also the reference every other engine is compared against. Client
state lives in a :class:`~fedloom.client_store.ClientStateStore`; protocol messages
(secure aggregation) are answered by the same runtime, through their byte encoding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from fedloom.client.device import resolve_device
from fedloom.client.runtime import ClientRuntime
from fedloom.client.safety import run_safely
from fedloom.client_store import ClientStateStore
from fedloom.exchange import ExchangeRequest
from fedloom.messages import Broadcast, ClientFailure, EvalResult, EvalTask, FitResult, FitTask

log = logging.getLogger("fedloom.engine")


class LocalClients:
    """The :class:`~fedloom.server.loop.ClientExecutor` answers of an engine that runs
    every client itself: every client is reachable, there are no engine counters, and
    submitted tasks run (through the engine's own ``fit``, so in parallel where it is)
    when their results are asked for."""

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast
    ) -> list[FitResult | ClientFailure]:
        raise NotImplementedError

    def submit_fit(self, tasks: Sequence[FitTask], broadcast: Broadcast) -> None:
        submitted: list[tuple[list[FitTask], Broadcast]] = self.__dict__.setdefault(
            "_submitted", []
        )
        submitted.append((list(tasks), broadcast))

    def fit_completed(self, *, wait_s: float) -> list[FitResult | ClientFailure]:
        """Every submitted task, run now: nothing here runs on its own time."""
        submitted: list[tuple[list[FitTask], Broadcast]] = self.__dict__.pop("_submitted", [])
        out: list[FitResult | ClientFailure] = []
        for tasks, broadcast in submitted:
            out.extend(self.fit(tasks, broadcast))
        return out

    def available_clients(self) -> None:
        return None

    def connected_clients(self) -> None:
        return None

    def round_metrics(self) -> dict[str, Any]:
        return {}


class InProcessExecutor(LocalClients):
    """``device`` (``engine.device``) is where the clients train; the runtime then works
    on a copy of the learner there, and the server's own learner stays on the CPU."""

    def __init__(
        self, runtime: ClientRuntime, store: ClientStateStore, *, device: str = "cpu"
    ) -> None:
        self.runtime = runtime.on_device(resolve_device(device))
        self.store = store

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast
    ) -> list[FitResult | ClientFailure]:
        out: list[FitResult | ClientFailure] = []
        for task in tasks:
            state = self.store.get(task.client_id)
            result = run_safely(partial(self.runtime.fit, task, broadcast, state), task)
            if isinstance(result, FitResult):  # a failed fit leaves the state as it was
                self.store.put(task.client_id, state, round=task.round)
            out.append(result)
        return out

    def evaluate(
        self, tasks: Sequence[EvalTask], broadcast: Broadcast
    ) -> list[EvalResult | ClientFailure]:
        return [
            run_safely(partial(self.runtime.evaluate, t, broadcast, self.store.get(t.client_id)), t)
            for t in tasks
        ]

    def exchange(self, request: ExchangeRequest, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        return exchange_locally(self.runtime, request, outgoing)

    def save_client_state(self) -> dict[str, Any]:
        return self.store.manifest()

    def load_client_state(self, manifest: Mapping[str, Any]) -> None:
        self.store.restore(manifest)

    def close(self) -> None:
        self.runtime.forget_all()


def exchange_locally(
    runtime: ClientRuntime, request: ExchangeRequest, outgoing: Mapping[int, bytes]
) -> dict[int, bytes]:
    """Every participant answers in this process; one that refuses is a dropout."""
    replies: dict[int, bytes] = {}
    for pid, payload in outgoing.items():
        try:
            reply = runtime.respond(request, pid, payload)
        except Exception as err:
            log.warning(
                "%s stage %d: participant %d did not answer: %s",
                request.protocol,
                request.stage,
                pid,
                err,
            )
            continue
        if len(reply) > request.reply_limit:
            log.warning("%s: participant %d's reply is too long; dropped", request.protocol, pid)
            continue
        replies[pid] = reply
    return replies
