"""Local SGD: the client half of FedAvg (McMahan et al. 2017, Algorithm 1) and FedProx
(Li et al. 2020), and the server half they share.

FedProx adds the proximal term of Li et al. 2020, Eq. (2),
h_k(w; w_t) = F_k(w) + μ/2 ‖w − w_t‖², whose gradient μ(w − w_t) joins every local step;
μ = 0 is FedAvg's local update.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedloom.algorithms.base import (
    ClientContext,
    ClientUpdate,
    PlainServer,
    StageContext,
    full_global,
)
from fedloom.algorithms.vectorizable import LocalTraining
from fedloom.client.learner import GradientCorrection, OnDevice, TrainOutcome
from fedloom.messages import DELTA
from fedloom.registry import CLIENT_ALGORITHMS, SERVER_ALGORITHMS
from fedloom.seeding import SHUFFLE, torch_generator


def train_locally(
    ctx: ClientContext, start: np.ndarray, correction: GradientCorrection | None = None
) -> TrainOutcome:
    """The plan's local SGD from ``start`` with the client's own shuffles (seeded by run,
    round and client, so any engine reproduces it)."""
    assert ctx.plan is not None, "train_locally is for fit tasks"
    return ctx.learner.train(
        start=start,
        data=ctx.data.train,
        plan=ctx.plan,
        batch_size=ctx.work.batch_size,
        sgd=ctx.sgd,
        generator=torch_generator(ctx.seed, SHUFFLE, ctx.round, ctx.client_id),
        correction=correction,
    )


def proximal_correction(mu: float, anchor: torch.Tensor) -> GradientCorrection:
    """g ← g + μ(w − w_anchor): the gradient of μ/2 ‖w − w_anchor‖² (Li et al. 2020, Eq. 2)."""

    held = OnDevice(anchor)

    def correct(w: torch.Tensor, g: torch.Tensor) -> None:
        g.add_(w, alpha=mu).sub_(held.like(w), alpha=mu)

    return correct


def evaluate_global(ctx: ClientContext) -> dict[str, float]:
    """The global model's metrics on the client's test set."""
    test = ctx.data.test
    if test is None or len(test) == 0:
        return {}
    return ctx.learner.evaluate(full_global(ctx), test, ctx.eval_batch_size)


class LocalSGD:
    """FedAvg / FedProx client: local SGD from the global model, upload w_local − w_global."""

    def __init__(self, *, proximal_mu: float = 0.0) -> None:
        self.proximal_mu = proximal_mu

    def local_training(self, ctx: ClientContext) -> LocalTraining:
        """From the global model, with the proximal pull toward it (the vectorizable seam)."""
        return LocalTraining(start=full_global(ctx), proximal_mu=self.proximal_mu)

    def finish(
        self, ctx: ClientContext, training: LocalTraining, outcome: TrainOutcome
    ) -> ClientUpdate:
        return ClientUpdate(
            {DELTA: outcome.weights - training.start},
            {"train_loss": outcome.train_loss, "steps": float(outcome.steps)},
        )

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        training = self.local_training(ctx)
        start = training.start
        correction = None
        if training.proximal_mu:
            correction = proximal_correction(training.proximal_mu, torch.from_numpy(start.copy()))
        return self.finish(ctx, training, train_locally(ctx, start, correction))

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        return evaluate_global(ctx)


@CLIENT_ALGORITHMS.register("sgd")
def make_local_sgd(settings: Any, context: StageContext) -> LocalSGD:
    return LocalSGD(proximal_mu=settings.proximal_mu)


@SERVER_ALGORITHMS.register("fedavg")
def make_plain_server(settings: Any, context: StageContext) -> PlainServer:
    return PlainServer()
