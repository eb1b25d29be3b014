"""Asynchronous rounds on the real clock (the deployment's loop) over a scripted engine.

The engine finishes each task a fixed number of ``fit_completed`` calls after it was
submitted (the client's speed), so the order of arrivals, and with it every staleness
and every server step, is known by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedloom.engine.inprocess import LocalClients
from fedloom.exchange import ExchangeRequest
from fedloom.messages import Broadcast, ClientFailure, EvalResult, EvalTask, FitResult, FitTask
from fedloom.server.async_loop import AsyncSettings
from fedloom.server.async_wallclock import WallClockAsyncServer
from tests.helpers import fedavg_strategy

D = 3


class _Timed(LocalClients):
    """Client c's task finishes ``ticks[c]`` calls of ``fit_completed`` after its submission;
    client c uploads the unit vector e_c. A client in ``lost_at`` loses its session at
    that tick: its task fails and it is no longer connected."""

    def __init__(self, ticks: Mapping[int, int], lost_at: Mapping[int, int] | None = None) -> None:
        self.ticks = ticks
        self.lost_at = dict(lost_at or {})
        self.now = 0
        self.flight: list[tuple[int, FitTask]] = []
        self.submitted: list[FitTask] = []

    def submit_fit(self, tasks: Sequence[FitTask], broadcast: Broadcast) -> None:
        self.submitted.extend(tasks)
        self.flight += [(self.now + self.ticks[t.client_id], t) for t in tasks]

    def fit_completed(self, *, wait_s: float) -> list[FitResult | ClientFailure]:
        self.now += 1
        out: list[FitResult | ClientFailure] = []
        for due, task in self.flight:
            lost = self.lost_at.get(task.client_id)
            if lost is not None and lost <= self.now:
                out.append(ClientFailure(client_id=task.client_id, round=task.round, error="lost"))
            elif due <= self.now:
                delta = np.zeros(D, np.float32)
                delta[task.client_id] = 1.0
                out.append(
                    FitResult(
                        client_id=task.client_id,
                        round=task.round,
                        model_version=task.model_version,
                        num_examples=10,
                        vectors={"delta": delta},
                    )
                )
        finished = {id(o) for o in out}
        rounds = {o.round for o in out}
        self.flight = [(d, t) for d, t in self.flight if t.round not in rounds]
        assert len(finished) == len(out)
        return out

    def connected_clients(self) -> list[int]:  # type: ignore[override]
        return [c for c in self.ticks if self.lost_at.get(c, 1 << 30) > self.now]

    def evaluate(
        self, tasks: Sequence[EvalTask], broadcast: Broadcast
    ) -> list[EvalResult | ClientFailure]:
        return []

    def exchange(self, request: ExchangeRequest, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        raise AssertionError("no protocol here")

    def save_client_state(self) -> dict[str, Any]:
        return {}

    def load_client_state(self, manifest: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


def _server(clients: _Timed, *, buffer: int = 2, rounds: int = 6) -> WallClockAsyncServer:
    strategy = fedavg_strategy(D)
    return WallClockAsyncServer(
        settings=AsyncSettings(algorithm="fedbuff", buffer_size=buffer, concurrency=3),
        strategy=strategy,
        executor=clients,
        initial_weights=np.zeros(D, np.float32),
        num_clients=len(clients.ticks),
        rounds=rounds,
        seed=0,
    )


def s(tau: int) -> float:
    return float((1 + tau) ** -0.5)  # FedBuff's staleness weight, exponent 0.5


def test_buffers_fill_without_waiting_for_the_slow_client_and_staleness_is_by_hand() -> None:
    """Clients 0 and 1 take one tick, client 2 five. Every tick the two fast clients
    fill a buffer; client 2's first update (from version 0) arrives at tick 5, when the
    server is at version 4: staleness 4, discounted by 5^-1/2. Hand trace:

    tick 1: tasks 1, 2 (c0, c1, v0) → step 1 with τ = 0, 0: w = (1/2, 1/2, 0)
    ticks 2–4: c0, c1 from the previous version (τ = 1) → each step adds s(1)·(1/2, 1/2, 0)
    tick 5: task 3 (c2, v0, τ = 4) and task 10 (c0, v3, τ = 1) fill step 5; task 11
            (c1, v3) waits in the buffer for step 6.
    """
    clients = _Timed({0: 1, 1: 1, 2: 5})
    server = _server(clients)
    records = [server.run_round(r) for r in range(1, 6)]
    assert [sorted(a["client"] for a in r["async_updates"]) for r in records] == [
        [0, 1],
        [0, 1],
        [0, 1],
        [0, 1],
        [0, 2],
    ]
    assert [r["staleness_max"] for r in records] == [0, 1, 1, 1, 4]
    first_of_2 = {"client": 2, "version": 0, "task": 3, "staleness": 4}
    assert records[4]["async_updates"][0] == first_of_2
    assert records[4]["staleness_mean"] == 2.5
    w = np.array([0.5, 0.5, 0.0]) + 3 * s(1) * np.array([0.5, 0.5, 0.0])
    w += np.array([s(1) / 2, 0.0, s(4) / 2])
    np.testing.assert_allclose(server.state.weights, w, rtol=1e-6)
    assert len(server.buffer) == 1 and server.buffer[0][0].client_id == 1  # carried over
    # Every free client is given a task at once (client 1 too, while its last update
    # waits in the buffer): the three are always busy.
    assert all(r["in_flight"] == 3 for r in records)
    assert [t.model_version for t in clients.submitted[:5]] == [0, 0, 0, 0, 0]


def test_a_lost_client_fails_its_task_and_the_others_keep_stepping() -> None:
    """Client 1 is lost at tick 2 with a task in flight: that task is a recorded failure,
    it gets no more tasks, and client 0 fills buffers alone (two of its own updates in one
    buffer, each discounted by its own staleness)."""
    clients = _Timed({0: 1, 1: 1, 2: 50}, lost_at={1: 2})
    server = _server(clients)
    records = [server.run_round(r) for r in range(1, 4)]
    assert records[0]["clients_failed"] == 0
    assert sum(r["clients_failed"] for r in records) == 1
    assert [sorted(a["client"] for a in r["async_updates"]) for r in records[1:]] == [[0, 0]] * 2
    late = [t for t in clients.submitted if t.client_id == 1]
    assert len(late) == 2  # the first task, and the one lost with the session; none after
    ckpt = server.checkpoint()
    assert ckpt.meta["async"] == {"clock": "wall", "launches": server.launches}
    fresh = _server(_Timed({0: 1, 1: 1, 2: 50}))
    fresh.restore(ckpt, server.state.history)
    assert fresh.state.round == 3 and fresh.launches == server.launches
    np.testing.assert_array_equal(fresh.state.weights, server.state.weights)
    assert fresh.run_round(4)["round"] == 4


def test_local_engines_finish_submitted_tasks_when_asked_in_order() -> None:
    class _Echo(LocalClients):
        def fit(
            self, tasks: Sequence[FitTask], broadcast: Broadcast
        ) -> list[FitResult | ClientFailure]:
            return [
                ClientFailure(client_id=t.client_id, round=t.round, error=str(broadcast["x"][0]))
                for t in tasks
            ]

    engine = _Echo()
    engine.submit_fit([FitTask(client_id=0, round=1, model_version=0)], {"x": np.ones(1)})
    engine.submit_fit([FitTask(client_id=1, round=2, model_version=1)], {"x": np.zeros(1)})
    out = engine.fit_completed(wait_s=0.0)
    assert [(o.client_id, o.round, o.error) for o in out] == [(0, 1, "1.0"), (1, 2, "0.0")]  # type: ignore[union-attr]
    assert engine.fit_completed(wait_s=0.0) == []
