"""The round loop: sample, broadcast, collect, aggregate, step, evaluate, record.

The loop never knows where clients run. It talks to a :class:`ClientExecutor` (the
engine) and an optional central evaluator, both handed in by whoever wires the run.
Failed clients come back as :class:`~fedloom.messages.ClientFailure` records: the loop
logs and stores them and decides from the configured minimums whether the round's
update is applied. It never waits on anything itself, so it cannot hang.

With central differential privacy (``privacy.mechanism = "central"``) the aggregation
step is DP-FedAvg's instead of the weighted mean: the clients have clipped their updates
(the task tells them the clipping norm), the loop checks that they did, and
:class:`~fedloom.privacy.central.CentralDP` adds noise to the sum, divides by the expected
number of clients and counts the round in its accountant. Every round then aggregates,
whatever the number of usable updates (even none): skipping a round because few clients
answered would make the release depend on who took part, outside what the accountant
analyses. The server optimizer applies the result as usual (post-processing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedloom.config import ConfigError, RunConfig
from fedloom.messages import ClientFailure, EvalResult, EvalTask, FitResult, FitTask
from fedloom.params import encoded_nbytes
from fedloom.privacy.central import CentralDP
from fedloom.privacy.secagg import RoundAbortedError, SecAggConfig
from fedloom.privacy.secagg.transport import SecureSum
from fedloom.seeding import SAMPLING, derive_rng
from fedloom.server.aggregate import weighted_mean
from fedloom.server.optimizers import ServerOptimizer, make_server_optimizer
from fedloom.server.sampling import expected_clients_per_round, select_clients
from fedloom.store import Checkpoint, RunStore

log = logging.getLogger("fedloom.server")


class ClientExecutor(Protocol):
    """Runs client tasks somewhere (this process, a pool, a cluster, the network)."""

    def fit(
        self, tasks: Sequence[FitTask], global_vector: np.ndarray
    ) -> list[FitResult | ClientFailure]: ...

    def evaluate(
        self, tasks: Sequence[EvalTask], global_vector: np.ndarray
    ) -> list[EvalResult | ClientFailure]: ...

    def available_clients(self) -> Sequence[int] | None:
        """Client ids to sample from (None: every client). May wait for enough clients."""
        ...

    def connected_clients(self) -> Sequence[int] | None:
        """Clients reachable right now, without waiting (None: all of them)."""
        ...

    def round_metrics(self) -> dict[str, Any]:
        """Engine-specific counters for the round record (e.g. rejected messages)."""
        ...

    def client_state(self) -> dict[str, Any]:
        """JSON-able state simulated clients keep across rounds, for checkpoints."""
        ...

    def restore_client_state(self, state: dict[str, Any]) -> None:
        """Give simulated clients back the state :meth:`client_state` returned."""
        ...

    def secure_sum(
        self, rnd: int, client_ids: Sequence[int], vector_length: int, config: SecAggConfig
    ) -> SecureSum:
        """Run SecAgg+ among clients holding their round-``rnd`` updates; the sum only."""
        ...

    def close(self) -> None: ...


class LocalClients:
    """The :class:`ClientExecutor` answers of an engine that runs every client itself.

    Simulation engines (in-process, process pool) reach every client at any time and keep
    no counters of their own, so sampling and federated evaluation cover all clients and
    the round record gets nothing extra.
    """

    def available_clients(self) -> None:
        return None

    def connected_clients(self) -> None:
        return None

    def round_metrics(self) -> dict[str, Any]:
        return {}


CentralEvaluator = Callable[[np.ndarray], tuple[float, float]]


@dataclass
class ServerState:
    """Everything needed to continue a run after the last completed round."""

    round: int
    weights: np.ndarray
    optimizer: ServerOptimizer
    participation: np.ndarray  # per client: rounds whose aggregate included its update
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Central DP's server state (clipping norm, privacy ledger), None without DP.
    privacy: CentralDP | None = None

    def checkpoint(self, seed: int, client_state: dict[str, Any] | None = None) -> Checkpoint:
        tensors = {"global": self.weights, "participation": self.participation}
        tensors.update({f"opt/{k}": v for k, v in self.optimizer.state().items()})
        meta: dict[str, Any] = {
            "round": self.round,
            "optimizer": self.optimizer.name,
            # All randomness is derived from (seed, purpose, round, client); see seeding.py.
            "rng": {"scheme": "SeedSequence(seed, purpose, round, client)", "seed": seed},
        }
        if self.privacy is not None:
            # The ledger (z, rounds) and the adaptive clipping norm: ε and C of a resumed
            # run continue exactly where they were.
            meta["privacy"] = self.privacy.checkpoint_meta()
        if client_state:
            # E.g. each simulated client's local-DP ledger, so its ε survives a resume.
            meta["client_state"] = client_state
        return Checkpoint(round=self.round, tensors=tensors, meta=meta)


class FederatedServer:
    """Runs rounds of a :class:`RunConfig` against a client executor."""

    def __init__(
        self,
        cfg: RunConfig,
        executor: ClientExecutor,
        initial_weights: np.ndarray,
        num_clients: int,
        central_evaluator: CentralEvaluator | None = None,
        eval_clients: Sequence[int] = (),
        store: RunStore | None = None,
    ) -> None:
        self.cfg = cfg
        self.executor = executor
        self.num_clients = num_clients
        self.central_evaluator = central_evaluator
        self.eval_clients = list(eval_clients)
        self.store = store
        #: Why the run ended before ``cfg.rounds`` (the privacy budget), else None.
        self.stopped_reason: str | None = None
        size = initial_weights.shape[0]
        self.state = ServerState(
            round=0,
            weights=initial_weights.astype(np.float32, copy=True),
            optimizer=make_server_optimizer(cfg.server, size),
            participation=np.zeros(num_clients, dtype=np.int64),
            privacy=self._make_privacy() if cfg.privacy.mechanism == "central" else None,
        )

    @property
    def privacy(self) -> CentralDP | None:
        return self.state.privacy

    def _make_privacy(self) -> CentralDP:
        """Central DP for this run; calibrates z before training when given a target ε."""
        from fedloom.privacy.accounting import ClientSampling

        cfg = self.cfg
        sampling = ClientSampling(
            cfg.server.sampling,
            self.num_clients,
            expected_clients_per_round(cfg.server, self.num_clients),
        )
        dp = CentralDP.from_config(cfg.privacy, sampling, cfg.rounds, cfg.seed)
        if dp.calibrated_for is not None:
            log.info(
                "privacy: noise multiplier z = %.4f calibrated for ε = %g at δ = %g over %d "
                "rounds (%s sampling, q = %.4g, %s accountant)",
                dp.noise_multiplier,
                dp.calibrated_for,
                cfg.privacy.delta,
                cfg.rounds,
                sampling.scheme,
                sampling.rate,
                cfg.privacy.accountant,
            )
        return dp

    def restore(self, ckpt: Checkpoint, history: list[dict[str, Any]]) -> None:
        """Continue from a checkpoint: weights, optimizer state, participation, history."""
        self.state.round = ckpt.round
        self.state.weights = ckpt.tensors["global"].astype(np.float32)
        self.state.participation = ckpt.tensors["participation"].astype(np.int64)
        self.state.optimizer.load_state(
            {k.removeprefix("opt/"): v for k, v in ckpt.tensors.items() if k.startswith("opt/")}
        )
        self.state.history = [r for r in history if r["round"] <= ckpt.round]
        self.executor.restore_client_state(ckpt.meta.get("client_state", {}))
        if self.privacy is not None:
            meta = ckpt.meta.get("privacy")
            if not isinstance(meta, dict):
                raise ConfigError(
                    f"checkpoint of round {ckpt.round} has no privacy ledger; it was not "
                    "written by a central-DP run, so this run cannot resume from it"
                )
            previous = self.store.get_meta("privacy") if self.store is not None else None
            rounds_run = previous.get("rounds") if isinstance(previous, dict) else None
            self.privacy.restore(meta, rounds_run)

    def run(self, on_round: Callable[[dict[str, Any]], None] | None = None) -> ServerState:
        """Run the remaining rounds up to ``cfg.rounds``, or until the privacy budget is spent.

        With ``privacy.max_epsilon`` the loop stops *before* a round whose ε would exceed
        it, logs one line saying so, and records it (``stopped_reason`` in the run store).
        """
        self._record_ledger()
        while self.state.round < self.cfg.rounds:
            reason = self.privacy.next_round_exceeds_budget() if self.privacy else None
            if reason is not None:
                self._stop(reason)
                break
            record = self.run_round(self.state.round + 1)
            if on_round is not None:
                on_round(record)
        return self.state

    def _stop(self, reason: str) -> None:
        log.warning("%s", reason)
        self.stopped_reason = reason
        if self.store is not None:
            self.store.set_meta("stopped_reason", reason)

    def _record_ledger(self) -> None:
        if self.privacy is not None and self.store is not None:
            self.store.set_meta("privacy", self.privacy.ledger())

    def run_round(self, rnd: int) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        started = time.perf_counter()
        sampled = self._sample(rnd)
        dp = self.privacy
        clip_norm = dp.clip_norm if dp is not None else None
        secure = cfg.privacy.secure_aggregation != "none"
        tasks = [
            FitTask(int(c), rnd, cfg.server.drop_stragglers, clip_norm, secure) for c in sampled
        ]
        updates, failures, dropped = _triage(self.executor.fit(tasks, state.weights), rnd, dp)
        self._record_failures(rnd, failures)

        # Under DP every round aggregates, whoever answered (see the module docstring).
        aggregated = dp is not None or len(updates) >= cfg.server.min_aggregate_clients
        secure_sum: np.ndarray | None = None
        secure_fields: dict[str, Any] = {}
        if secure and aggregated:
            updates, secure_sum, secure_fields = self._secure_aggregate(rnd, updates, clip_norm)
            aggregated = dp is not None or bool(updates)
        dp_fields: dict[str, Any] = {}
        if aggregated:
            update, dp_fields = self._aggregate(rnd, updates, secure_sum)
            state.weights = state.optimizer.step(state.weights, update)
            for u in updates:
                state.participation[u.client_id] += 1
        elif "secagg_aborted" not in secure_fields:  # an abort was logged with its cause
            log.warning(
                "round %d: only %d usable updates, fewer than server.min_aggregate_clients=%d; "
                "the global model is unchanged this round",
                rnd,
                len(updates),
                cfg.server.min_aggregate_clients,
            )

        record: dict[str, Any] = {
            "round": rnd,
            "accuracy": None,
            "loss": None,
            "fed_accuracy": None,
            "fed_loss": None,
            "train_loss": _weighted_train_loss(updates),
            "clients_sampled": len(sampled),
            "clients_succeeded": len(updates),
            "clients_failed": len(failures),
            "stragglers_dropped": dropped,
            "aggregated": aggregated,
            **_round_traffic(len(sampled), state.weights, updates, secure_fields),
            "epsilon": None,
        }
        record.update(secure_fields)
        local = [u.metrics["local_epsilon"] for u in updates if "local_epsilon" in u.metrics]
        if local:  # local DP-SGD: the worst client's ε so far (each reports its own)
            record["local_epsilon_max"] = max(local)
        record.update(dp_fields)
        record.update(self.executor.round_metrics())
        # The run's last round: the configured number, or the last the privacy budget allows.
        last = rnd == cfg.rounds or (dp is not None and dp.next_round_exceeds_budget() is not None)
        if rnd % cfg.eval.every == 0 or last:
            record.update(self._evaluate(rnd))
        record["round_s"] = time.perf_counter() - started
        state.round = rnd
        state.history.append(record)
        if self.store is not None:
            self.store.record_round(record)
            self._record_ledger()
            if rnd % cfg.checkpoint_every == 0 or last:
                self.store.save_checkpoint(state.checkpoint(cfg.seed, self.executor.client_state()))
        return record

    def _record_failures(self, rnd: int, failures: list[ClientFailure]) -> None:
        for f in failures:
            log.warning("round %d: client %d failed: %s", rnd, f.client_id, f.error)
            if f.traceback:
                log.debug("client %d traceback:\n%s", f.client_id, f.traceback)
            if self.store is not None:
                self.store.record_failure(rnd, f.client_id, f.error, f.traceback)

    def _aggregate(
        self, rnd: int, updates: list[FitResult], secure_sum: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The round's aggregated update and, under central DP, its record fields.

        ``secure_sum`` is the secure-aggregation sum of ``updates`` (None when they came
        in the clear). Central DP adds noise to the sum of the clipped updates (the secure
        sum when there is one); without DP it is the unweighted mean of a secure sum or
        the example-weighted mean of the clear updates.
        """
        dp = self.privacy
        if dp is not None:
            clipped = (
                [secure_sum]
                if secure_sum is not None and updates  # the sum is all there is
                else [u.delta for u in updates if u.delta is not None]
            )
            return dp.aggregate(
                rnd,
                clipped,
                [u.metrics.get("below_clip", 0.0) for u in updates],
                self.state.weights.shape[0],
            )
        if secure_sum is not None:
            return secure_sum / max(len(updates), 1), {}
        deltas = [u.delta for u in updates if u.delta is not None]
        return weighted_mean(deltas, [u.num_examples for u in updates]), {}

    def _secure_aggregate(
        self, rnd: int, held: list[FitResult], clip_norm: float | None
    ) -> tuple[list[FitResult], np.ndarray | None, dict[str, Any]]:
        """SecAgg+ over the clients holding updates: (contributors, sum, record fields).

        Coordinates are clipped to the central-DP clipping norm when there is one (an
        L2-clipped vector has no larger coordinate, so nothing more is lost), else to
        ``privacy.secagg_clip_range``. An aborted round aggregates nothing (no sum).
        """
        p = self.cfg.privacy
        config = SecAggConfig(
            clip_range=clip_norm if clip_norm is not None else p.secagg_clip_range,
            quantization_bits=p.secagg_quantization_bits,
        )
        ids = [u.client_id for u in held]
        try:
            result = self.executor.secure_sum(rnd, ids, self.state.weights.shape[0], config)
        except (RoundAbortedError, ValueError) as err:  # ValueError: a CKKS round aborted
            log.warning("round %d: secure aggregation aborted: %s", rnd, err)
            return (
                [],
                None,
                {
                    "secagg_aborted": str(err),
                    "secagg_bytes_up": getattr(err, "bytes_up", 0),
                    "secagg_bytes_down": getattr(err, "bytes_down", 0),
                },
            )
        contributors = set(result.contributors)
        fields = {
            "secagg_contributors": len(contributors),
            "secagg_bytes_up": result.bytes_up,
            "secagg_bytes_down": result.bytes_down,
        }
        return [u for u in held if u.client_id in contributors], result.sum, fields

    def _sample(self, rnd: int) -> np.ndarray:
        """Sample among the clients the engine can reach (all of them in simulation).

        When every client is available the draw is identical to sampling from
        ``range(num_clients)``, so a deployment samples exactly as the simulation does.
        """
        cfg = self.cfg
        available = self.executor.available_clients()
        pool = np.arange(self.num_clients) if available is None else np.asarray(available)
        if len(pool) == 0:
            return np.zeros(0, dtype=np.int64)
        index = select_clients(cfg.server, len(pool), derive_rng(cfg.seed, SAMPLING, rnd))
        return pool[index].astype(np.int64)

    def _evaluate(self, rnd: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.cfg.eval.centralized and self.central_evaluator is not None:
            out["loss"], out["accuracy"] = self.central_evaluator(self.state.weights)
        # In a deployment the clients that are connected evaluate on their own local test
        # data (the server cannot know who has any); in simulation, those with test sets.
        available = self.executor.connected_clients()
        evaluators = self.eval_clients if available is None else list(available)
        if self.cfg.eval.federated and evaluators:
            tasks = [EvalTask(c, rnd) for c in evaluators]
            results = [
                r
                for r in self.executor.evaluate(tasks, self.state.weights)
                if isinstance(r, EvalResult) and r.num_examples > 0
            ]
            n = sum(r.num_examples for r in results)
            if n:
                out["fed_loss"] = sum(r.loss * r.num_examples for r in results) / n
                out["fed_accuracy"] = sum(r.accuracy * r.num_examples for r in results) / n
        return out


def _triage(
    outcomes: Sequence[FitResult | ClientFailure], rnd: int, dp: CentralDP | None
) -> tuple[list[FitResult], list[ClientFailure], int]:
    """Split a round's fit outcomes into usable updates (sorted by client id), failures,
    and the number of dropped stragglers.

    An update with NaN/Inf, or one central DP must refuse (:func:`_dp_reject`), becomes a
    failure. A held update (secure aggregation) is usable as far as the server can tell.
    """
    updates: list[FitResult] = []
    failures: list[ClientFailure] = []
    dropped = 0
    for out in outcomes:
        if isinstance(out, ClientFailure):
            failures.append(out)
        elif out.held:
            updates.append(out)
        elif out.delta is None:
            dropped += 1
        elif not np.all(np.isfinite(out.delta)):
            failures.append(ClientFailure(out.client_id, rnd, "update contains NaN or Inf", ""))
        elif dp is not None and (why := _dp_reject(dp, out)):
            failures.append(ClientFailure(out.client_id, rnd, why, ""))
        else:
            updates.append(out)
    updates.sort(key=lambda r: r.client_id)
    return updates, failures, dropped


def _dp_reject(dp: CentralDP, result: FitResult) -> str | None:
    """Why a client's update must not enter the DP sum (None when it may)."""
    assert result.delta is not None
    why = dp.check_update(result.delta)
    if why is None and dp.adaptive is not None and "below_clip" not in result.metrics:
        why = "the client did not report the clipped-count bit that adaptive clipping needs"
    return why


def _round_traffic(
    sampled: int, weights: np.ndarray, updates: list[FitResult], secure_fields: dict[str, Any]
) -> dict[str, int]:
    """The round's ``bytes_down`` / ``bytes_up``: every byte the round put on the wire.

    Down is the global model sent to each sampled client; up is the clear updates
    returned. Under secure aggregation the updates travel inside the protocol instead
    (``FitResult.held``), so its traffic (``secagg_bytes_*``, kept in the record as
    the breakdown) is added here: these two fields stay the one source the run totals
    and reports sum, and a secure run is comparable with a plain one. Without secure
    aggregation nothing is added, so those runs' numbers are as before.
    """
    clear_up = sum(encoded_nbytes(u.delta) for u in updates if u.delta is not None)
    return {
        "bytes_down": sampled * encoded_nbytes(weights) + secure_fields.get("secagg_bytes_down", 0),
        "bytes_up": clear_up + secure_fields.get("secagg_bytes_up", 0),
    }


def _weighted_train_loss(updates: list[FitResult]) -> float | None:
    pairs = [
        (u.metrics["train_loss"], u.num_examples) for u in updates if "train_loss" in u.metrics
    ]
    n = sum(w for _, w in pairs)
    return sum(loss * w for loss, w in pairs) / n if n else None
