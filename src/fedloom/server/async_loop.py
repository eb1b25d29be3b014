"""Asynchronous rounds on the virtual clock: FedBuff and FedAsync.

There is no round barrier. ``concurrency`` clients train at any time; each starts from
the newest global model when it becomes free and finishes after its simulated duration
(its device profile). Results are applied as they arrive: FedBuff (Nguyen et al. 2022,
AISTATS, Algorithm 1) keeps a buffer and takes a server step when it holds K updates;
FedAsync (Xie et al. 2019, Algorithm 1) mixes each arriving model in at once. An update
that started from version v and arrives when the server is at version t has staleness
τ = t − v and is discounted by s(τ) = (1 + τ)^(−a) (FedAsync's polynomial staleness
function, Eq. 3; FedBuff uses a = 0.5, Section 5). One *round* of an asynchronous run is
one server step, so every record, callback, checkpoint and summary works as in a
synchronous run.

Client work is executed lazily and in batches: a client's training depends only on the
model it starts from and its own seeded draws, not on when on the virtual clock it
starts, so all clients launched on the same model version are trained in one call to
the engine (parallel on the pool engine) when the first of them is due.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedloom.messages import DELTA, ClientFailure, FitResult, FitTask
from fedloom.seeding import derive_rng
from fedloom.server.loop import FederatedServer
from fedloom.store import Checkpoint

log = logging.getLogger("fedloom.server")

#: Purpose tag of the draw of which idle client starts next.
ASYNC_LAUNCH = 104


@dataclass(frozen=True, kw_only=True)
class AsyncSettings:
    algorithm: str  # "fedbuff" | "fedasync"
    buffer_size: int
    concurrency: int
    staleness_exponent: float = 0.5
    #: FedAsync's mixing weight α.
    mixing: float = 0.6


def staleness_weight(staleness: int, exponent: float) -> float:
    """s(τ) = (1 + τ)^(−a) (Xie et al. 2019, Eq. 3, polynomial)."""
    return float((1.0 + staleness) ** (-exponent))


def adjusted_delta(
    delta: np.ndarray,
    *,
    settings: AsyncSettings,
    staleness: int,
    start: np.ndarray,
    current: np.ndarray,
) -> np.ndarray:
    """What an arriving update contributes to the server step.

    FedBuff: s(τ)·Δ, averaged over the buffer (Nguyen et al. 2022, Algorithm 1).
    FedAsync: x ← (1 − α_t)·x + α_t·x_new with x_new = x_start + Δ and α_t = α·s(τ)
    (Xie et al. 2019, Algorithm 1), i.e. a step of α_t·(x_start + Δ − x) with server
    SGD at learning rate 1.
    """
    weight = staleness_weight(staleness, settings.staleness_exponent)
    d = delta.astype(np.float64)
    if settings.algorithm == "fedasync":
        return (settings.mixing * weight * (d + start - current)).astype(np.float32)
    return (weight * d).astype(np.float32)


@dataclass(order=True)
class InFlight:
    """A client's task: launched on ``version`` at ``launched``, due at ``arrival``."""

    arrival: float
    seq: int
    client_id: int
    version: int
    launched: float
    result: FitResult | ClientFailure | None = None


class AsyncFederatedServer(FederatedServer):
    """The same stages and callbacks as :class:`FederatedServer`, without a barrier."""

    def __init__(
        self,
        *,
        settings: AsyncSettings,
        planned_duration: Callable[[int, int], float],
        **kwargs: Any,
    ) -> None:
        """``planned_duration(client_id, model_bytes)``: simulated seconds of a task."""
        super().__init__(**kwargs)
        self.settings = settings
        self.planned_duration = planned_duration
        self.sim_time_s = 0.0
        self.launches = 0
        self.inflight: list[InFlight] = []
        #: Global models that in-flight tasks started from (version → weights).
        self.versions: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------ launching
    def _launch(self, count: int) -> int:
        busy = {item.client_id for item in self.inflight}
        idle = np.array([c for c in range(self.num_clients) if c not in busy], dtype=np.int64)
        count = min(count, len(idle))
        if count <= 0:
            return 0
        rng = derive_rng(self.seed, ASYNC_LAUNCH, self.launches)
        picked = np.sort(idle[rng.choice(len(idle), size=count, replace=False)])
        version = self.state.round
        self.versions.setdefault(version, self.state.weights.copy())
        nbytes = int(self.state.weights.nbytes)
        for c in picked.tolist():
            self.launches += 1
            due = self.sim_time_s + self.planned_duration(c, nbytes)
            heapq.heappush(self.inflight, InFlight(due, self.launches, c, version, self.sim_time_s))
        return count

    def _train(self, due: InFlight) -> None:
        """Train every not-yet-trained task of ``due``'s version in one engine call."""
        batch = [i for i in self.inflight if i.version == due.version and i.result is None]
        batch.append(due)
        config, broadcast = self.strategy.configure_fit(due.version + 1, self.versions[due.version])
        tasks = [
            # A task's round is its launch number, so a client launched twice on the same
            # version draws fresh batches.
            FitTask(client_id=i.client_id, round=i.seq, model_version=i.version, config=config)
            for i in batch
        ]
        outcomes = {o.client_id: o for o in self.executor.fit(tasks, broadcast)}
        for i in batch:
            i.result = outcomes.get(i.client_id) or ClientFailure(
                client_id=i.client_id, round=i.seq, error="no result from the engine"
            )

    # --------------------------------------------------------------- rounds
    def run_round(self, rnd: int) -> dict[str, Any]:
        s, state = self.settings, self.state
        started = time.perf_counter()
        round_start_time = self.sim_time_s
        launched = 0
        if not self.inflight:
            launched += self._launch(s.concurrency)
        arrived: list[InFlight] = []
        failures: list[ClientFailure] = []
        while len(arrived) < s.buffer_size and self.inflight:
            item = heapq.heappop(self.inflight)
            if item.result is None:
                self._train(item)
            self.sim_time_s = max(self.sim_time_s, item.arrival)
            if isinstance(item.result, FitResult) and (item.result.vectors or item.result.held):
                arrived.append(item)
            else:
                if isinstance(item.result, ClientFailure):
                    failures.append(item.result)
            if len(arrived) < s.buffer_size:
                launched += self._launch(1)
        staleness = {i.client_id: state.round - i.version for i in arrived}
        outcomes: list[FitResult | ClientFailure] = [*failures]
        outcomes += [i.result for i in arrived if isinstance(i.result, FitResult)]
        starts = {i.client_id: self.versions[i.version] for i in arrived}
        result = self.strategy.process_fit(
            rnd,
            outcomes,
            state.weights,
            self.executor.exchange,
            adjust=self._adjuster(staleness, starts, state.weights),
        )
        self._record_failures(rnd, result.failures)
        if result.aggregated:
            state.weights = result.weights
            for u in result.updates:
                state.participation[u.client_id] += 1
        state.round = rnd
        launched += self._launch(s.concurrency - len(self.inflight))
        live = {i.version for i in self.inflight}
        self.versions = {v: w for v, w in self.versions.items() if v in live}
        _, broadcast = self.strategy.configure_fit(rnd, state.weights)
        record = self._record(rnd, launched, broadcast, result)
        values = list(staleness.values())
        record.update(
            {
                "staleness_mean": float(np.mean(values)) if values else None,
                "staleness_max": int(max(values)) if values else None,
                "sim_round_s": self.sim_time_s - round_start_time,
                "sim_time_s": self.sim_time_s,
                "in_flight": len(self.inflight),
            }
        )
        return self._close_round(rnd, record, result.updates, started)

    def _adjuster(
        self,
        staleness: Mapping[int, int],
        starts: Mapping[int, np.ndarray],
        current: np.ndarray,
        *,
        key: Callable[[FitResult], int] = lambda update: update.client_id,
    ) -> Callable[[FitResult], FitResult]:
        """The staleness discount of each update, found by ``key`` in ``staleness`` and
        ``starts`` (by client here; by task on the real clock, where a fast client may
        have two updates in one buffer, from different versions)."""

        def adjust(update: FitResult) -> FitResult:
            delta = adjusted_delta(
                update.vectors[DELTA],
                settings=self.settings,
                staleness=staleness[key(update)],
                start=starts[key(update)],
                current=current,
            )
            return replace(update, vectors={**update.vectors, DELTA: delta})

        return adjust

    # ----------------------------------------------------------- checkpoints
    def checkpoint(self) -> Checkpoint:
        ckpt = super().checkpoint()
        ckpt.meta["async"] = {
            "sim_time_s": self.sim_time_s,
            "launches": self.launches,
            "inflight": [
                [i.arrival, i.seq, i.client_id, i.version, i.launched] for i in self.inflight
            ],
        }
        for v, w in self.versions.items():
            ckpt.tensors[f"async/v{v}"] = w
        return ckpt

    def restore(self, ckpt: Checkpoint, history: list[dict[str, Any]]) -> None:
        super().restore(ckpt, history)
        meta = ckpt.meta.get("async")
        if meta is None:
            raise ValueError("the checkpoint is not from an asynchronous run; start a new run")
        self.sim_time_s = float(meta["sim_time_s"])
        self.launches = int(meta["launches"])
        # Work in flight is trained again from its starting model: the same seeded draws
        # give the same result, so a resume equals an uninterrupted run.
        self.inflight = [
            InFlight(float(a), int(q), int(c), int(v), float(t))
            for a, q, c, v, t in meta["inflight"]
        ]
        heapq.heapify(self.inflight)
        self.versions = {
            int(k.removeprefix("async/v")): np.asarray(w, dtype=np.float32)
            for k, w in ckpt.tensors.items()
            if k.startswith("async/v")
        }
