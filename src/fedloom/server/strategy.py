"""A strategy: the composition of stages a round runs through, and nothing else.

sample → configure (server algorithm + codecs say what clients get) → [engine runs the
clients] → triage and decode (codecs, in reverse) → [secure sum over the exchange] →
aggregate (aggregator) → combine (server algorithm) → step (server optimizer).

The round loop calls the four methods of :class:`Strategy` and never knows which
algorithm, codec, aggregator or privacy mechanism runs; the strategy never knows which
engine moves the messages. Built-in strategy names (``fedavg``, ``scaffold``, …) are
compositions assembled by :mod:`fedloom.strategies`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedloom.algorithms.base import ServerAlgorithm
from fedloom.callbacks import Callback
from fedloom.codecs.base import RejectedUpdateError, UpdateCodec
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
from fedloom.seeding import SAMPLING, derive_rng
from fedloom.server.aggregators import AggregationInput, Aggregator, RoundRefusedError
from fedloom.server.guards import DISCARDED, GuardRails, not_finite
from fedloom.server.optimizers import ServerOptimizer
from fedloom.server.sampling import select_clients

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


@dataclass(kw_only=True)
class Strategy:
    """The stages of one run; every stateful one is checkpointed through :meth:`state`."""

    algorithm: ServerAlgorithm
    aggregator: Aggregator
    optimizer: ServerOptimizer
    sampling: ServerConfig
    codecs: list[UpdateCodec] = field(default_factory=list)
    secure: SecureAggregator | None = None
    callbacks: list[Callback] = field(default_factory=list)
    min_aggregate_clients: int = 1
    drop_stragglers: bool = False
    dimension: int = 0
    #: Bounds on one client's influence and the finiteness check; every run has them.
    guards: GuardRails = field(default_factory=GuardRails)
    #: Per round: how many clients the sample was drawn from, and how many it drew (a
    #: privacy accountant must count the sampling that happened, not the configured one).
    _sampled: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.secure is not None and self.aggregator.needs_individual_updates:
            raise ValueError(
                "this aggregator needs every client's update, which secure aggregation "
                "hides from the server; choose server.aggregator = 'mean' or turn "
                "privacy.secure_aggregation off"
            )

    # ------------------------------------------------------------------ fit
    def sample(self, rnd: int, pool: np.ndarray, seed: int) -> np.ndarray:
        """Clients for round ``rnd`` among ``pool``. With every client available the draw
        equals sampling from ``range(num_clients)``: a deployment samples as a simulation."""
        self._sampled = {r: v for r, v in self._sampled.items() if r >= rnd - 1}
        if len(pool) == 0:
            self._sampled[rnd] = (0, 0)
            return np.zeros(0, dtype=np.int64)
        index = select_clients(self.sampling, len(pool), derive_rng(seed, SAMPLING, rnd))
        self._sampled[rnd] = (len(pool), len(index))
        return pool[index].astype(np.int64)

    def configure_fit(self, rnd: int, weights: np.ndarray) -> tuple[dict[str, Scalar], Broadcast]:
        """The round's task config (one for every client) and broadcast vectors."""
        config: dict[str, Scalar] = {DROP_STRAGGLERS: self.drop_stragglers}
        config.update(self.algorithm.task_config(rnd))
        for codec in self.codecs:
            config.update(codec.task_config(rnd))
        if self.secure is not None:
            config[HOLD] = self.secure.protocol
        return config, self.algorithm.broadcast(weights)

    def upload_sizes(self) -> dict[str, int]:
        return self.algorithm.upload_sizes(self.dimension)

    def process_fit(
        self,
        rnd: int,
        outcomes: Sequence[FitResult | ClientFailure],
        weights: np.ndarray,
        exchange: Exchange,
    ) -> FitOutcome:
        """Triage, decode, (securely) aggregate, combine and step: the new global model."""
        updates, failures, dropped = self._triage(rnd, outcomes)
        screened = self.guards.screen(rnd, updates)
        updates = screened.updates
        failures.extend(screened.rejected)
        every_round = self.aggregator.aggregates_every_round
        aggregated = every_round or len(updates) >= self.min_aggregate_clients
        fields: dict[str, Any] = dict(screened.fields)
        total: np.ndarray | None = None
        if self.secure is not None and aggregated:
            sizes = self.upload_sizes()
            secure = self.secure.run(
                rnd, [u.client_id for u in updates], sum(sizes.values()), exchange
            )
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
            return FitOutcome(weights, False, updates, failures, dropped, fields)
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
            return FitOutcome(weights, False, updates, failures, dropped, fields)
        fields.update(agg_fields)
        return FitOutcome(new_weights, True, updates, failures, dropped, fields)

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
            offset = 0
            for name in names:
                parts[name] = total[offset : offset + sizes[name]]
                offset += sizes[name]
        inp = AggregationInput(
            round=rnd,
            dimension=sizes[DELTA],
            updates=None if total is not None else _rows(updates, DELTA, sizes[DELTA]),
            weights=np.array([u.num_examples for u in updates], dtype=np.float64),
            total=parts.get(DELTA),
            count=len(updates),
            metrics=[u.metrics for u in updates],
            client_ids=[u.client_id for u in updates],
            pool_size=self._sampled.get(rnd, (None, None))[0],
            sample_size=self._sampled.get(rnd, (None, None))[1],
        )
        aggregate, fields = self.aggregator.aggregate(inp)
        _refuse_if_not_finite("the aggregate", aggregate)
        extras: dict[str, np.ndarray] = {}
        for name in names[1:]:
            if updates:
                summed: np.ndarray = (
                    parts[name].astype(np.float64)
                    if total is not None
                    else np.stack([u.vectors[name] for u in updates]).sum(axis=0, dtype=np.float64)
                )
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
    ) -> tuple[list[FitResult], list[ClientFailure], int]:
        """Usable updates (sorted by client id), failures, and dropped stragglers.

        An update with NaN/Inf or a vector of the wrong size, or one a codec refuses,
        becomes a failure. A held update (secure aggregation) is usable as far as the
        server can tell.
        """
        sizes = self.upload_sizes()
        updates: list[FitResult] = []
        failures: list[ClientFailure] = []
        dropped = 0
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
            why = _check_vectors(out.vectors, sizes)
            if why is None:
                try:
                    for codec in reversed(self.codecs):
                        out = codec.decode(out)
                except RejectedUpdateError as err:
                    why = str(err)
            if why is not None:
                failures.append(ClientFailure(client_id=out.client_id, round=rnd, error=why))
            else:
                updates.append(out)
        updates.sort(key=lambda r: r.client_id)
        return updates, failures, dropped

    # ------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, rnd: int, weights: np.ndarray
    ) -> tuple[dict[str, Scalar], Broadcast]:
        return {}, self.algorithm.broadcast(weights)

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
        return [("opt", self.optimizer), ("algo", self.algorithm), ("agg", self.aggregator)]


def _refuse_if_not_finite(what: str, vector: np.ndarray) -> None:
    why = not_finite(what, vector)
    if why is not None:
        raise RoundRefusedError(why)


def _rows(updates: list[FitResult], name: str, size: int) -> np.ndarray:
    if not updates:
        return np.zeros((0, size), dtype=np.float32)
    return np.stack([u.vectors[name] for u in updates]).astype(np.float32, copy=False)


def _check_vectors(vectors: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> str | None:
    if set(vectors) != set(sizes):
        return f"update carries vectors {sorted(vectors)}, expected {sorted(sizes)}"
    for name, size in sizes.items():
        v = vectors[name]
        if v.shape != (size,):
            return f"update vector '{name}' has shape {v.shape}, expected ({size},)"
        if not np.all(np.isfinite(v)):
            return "update contains NaN or Inf"
    return None
