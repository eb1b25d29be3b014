"""Gossip rounds in simulation: every peer trains, then averages with its neighbours.

Decentralized local SGD (Koloskova et al. 2020, Algorithm 1; with one local step it is
D-PSGD, Lian et al. 2017, Algorithm 1): each peer i takes its local steps from its own
model x_i, then x_i ← Σ_j W_ij x_{j}^{+½} with the topology's Metropolis–Hastings matrix W.
No server combines anything; the simulation only moves the peers' models between
neighbours. The record's ``accuracy`` is that of the peers' average x̄ (what consensus
converges to); ``peer_accuracy_mean``/``_min`` evaluate each peer's own model, and
``consensus_distance`` is (1/n) Σ‖x_i − x̄‖².
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.gossip.topology import (
    consensus_distance,
    metropolis_hastings,
    round_graph,
    spectral_gap,
)
from fedloom.messages import DELTA, ClientFailure, FitResult, FitTask
from fedloom.server.loop import FederatedServer
from fedloom.server.strategy import FitOutcome
from fedloom.store import Checkpoint

log = logging.getLogger("fedloom.gossip")


@dataclass(frozen=True, kw_only=True)
class GossipSettings:
    topology: str
    edge_probability: float = 0.3
    #: Draw a new graph each round (peers relabelled at random; a fresh Erdős–Rényi draw).
    time_varying: bool = False
    #: Evaluate each peer's own model every this many rounds (and in the last).
    eval_every: int = 1


class GossipServer(FederatedServer):
    """Runs gossip rounds; ``state.weights`` is the peers' average, for evaluation."""

    def __init__(
        self,
        *,
        settings: GossipSettings,
        evaluate_model: Callable[[np.ndarray], dict[str, float]] | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.evaluate_model = evaluate_model
        self.models = np.tile(self.state.weights, (self.num_clients, 1))
        self._fixed = self._graph(0) if not settings.time_varying else None

    def _graph(self, rnd: int) -> np.ndarray:
        s = self.settings
        return round_graph(
            s.topology,
            self.num_clients,
            seed=self.seed,
            rnd=rnd,
            edge_probability=s.edge_probability,
            time_varying=s.time_varying,
        )

    def run_round(self, rnd: int) -> dict[str, Any]:
        state, strategy = self.state, self.strategy
        started = time.perf_counter()
        config, _ = strategy.configure_fit(rnd, state.weights)
        halves = self.models.copy()
        updates: list[FitResult] = []
        failures: list[ClientFailure] = []
        for peer in range(self.num_clients):
            task = FitTask(client_id=peer, round=rnd, model_version=state.round, config=config)
            (out,) = self.executor.fit([task], strategy.algorithm.broadcast(self.models[peer]))
            if isinstance(out, ClientFailure):
                failures.append(out)
                continue
            delta = out.vectors.get(DELTA)
            if (
                delta is None
                or delta.shape != (self.models.shape[1],)
                or not np.all(np.isfinite(delta))
            ):
                failures.append(
                    ClientFailure(
                        client_id=peer, round=rnd, error="unusable update: kept its model"
                    )
                )
                continue
            halves[peer] = self.models[peer] + delta
            updates.append(out)
        a = self._fixed if self._fixed is not None else self._graph(rnd)
        w = metropolis_hastings(a)
        self.models = (w @ halves.astype(np.float64)).astype(np.float32)
        state.weights = self.models.mean(axis=0).astype(np.float32)
        for u in updates:
            state.participation[u.client_id] += 1
        self._record_failures(rnd, failures)
        fields: dict[str, Any] = {
            "consensus_distance": consensus_distance(self.models),
            "gossip_spectral_gap": spectral_gap(w),
        }
        outcome = FitOutcome(state.weights, True, updates, failures, 0, fields)
        record = self._record(rnd, self.num_clients, {}, outcome)
        # Every peer sends its model to each neighbour once: the round's traffic.
        sent = int(a.sum()) * int(self.models.shape[1]) * 4
        record.update({"bytes_up": sent, "bytes_down": sent})
        state.round = rnd
        self._run.last = rnd == self.rounds or self._stop_reason(rnd + 1) is not None
        if self.evaluate_model is not None and (
            rnd % self.settings.eval_every == 0 or self._run.last
        ):
            accs = [self.evaluate_model(m).get("accuracy") for m in self.models]
            values = [float(x) for x in accs if x is not None]
            if values:
                record["peer_accuracy_mean"] = float(np.mean(values))
                record["peer_accuracy_min"] = float(np.min(values))
        self._run.fit_results = updates
        self._run.round_started = started
        state.history.append(record)
        for cb in self.callbacks:
            cb.on_round_end(rnd, record, self._run)
        return record

    def checkpoint(self) -> Checkpoint:
        ckpt = super().checkpoint()
        ckpt.tensors["gossip/models"] = self.models
        return ckpt

    def restore(self, ckpt: Checkpoint, history: list[dict[str, Any]]) -> None:
        super().restore(ckpt, history)
        if "gossip/models" not in ckpt.tensors:
            raise ValueError("the checkpoint is not from a gossip run; start a new run")
        self.models = np.asarray(ckpt.tensors["gossip/models"], dtype=np.float32).copy()
