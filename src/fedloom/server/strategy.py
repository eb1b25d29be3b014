"""A strategy: the composition of stages a round runs through, and nothing else.

sample → configure (server algorithm + codecs say what clients get) → [engine runs the
clients] → triage and decode (codecs, in reverse) → interceptors (a simulated omniscient
adversary) → guard rails → [secure sum over the exchange] →
aggregate (aggregator) → combine (server algorithm) → step (server optimizer) →
transform (post-aggregation model transforms, e.g. a watermark).

The round loop calls the four methods of :class:`Strategy` and never knows which
algorithm, codec, aggregator or privacy mechanism runs; the strategy never knows which
engine moves the messages. Built-in strategy names (``fedavg``, ``scaffold``, …) are
compositions assembled by :mod:`fedloom.strategies`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedloom.algorithms.base import ServerAlgorithm
from fedloom.callbacks import Callback
from fedloom.codecs.base import (
    BroadcastCodec,
    Layout,
    RejectedUpdateError,
    UpdateCodec,
    float_layout,
)
from fedloom.config import ServerConfig
from fedloom.exchange import Exchange, Role, SecureAggregator
from fedloom.messages import (
    DELTA,
    DROP_STRAGGLERS,
    HOLD,
    Broadcast,
    ClientFailure,
    FitResult,
    Scalar,
    upload_order,
)
from fedloom.params import encoded_nbytes
from fedloom.seeding import SAMPLING, derive_rng
from fedloom.server.aggregators import AggregationInput, Aggregator, RoundRefusedError
from fedloom.server.arrivals import ArrivalModel, InstantArrivals
from fedloom.server.guards import DISCARDED, GuardRails, not_finite
from fedloom.server.interceptors import UpdateInterceptor
from fedloom.server.monitors import UpdateMonitor
from fedloom.server.optimizers import ServerOptimizer
from fedloom.server.sampling import clients_per_round, poisson_sample_clients
from fedloom.server.selection import ClientSelector, UniformSelector
from fedloom.server.transforms import ModelTransform

log = logging.getLogger("fedloom.server")


@dataclass
class FitOutcome:
    """A round's fit phase as the strategy concluded it."""

    weights: np.ndarray
    aggregated: bool
    updates: list[FitResult]
    failures: list[ClientFailure]
    stragglers_dropped: int
    fields: dict[str, Any] = field(default_factory=dict)
    #: Bytes of the usable clear uploads as they arrived (encoded by the codecs).
    bytes_up: int = 0


@dataclass(kw_only=True)
class Strategy:
    """The stages of one run; every stateful one is checkpointed through :meth:`state`."""

    algorithm: ServerAlgorithm
    aggregator: Aggregator
    optimizer: ServerOptimizer
    sampling: ServerConfig
    codecs: list[UpdateCodec] = field(default_factory=list)
    #: Downlink compression of the broadcast (the server keeps its float32 model).
    downlink: BroadcastCodec | None = None
    secure: SecureAggregator | None = None
    #: Applied in order to the new global model of every round that aggregated.
    transforms: list[ModelTransform] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)
    #: Stages that watch the individual updates beside the aggregator (anomaly detection).
    monitors: list[UpdateMonitor] = field(default_factory=list)
    #: Stages that may rewrite the decoded updates before the guard rails (a simulated
    #: omniscient adversary), in order.
    interceptors: list[UpdateInterceptor] = field(default_factory=list)
    min_aggregate_clients: int = 1
    drop_stragglers: bool = False
    dimension: int = 0
    #: When results reach the server (a simulated clock, or instantly).
    arrivals: ArrivalModel = field(default_factory=InstantArrivals)
    #: Which clients a fixed-size round asks (uniform, power-of-choice, Oort, a user's).
    selector: ClientSelector = field(default_factory=UniformSelector)
    #: Per round: how many results the sampler wanted (before over-selection).
    _wanted: dict[int, int] = field(default_factory=dict, init=False, repr=False)
    #: Bounds on one client's influence and the finiteness check; every run has them.
    guards: GuardRails = field(default_factory=GuardRails)
    #: Per round: how many clients the sample was drawn from, and how many it drew (a
    #: privacy accountant must count the sampling that happened, not the configured one).
    _sampled: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)
    #: Per round: the bytes of the broadcast :meth:`configure_fit` encoded, which
    #: :meth:`process_fit` hands the arrival model (so the round encodes it once).
    _down_bytes: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.secure is not None and self.aggregator.needs_individual_updates:
            raise ValueError(
                "this aggregator needs every client's update, which secure aggregation "
                "hides from the server; choose server.aggregator = 'mean' or turn "
                "privacy.secure_aggregation off"
            )
        for monitor in self.monitors:
            if self.secure is not None and monitor.needs_individual_updates:
                raise ValueError(
                    f"update monitor '{monitor.name}' reads every client's update, which secure "
                    "aggregation hides from the server; turn one of them off"
                )
        for interceptor in self.interceptors:
            if self.secure is not None and interceptor.needs_individual_updates:
                raise ValueError(
                    f"update interceptor '{interceptor.name}' reads every client's update, "
                    "which secure aggregation hides from the server; turn one of them off"
                )

    # ------------------------------------------------------------------ fit
    def sample(self, rnd: int, pool: np.ndarray, seed: int) -> np.ndarray:
        """Clients for round ``rnd`` among ``pool``. With every client available the draw
        equals sampling from ``range(num_clients)``: a deployment samples as a simulation.
        Monitors may first narrow the pool (clients whose reputation fell too low)."""
        for monitor in self.monitors:
            pool = monitor.eligible(rnd, pool)
        pool = self.arrivals.available(rnd, pool)
        self._sampled = {r: v for r, v in self._sampled.items() if r >= rnd - 1}
        if len(pool) == 0:
            self._sampled[rnd] = (0, 0)
            return np.zeros(0, dtype=np.int64)
        rng = derive_rng(seed, SAMPLING, rnd)
        s = self.sampling
        if s.sampling == "poisson":
            picked = pool[poisson_sample_clients(len(pool), s.fraction_fit, rng)]
            self._wanted[rnd] = len(picked)
            self._sampled[rnd] = (len(pool), len(picked))
            return picked.astype(np.int64)
        wanted = clients_per_round(len(pool), s.fraction_fit, s.min_fit_clients)
        self._wanted[rnd] = wanted
        count = min(len(pool), self.arrivals.cohort_size(wanted))
        self._sampled[rnd] = (len(pool), count)
        return self.selector.select(rnd, pool.astype(np.int64), count, rng)

    def configure_fit(self, rnd: int, weights: np.ndarray) -> tuple[dict[str, Scalar], Broadcast]:
        """The round's task config (one for every client) and broadcast vectors."""
        config: dict[str, Scalar] = {DROP_STRAGGLERS: self.drop_stragglers}
        config.update(self.algorithm.task_config(rnd))
        for codec in self.codecs:
            config.update(codec.task_config(rnd))
        if self.secure is not None:
            config[HOLD] = self.secure.protocol
        broadcast = self.encoded_broadcast(weights)
        self._down_bytes = {r: n for r, n in self._down_bytes.items() if r >= rnd - 1}
        self._down_bytes[rnd] = _broadcast_nbytes(broadcast)
        return config, broadcast

    def client_config(
        self, rnd: int, client_id: int, config: Mapping[str, Scalar], broadcast: Broadcast
    ) -> Mapping[str, Scalar]:
        """One client's task config: the round's, plus what the arrival model tells this
        client alone (the step budget a deadline leaves its device)."""
        down_bytes = _broadcast_nbytes(broadcast)
        own = self.arrivals.task_config(rnd, client_id, down_bytes=down_bytes)
        return {**config, **own} if own else config

    def encoded_broadcast(self, weights: np.ndarray) -> Broadcast:
        """The broadcast of ``weights`` as it travels (after any downlink codec)."""
        broadcast = self.algorithm.broadcast(weights)
        return broadcast if self.downlink is None else self.downlink.encode(broadcast)

    def upload_sizes(self) -> dict[str, int]:
        """The decoded uploads the aggregator and the server algorithm receive."""
        return self.algorithm.upload_sizes(self.dimension)

    def wire_layout(self) -> Layout:
        """What a client's upload carries on the wire: the codecs' encoded arrays."""
        layout = float_layout(self.upload_sizes())
        for codec in self.codecs:
            layout = codec.encoded_layout(layout)
        return layout

    def process_fit(
        self,
        rnd: int,
        outcomes: Sequence[FitResult | ClientFailure],
        weights: np.ndarray,
        exchange: Exchange,
        *,
        adjust: Callable[[FitResult], FitResult] | None = None,
    ) -> FitOutcome:
        """Triage, decode, (securely) aggregate, combine and step: the new global model.

        ``adjust`` rewrites each decoded update before aggregation (the asynchronous
        loop's staleness discount); it never sees held (secure-aggregation) uploads.
        """
        down_bytes = self._down_bytes.pop(rnd, None)
        if down_bytes is None:  # no configure_fit for this round (a direct call)
            down_bytes = _broadcast_nbytes(self.encoded_broadcast(weights))
        self._down_bytes = {r: n for r, n in self._down_bytes.items() if r > rnd}
        arrivals = self.arrivals.arrive(
            rnd, outcomes, down_bytes=down_bytes, wanted=self._wanted.pop(rnd, len(outcomes))
        )
        updates, failures, dropped, bytes_up = self._triage(rnd, arrivals.outcomes)
        dropped += arrivals.late
        fields: dict[str, Any] = dict(arrivals.fields)
        for interceptor in self.interceptors:
            updates, intercepted = interceptor.intercept(rnd, updates, global_weights=weights)
            fields.update(intercepted)
        screened = self.guards.screen(rnd, updates)
        updates = screened.updates
        failures.extend(screened.rejected)
        self.selector.observe(rnd, updates, arrivals.durations)
        if adjust is not None:
            updates = [u if u.held else adjust(u) for u in updates]
        every_round = self.aggregator.aggregates_every_round
        aggregated = every_round or len(updates) >= self.min_aggregate_clients
        fields.update(screened.fields)
        total: np.ndarray | None = None
        if self.secure is not None and aggregated:
            length = sum(size for size, _ in self.wire_layout().values())
            secure = self.secure.run(rnd, [u.client_id for u in updates], length, exchange)
            fields["secagg_bytes_up"] = secure.bytes_up
            fields["secagg_bytes_down"] = secure.bytes_down
            if secure.aborted is not None:
                fields["secagg_aborted"] = secure.aborted
                updates = []
            else:
                fields["secagg_contributors"] = len(secure.contributors)
                contributors = set(secure.contributors)
                updates = [u for u in updates if u.client_id in contributors]
                total = secure.total
            aggregated = every_round or bool(updates)
        if not aggregated:
            if "secagg_aborted" not in fields:  # an abort was logged with its cause
                log.warning(
                    "round %d: only %d usable updates, fewer than "
                    "server.min_aggregate_clients=%d; the global model is unchanged this round",
                    rnd,
                    len(updates),
                    self.min_aggregate_clients,
                )
            return FitOutcome(weights, False, updates, failures, dropped, fields, bytes_up)
        try:
            new_weights, agg_fields = self._aggregate(rnd, updates, total, weights)
        except RoundRefusedError as err:
            fields[DISCARDED] = str(err)
            log.warning(
                "round %d: discarded, the global model is unchanged and nothing of this "
                "round is broadcast: %s",
                rnd,
                err,
            )
            return FitOutcome(weights, False, updates, failures, dropped, fields, bytes_up)
        fields.update(agg_fields)
        for transform in self.transforms:
            new_weights, transform_fields = transform.transform(rnd, new_weights)
            fields.update(transform_fields)
        return FitOutcome(new_weights, True, updates, failures, dropped, fields, bytes_up)

    def _aggregate(
        self,
        rnd: int,
        updates: list[FitResult],
        total: np.ndarray | None,
        weights: np.ndarray,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        sizes = self.upload_sizes()
        names = upload_order(sizes)
        parts: dict[str, np.ndarray] = {}
        if total is not None:
            # The secure sum is of the encoded uploads: split it as they were laid out,
            # then let the codecs (linear ones only, see strategies) decode the sum.
            layout = self.wire_layout()
            offset = 0
            for name in upload_order(layout):
                parts[name] = total[offset : offset + layout[name][0]]
                offset += layout[name][0]
            for codec in reversed(self.codecs):
                parts = codec.decode_sum(parts, rnd=rnd)
        inp = AggregationInput(
            round=rnd,
            dimension=sizes[DELTA],
            updates=None if total is not None else _rows(updates, DELTA, sizes[DELTA]),
            weights=np.array([u.num_examples for u in updates], dtype=np.float64),
            total=parts.get(DELTA),
            count=len(updates),
            metrics=[u.metrics for u in updates],
            client_ids=[u.client_id for u in updates],
            global_weights=weights,
            pool_size=self._sampled.get(rnd, (None, None))[0],
            sample_size=self._sampled.get(rnd, (None, None))[1],
        )
        fields: dict[str, Any] = {}
        if inp.updates is not None:
            for monitor in self.monitors:
                fields.update(monitor.observe(inp))
        aggregate, agg_fields = self.aggregator.aggregate(inp)
        fields.update(agg_fields)
        _refuse_if_not_finite("the aggregate", aggregate)
        extras: dict[str, np.ndarray] = {}
        for name in names[1:]:
            if updates:
                if total is not None:
                    summed = parts[name].astype(np.float64)
                else:  # only their mean is wanted: a running sum, no k×d stack
                    summed = np.zeros(sizes[name], dtype=np.float64)
                    for u in updates:
                        summed += u.vectors[name]
                extras[name] = (summed / len(updates)).astype(np.float32)
            else:
                extras[name] = np.zeros(sizes[name], dtype=np.float32)
        update, algo_fields = self.algorithm.combine(
            rnd=rnd, aggregate=aggregate, extras=extras, contributors=updates
        )
        _refuse_if_not_finite("the server algorithm's update", update)
        fields.update(algo_fields)
        before = {
            k: v.copy() if isinstance(v, np.ndarray) else v
            for k, v in self.optimizer.state().items()
        }
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            new_weights = self.optimizer.step(weights, update)
        why = not_finite("the next global model", new_weights)
        if why is not None:
            self.optimizer.load_state(before)  # the discarded step must leave no trace
            raise RoundRefusedError(why)
        return new_weights, fields

    def _triage(
        self, rnd: int, outcomes: Sequence[FitResult | ClientFailure]
    ) -> tuple[list[FitResult], list[ClientFailure], int, int]:
        """Usable updates (sorted by client id), failures, dropped stragglers, and the
        bytes the usable clear uploads arrived in (before decoding).

        An update a codec refuses, or that decodes to NaN/Inf or a vector of the wrong
        size, becomes a failure. A held update (secure aggregation) is usable as far as
        the server can tell.
        """
        sizes = float_layout(self.upload_sizes())
        wire = self.wire_layout()
        updates: list[FitResult] = []
        failures: list[ClientFailure] = []
        dropped = 0
        bytes_up = 0
        for out in outcomes:
            if isinstance(out, ClientFailure):
                failures.append(out)
                continue
            if out.held:
                updates.append(out)
                continue
            if not out.vectors:
                dropped += 1
                continue
            arrived = sum(encoded_nbytes(v) for v in out.vectors.values())
            why = _check_vectors(out.vectors, wire)
            if why is None:
                try:
                    for codec in reversed(self.codecs):
                        out = codec.decode(out)
                except RejectedUpdateError as err:
                    why = str(err)
            if why is None and self.codecs:
                why = _check_vectors(out.vectors, sizes)
            if why is not None:
                failures.append(ClientFailure(client_id=out.client_id, round=rnd, error=why))
            else:
                updates.append(out)
                bytes_up += arrived
        updates.sort(key=lambda r: r.client_id)
        return updates, failures, dropped, bytes_up

    # ------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, rnd: int, weights: np.ndarray
    ) -> tuple[dict[str, Scalar], Broadcast]:
        return {}, self.encoded_broadcast(weights)

    def roles(self) -> list[Role]:
        return self.secure.roles() if self.secure is not None else []

    # ----------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Tensors and JSON of every stateful stage, prefixed by stage."""
        tensors: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {}
        for prefix, stage in self._stages():
            for key, value in stage.state().items():
                if isinstance(value, np.ndarray):
                    tensors[f"{prefix}/{key}"] = value
                else:
                    meta[f"{prefix}/{key}"] = value
        return tensors, meta

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        for prefix, stage in self._stages():
            own = {
                k.removeprefix(f"{prefix}/"): v
                for k, v in [*tensors.items(), *meta.items()]
                if k.startswith(f"{prefix}/")
            }
            stage.load_state(own)

    def _stages(self) -> list[tuple[str, Any]]:
        stages: list[tuple[str, Any]] = [
            ("opt", self.optimizer),
            ("algo", self.algorithm),
            ("agg", self.aggregator),
            ("clock", self.arrivals),
            ("select", self.selector),
        ]
        stages += [(f"transform{i}", t) for i, t in enumerate(self.transforms)]
        stages += [(f"icpt/{i.name}", i) for i in self.interceptors]
        return stages + [(f"mon/{m.name}", m) for m in self.monitors]


def _broadcast_nbytes(broadcast: Broadcast) -> int:
    """The bytes of a broadcast, as the arrival model times its download."""
    return sum(v.nbytes for v in broadcast.values())


def _refuse_if_not_finite(what: str, vector: np.ndarray) -> None:
    why = not_finite(what, vector)
    if why is not None:
        raise RoundRefusedError(why)


def _rows(updates: list[FitResult], name: str, size: int) -> np.ndarray:
    """The updates' ``name`` vectors as the rows of one k×d float32 matrix.

    Each result's vector is re-pointed at its row once copied there, which lets go of
    its own buffer (in a deployment, the buffer the upload was received into) at once:
    a round holds its k updates once, not twice, on the way to the aggregator.
    """
    matrix = np.empty((len(updates), size), dtype=np.float32)
    for row, u in zip(matrix, updates, strict=True):
        vector = u.vectors[name]
        row[:] = vector
        if vector.dtype == np.float32:  # another dtype stays as it came; the row is a cast
            u.vectors[name] = row
    # The rows are now the results' vectors: a stage that changed the matrix in place
    # would change what the round records of each client. Copy to modify.
    matrix.flags.writeable = False
    return matrix


def _check_vectors(vectors: Mapping[str, np.ndarray], layout: Layout) -> str | None:
    """Names, shapes and dtypes as ``layout`` says (any float dtype where it says
    float32: engines carry floats as float32), and no NaN/Inf among the floats."""
    if set(vectors) != set(layout):
        return f"update carries vectors {sorted(vectors)}, expected {sorted(layout)}"
    for name, (size, dtype) in layout.items():
        v = vectors[name]
        if v.shape != (size,):
            return f"update vector '{name}' has shape {v.shape}, expected ({size},)"
        if dtype == "float32" and np.issubdtype(v.dtype, np.floating):
            if not np.all(np.isfinite(v)):
                return "update contains NaN or Inf"
        elif v.dtype != np.dtype(dtype):
            return f"update vector '{name}' is {v.dtype}, expected {dtype}"
    return None
