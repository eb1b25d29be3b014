"""The default engine: clients run one after another in this process.

Exact and reproducible, and with the flat-parameter trainer nearly free of per-client
overhead, so it is also the reference every other engine is compared against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from fedloom.client.safety import run_safely
from fedloom.client.trainer import LocalTrainer
from fedloom.messages import ClientFailure, EvalResult, EvalTask, FitResult, FitTask
from fedloom.privacy.secagg import SecAggConfig
from fedloom.privacy.secagg.transport import (
    SecAggParticipant,
    SecureSum,
    exchange_in_process,
    serve_secagg_round,
)
from fedloom.server.loop import LocalClients


class InProcessExecutor(LocalClients):
    def __init__(self, trainer: LocalTrainer) -> None:
        self.trainer = trainer
        self._held: dict[tuple[int, int], np.ndarray] = {}

    def fit(
        self, tasks: Sequence[FitTask], global_vector: np.ndarray
    ) -> list[FitResult | ClientFailure]:
        if tasks:  # a round that never reached secure_sum must not keep its updates
            first = min(t.round for t in tasks)
            self._held = {k: v for k, v in self._held.items() if k[0] >= first}
        out = [run_safely(partial(self.trainer.fit, t, global_vector), t) for t in tasks]
        return [self._hold(r) if t.secure else r for t, r in zip(tasks, out, strict=True)]

    def _hold(self, result: FitResult | ClientFailure) -> FitResult | ClientFailure:
        """Keep a secure-aggregation update on the 'client' side, as a deployment does."""
        if isinstance(result, ClientFailure) or result.delta is None:
            return result
        self._held[(result.round, result.client_id)] = result.delta
        return replace(result, delta=None, held=True)

    def secure_sum(
        self, rnd: int, client_ids: Sequence[int], vector_length: int, config: SecAggConfig
    ) -> SecureSum:
        """SecAgg+ among simulated clients; every message goes through its byte encoding."""
        updates = {c: self._held.pop((rnd, c)) for c in client_ids}
        if self.trainer.cfg.privacy.secure_aggregation == "ckks":
            return _ckks_sum(rnd, updates, vector_length)
        participants = {c: SecAggParticipant(c, u) for c, u in updates.items()}
        return serve_secagg_round(
            client_ids, vector_length, config, exchange_in_process(participants)
        )

    def evaluate(
        self, tasks: Sequence[EvalTask], global_vector: np.ndarray
    ) -> list[EvalResult | ClientFailure]:
        return [
            run_safely(partial(self.trainer.evaluate_client, t, global_vector), t) for t in tasks
        ]

    def client_state(self) -> dict[str, Any]:
        return self.trainer.client_state()

    def restore_client_state(self, state: dict[str, Any]) -> None:
        self.trainer.restore_client_state(state)

    def close(self) -> None:
        self._held.clear()


def _ckks_sum(rnd: int, updates: dict[int, np.ndarray], vector_length: int) -> SecureSum:
    """CKKS aggregation (TenSEAL) through the deployment's protocol, every message in bytes.

    The simulated key holder releases sums of any size: the simulation is one party.
    """
    from fedloom.privacy.he_protocol import (
        HEKeyHolderParticipant,
        exchange_he_in_process,
        serve_he_round,
    )

    exchange = exchange_he_in_process(HEKeyHolderParticipant(min_contributors=1), updates)
    return serve_he_round(rnd, sorted(updates), vector_length, exchange)
