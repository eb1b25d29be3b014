"""The client side of a strategy, as every engine runs it: algorithm, codecs, held
uploads and protocol participants, over the client's persisted state.

Engines call three methods: :meth:`ClientRuntime.fit`, :meth:`ClientRuntime.evaluate`
and :meth:`ClientRuntime.respond` (a stage of a protocol such as secure aggregation).
They pass each client's state in and store it afterwards; they never look inside a task,
a result or a protocol message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch

from fedloom.algorithms.base import ClientAlgorithm, ClientContext, ClientUpdate
from fedloom.client.learner import Learner, SGDSettings, WorkSettings, plan_work
from fedloom.client_store import ClientState
from fedloom.codecs.base import BroadcastCodec, UpdateCodec
from fedloom.data.base import ClientData
from fedloom.exchange import ExchangeRequest, Participant
from fedloom.messages import (
    DROP_STRAGGLERS,
    HOLD,
    STEP_BUDGET,
    Broadcast,
    EvalResult,
    EvalTask,
    FitResult,
    FitTask,
    upload_order,
)
from fedloom.registry import PROTOCOL_PARTICIPANTS

#: Metrics a client keeps to itself: the pre-clip update norm is outside what central DP
#: accounts for, so it never leaves a deployed client.
PRIVATE_METRICS = frozenset({"update_norm"})


def server_metrics(*stages: object) -> frozenset[str]:
    """The metrics the run's server stages need from a client even under secure
    aggregation: each client stage names its own in ``server_metrics`` (the clipped-count
    bit of adaptive clipping, FedNova's normalizer)."""
    names: set[str] = set()
    for stage in stages:
        names.update(getattr(stage, "server_metrics", ()))
    return frozenset(names)


@dataclass(frozen=True, kw_only=True)
class PreparedFit:
    """A fit task with its client context and work plan, ready for training."""

    task: FitTask
    ctx: ClientContext


@dataclass(kw_only=True)
class ClientRuntime:
    """One process's client side; serves any client whose data it can reach."""

    learner: Learner
    algorithm: ClientAlgorithm
    codecs: list[UpdateCodec] = field(default_factory=list)
    #: Decodes a compressed broadcast before the algorithm sees it.
    downlink: BroadcastCodec | None = None
    data_of: Callable[[int], ClientData]
    seed: int
    work: WorkSettings
    sgd: SGDSettings
    eval_batch_size: int = 512
    #: Send training metrics (``train_loss`` …) and the example count in the clear. Off
    #: under secure aggregation unless ``privacy.reveal_client_metrics``: they describe
    #: one client's data, which the protocol exists to hide; a held upload then carries
    #: only the metrics the server's stages need (:func:`server_metrics`) and 0 examples.
    clear_metrics: bool = True
    _held: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    _participants: dict[tuple[str, int, int], Participant] = field(default_factory=dict)

    def initial_vector(self) -> np.ndarray:
        return self.learner.initial_vector()

    def on_device(self, device: torch.device) -> ClientRuntime:
        """This runtime training on ``device`` (``engine.device``): itself on its own
        device, else one around a copy of the learner there (:meth:`Learner.on_device`),
        with nothing held yet. Updates still come back as CPU NumPy vectors.

        The algorithm's ``check`` sees the moved learner, so one that cannot train there
        (DP-SGD through Opacus) refuses at start-up, not in every client's fit.
        """
        learner = self.learner.on_device(device)
        if learner is self.learner:
            return self
        check = getattr(self.algorithm, "check", None)
        if check is not None:
            check(learner)
        return replace(self, learner=learner, _held={}, _participants={})

    def _context(
        self, client_id: int, rnd: int, config: Any, broadcast: Broadcast, state: ClientState
    ) -> ClientContext:
        if self.downlink is not None:
            broadcast = self.downlink.decode(broadcast)
        return ClientContext(
            client_id=client_id,
            round=rnd,
            config=config,
            broadcast=broadcast,
            data=self.data_of(client_id),
            learner=self.learner,
            state=state,
            seed=self.seed,
            work=self.work,
            sgd=self.sgd,
            eval_batch_size=self.eval_batch_size,
        )

    def fit(self, task: FitTask, broadcast: Broadcast, state: ClientState) -> FitResult:
        """Train one client; ``state`` is updated in place (store it only on success)."""
        prepared = self.prepare_fit(task, broadcast, state)
        if isinstance(prepared, FitResult):
            return prepared
        return self.complete_fit(prepared, self.algorithm.fit(prepared.ctx))

    def prepare_fit(
        self, task: FitTask, broadcast: Broadcast, state: ClientState
    ) -> PreparedFit | FitResult:
        """Everything of :meth:`fit` before the algorithm trains: the context with the
        round's work plan, or the finished result of a straggler the round drops.

        An engine that trains many clients at once (the vectorized engine) calls this,
        trains, and hands each client's update to :meth:`complete_fit`.
        """
        ctx = self._context(task.client_id, task.round, task.config, broadcast, state)
        n = len(ctx.data.train)
        plan = plan_work(
            self.work, seed=self.seed, round=task.round, client_id=task.client_id, num_examples=n
        )
        budget = task.config.get(STEP_BUDGET)
        if isinstance(budget, int) and not isinstance(budget, bool):
            plan = plan.capped(budget, num_examples=n, batch_size=self.work.batch_size)
        if plan.straggler and task.config.get(DROP_STRAGGLERS, False):
            return FitResult(
                client_id=task.client_id,
                round=task.round,
                model_version=task.model_version,
                num_examples=n,
                straggler=True,
            )
        ctx.plan = plan
        return PreparedFit(task=task, ctx=ctx)

    def complete_fit(self, prepared: PreparedFit, update: ClientUpdate) -> FitResult:
        """Everything of :meth:`fit` after the algorithm: the codecs' encoding, and the
        upload held for a secure-aggregation protocol or returned."""
        task, ctx = prepared.task, prepared.ctx
        assert ctx.plan is not None
        base = partial(
            FitResult,
            client_id=task.client_id,
            round=task.round,
            model_version=task.model_version,
            num_examples=len(ctx.data.train),
        )
        if update.num_examples is not None:
            base = partial(base, num_examples=update.num_examples)
        vectors = update.vectors
        for codec in self.codecs:
            vectors = codec.encode(
                vectors,
                update.metrics,
                config=task.config,
                state=ctx.state,
                client_id=task.client_id,
                round=task.round,
            )
        protocol = task.config.get(HOLD)
        if isinstance(protocol, str) and protocol:
            self._forget_before(task.round)
            flat = np.concatenate([vectors[k] for k in upload_order(list(vectors))])
            self._held[(task.round, task.client_id)] = flat.astype(np.float32, copy=False)
            metrics = update.metrics
            if not self.clear_metrics:
                needed = server_metrics(self.algorithm, *self.codecs)
                metrics = {k: v for k, v in metrics.items() if k in needed}
                base = partial(base, num_examples=0)
            return base(metrics=metrics, straggler=ctx.plan.straggler, held=True)
        return base(vectors=vectors, metrics=update.metrics, straggler=ctx.plan.straggler)

    def evaluate(self, task: EvalTask, broadcast: Broadcast, state: ClientState) -> EvalResult:
        ctx = self._context(task.client_id, task.round, task.config, broadcast, state)
        test = ctx.data.test
        n = 0 if test is None else len(test)
        metrics = self.algorithm.evaluate(ctx) if n else {}
        return EvalResult(
            client_id=task.client_id, round=task.round, num_examples=n, metrics=metrics
        )

    def respond(self, request: ExchangeRequest, participant_id: int, payload: bytes) -> bytes:
        """Answer one protocol stage as ``participant_id`` (raises to refuse)."""
        key = (request.protocol, request.round, participant_id)
        participant = self._participants.get(key)
        if participant is None:
            held = self._held.pop((request.round, participant_id), None)
            factory = PROTOCOL_PARTICIPANTS.get(request.protocol)
            participant = factory(participant_id=participant_id, held=held)
            self._participants[key] = participant
        reply = participant.respond(request.stage, payload)
        if participant.finished(request.stage):
            self._participants.pop(key, None)
        return reply

    def _forget_before(self, rnd: int) -> None:
        """A round that never reached its protocol must not keep its uploads."""
        self._held = {k: v for k, v in self._held.items() if k[0] >= rnd}
        self._participants = {k: v for k, v in self._participants.items() if k[1] >= rnd}

    def forget_all(self) -> None:
        self._held.clear()
        self._participants.clear()
