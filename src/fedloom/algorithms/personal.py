"""Personalized federated learning: FedPer, FedRep and Ditto as client and server halves.

*Split models* (FedPer, FedRep) federate a shared body and keep a personal head on each
client: only the shared coordinates travel (the server half ``"personal"`` broadcasts
and receives them), and each client's head lives in its persisted state under
``"personal/head"``. Which coordinates are personal is
:meth:`fedloom.params.ParamSpec.personal_mask` of ``personal.layers`` (empty: the last
layer).

- FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers"):
  the client trains body and head together from (global body, own head) and uploads
  the change of the body.
- FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized
  Federated Learning", Algorithm 1): the client first trains only its head for
  ``personal.personal_epochs`` epochs with the received body frozen, then only the body
  for the round's epochs with the new head frozen, and uploads the change of the body.

*Ditto* (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization", Algorithm 1) keeps the whole model shared: the global model trains as
in FedAvg (server half ``"fedavg"``), and beside it each client trains a personal model
v_k on h_k(v; w_t) = F_k(v) + λ/2 ‖v − w_t‖² (Eq. 2), whose pull toward the round's
global model w_t is a gradient correction of the same local SGD.

Every client reports, on its own test set, ``personalized_loss`` / ``personalized_*``
metrics of the model it would actually use (its own head, or v_k), which the federated
evaluation averages over clients with equal weight; and ``loss`` / ``accuracy`` of the
server's model (see :meth:`SplitClient.evaluate` for what that is for split models).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
from fedloom.algorithms.sgd import evaluate_global, proximal_correction, train_locally
from fedloom.client.learner import (
    GradientCorrection,
    OnDevice,
    SGDSettings,
    TrainOutcome,
    WorkPlan,
)
from fedloom.config import ConfigError, PersonalizationConfig
from fedloom.messages import DELTA, GLOBAL, FitResult
from fedloom.params import ParamSpec
from fedloom.registry import CLIENT_ALGORITHMS, SERVER_ALGORITHMS
from fedloom.seeding import SHUFFLE, torch_generator

#: Client-state tensor of a split model's personal coordinates (FedPer, FedRep).
HEAD_STATE = "personal/head"
#: Client-state tensor of Ditto's personal model v_k (a full model vector).
DITTO_STATE = "ditto/v"
#: Extra key element of the shuffles of a client's personal training (FedRep's head
#: phase, Ditto's v_k), so they are independent of the shuffles of its shared training.
PERSONAL_STREAM = 1


def personal_settings(settings: Any) -> PersonalizationConfig:
    """The ``personal`` section the algorithm settings carry (defaults when absent)."""
    personal = getattr(settings, "personal", None)
    return personal if isinstance(personal, PersonalizationConfig) else PersonalizationConfig()


def split_mask(spec: ParamSpec, layers: Sequence[str]) -> np.ndarray:
    """The personal coordinates of ``spec`` for ``personal.layers``, refusing a split that
    leaves nothing shared (a one-layer model with the default last layer, say)."""
    try:
        mask = spec.personal_mask(layers)
    except ValueError as err:
        raise ConfigError(f"personal.layers: {err}") from None
    if mask.all():
        raise ConfigError(
            "personal.layers makes every parameter personal, so nothing is federated; "
            "choose a model with more than one layer (e.g. model.name = 'mlp') or name "
            "fewer layers"
        )
    return mask


def freeze(mask: np.ndarray) -> GradientCorrection:
    """Zero the gradient where ``mask`` is True: those coordinates do not move.

    The correction runs after weight decay and before momentum, and the momentum buffer
    starts at zero every training call, so frozen coordinates stay exactly where they
    started.
    """
    frozen = OnDevice(torch.from_numpy(mask.copy()))

    def correct(w: torch.Tensor, g: torch.Tensor) -> None:
        g.masked_fill_(frozen.like(g), 0.0)

    return correct


def personal_sgd(ctx: ClientContext, personal: PersonalizationConfig) -> SGDSettings:
    """The client's optimizer with ``personal.personal_lr`` when set."""
    lr = personal.personal_lr if personal.personal_lr is not None else ctx.sgd.lr
    return SGDSettings(lr=lr, momentum=ctx.sgd.momentum, weight_decay=ctx.sgd.weight_decay)


def train_personal(
    ctx: ClientContext,
    personal: PersonalizationConfig,
    *,
    start: np.ndarray,
    correction: GradientCorrection,
) -> TrainOutcome:
    """``personal.personal_epochs`` epochs of personal training from ``start``, with the
    client's own shuffles of a stream apart from its shared training's."""
    return ctx.learner.train(
        start=start,
        data=ctx.data.train,
        plan=WorkPlan(personal.personal_epochs, None, straggler=False),
        batch_size=ctx.work.batch_size,
        sgd=personal_sgd(ctx, personal),
        generator=torch_generator(ctx.seed, SHUFFLE, ctx.round, ctx.client_id, PERSONAL_STREAM),
        correction=correction,
    )


def prefixed(metrics: Mapping[str, float]) -> dict[str, float]:
    """``loss`` → ``personalized_loss``, and so on for every metric."""
    return {f"personalized_{k}": v for k, v in metrics.items()}


class PersonalServer(PlainServer):
    """The server half of split personalization: only the shared coordinates travel.

    The broadcast is the shared part of the model, every upload has the shared length,
    and :meth:`combine` expands the aggregate into a full-length pseudo-gradient that is
    zero on personal coordinates, so the server's copy of the personal layers never moves
    (with any server optimizer: a coordinate whose gradient is always zero keeps zero
    momentum and zero adaptive moments).
    """

    def __init__(self, *, personal: np.ndarray) -> None:
        self.personal = personal.astype(bool, copy=True)
        self.shared = ~self.personal
        self.n_shared = int(self.shared.sum())

    def broadcast(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        return {GLOBAL: weights[self.shared]}

    def upload_sizes(self, dimension: int) -> dict[str, int]:
        if dimension != self.personal.size:
            raise ValueError(
                f"the model has {dimension} parameters, the personal split {self.personal.size}"
            )
        return {DELTA: self.n_shared}

    def combine(
        self,
        *,
        rnd: int,
        aggregate: np.ndarray,
        extras: Mapping[str, np.ndarray],
        contributors: Sequence[FitResult],
    ) -> tuple[np.ndarray, dict[str, Any]]:
        full = np.zeros(self.personal.size, dtype=np.float32)
        full[self.shared] = aggregate
        return full, {}

    def global_for_evaluation(self, weights: np.ndarray) -> np.ndarray:
        """The server's full vector. Its personal layers are the server's copy, which stays
        at the initial values (no client uploads them), so the central evaluation of a
        split model measures the shared body under an untrained head: a lower bound, not
        the result. The meaningful number is ``personalized_accuracy`` (each client's own
        head on its own test set; ``eval.federated = true``)."""
        return weights


class SplitClient:
    """What FedPer's and FedRep's clients share: composing (global body, own head)."""

    def __init__(self, *, personal: np.ndarray, settings: PersonalizationConfig) -> None:
        self.personal = personal.astype(bool, copy=True)
        self.shared = ~self.personal
        self.n_shared = int(self.shared.sum())
        self.settings = settings

    def shared_global(self, ctx: ClientContext) -> np.ndarray:
        body = full_global(ctx)
        if body.shape != (self.n_shared,):
            raise ValueError(
                f"the broadcast has {body.size} values, the shared part of the model "
                f"{self.n_shared}; split personalization needs server.algorithm = 'personal'"
            )
        return body

    def head(self, ctx: ClientContext) -> np.ndarray:
        """The client's personal coordinates: its saved head, or the initial one."""
        saved = ctx.state.tensors.get(HEAD_STATE)
        if saved is not None:
            return np.asarray(saved, dtype=np.float32)
        return ctx.learner.initial_vector()[self.personal]

    def compose(self, body: np.ndarray, head: np.ndarray) -> np.ndarray:
        full = np.empty(self.personal.size, dtype=np.float32)
        full[self.shared] = body
        full[self.personal] = head
        return full

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        """``personalized_*``: global body + the client's own head (the model it uses).

        ``loss`` / ``accuracy``: global body + the *initial* head, i.e. the server's full
        model as :meth:`PersonalServer.global_for_evaluation` evaluates it centrally. It is
        reported so federated and central numbers describe the same model, not as a
        baseline: a fair baseline for the personalized numbers is FedAvg's global model
        on the same client test sets (a separate run with ``strategy = "fedavg"``).
        """
        test = ctx.data.test
        if test is None or len(test) == 0:
            return {}
        body = self.shared_global(ctx)
        server_head = ctx.learner.initial_vector()[self.personal]
        out = ctx.learner.evaluate(self.compose(body, server_head), test, ctx.eval_batch_size)
        mine = ctx.learner.evaluate(self.compose(body, self.head(ctx)), test, ctx.eval_batch_size)
        out.update(prefixed(mine))
        return out


class FedPer(SplitClient):
    """FedPer (Arivazhagan et al. 2019): train all layers from (global body, own head) for
    the round's plan; upload the body's change, keep the head."""

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        start = self.compose(self.shared_global(ctx), self.head(ctx))
        out = train_locally(ctx, start)
        ctx.state.tensors[HEAD_STATE] = out.weights[self.personal].copy()
        return ClientUpdate(
            {DELTA: (out.weights - start)[self.shared]},
            {"train_loss": out.train_loss, "steps": float(out.steps)},
        )


class FedRep(SplitClient):
    """FedRep (Collins et al. 2021, Algorithm 1): ``personal.personal_epochs`` epochs on
    the head with the body frozen (lr ``personal.personal_lr`` or the client's), then the
    round's plan on the body with the head frozen; upload the body's change, keep the head."""

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        start = self.compose(self.shared_global(ctx), self.head(ctx))
        head_phase = train_personal(ctx, self.settings, start=start, correction=freeze(self.shared))
        body_phase = train_locally(ctx, head_phase.weights, freeze(self.personal))
        ctx.state.tensors[HEAD_STATE] = body_phase.weights[self.personal].copy()
        return ClientUpdate(
            {DELTA: (body_phase.weights - start)[self.shared]},
            {
                "train_loss": body_phase.train_loss,
                "steps": float(body_phase.steps),
                "head_train_loss": head_phase.train_loss,
            },
        )


class Ditto:
    """Ditto (Li et al. 2021, Algorithm 1): FedAvg's local update of the global model
    (uploaded in full), and ``personal.personal_epochs`` epochs of the personal model v_k
    on F_k(v) + λ/2 ‖v − w_t‖² (Eq. 2; λ = ``personal.lam``, lr ``personal.personal_lr``
    or the client's), with v_k starting from w_t the first time the client trains."""

    def __init__(self, *, settings: PersonalizationConfig) -> None:
        self.settings = settings

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        w_t = full_global(ctx)
        out = train_locally(ctx, w_t)
        v = ctx.state.tensors.get(DITTO_STATE)
        v_start = w_t if v is None else np.asarray(v, dtype=np.float32)
        pull = proximal_correction(self.settings.lam, torch.from_numpy(w_t.copy()))
        mine = train_personal(ctx, self.settings, start=v_start, correction=pull)
        ctx.state.tensors[DITTO_STATE] = mine.weights
        return ClientUpdate(
            {DELTA: out.weights - w_t},
            {
                "train_loss": out.train_loss,
                "steps": float(out.steps),
                "personal_train_loss": mine.train_loss,
            },
        )

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        """The global model's metrics and ``personalized_*`` of v_k (of the global model
        for a client that has not trained yet: v_k would start there)."""
        out = evaluate_global(ctx)
        if not out:
            return out
        test = ctx.data.test
        assert test is not None
        v = ctx.state.tensors.get(DITTO_STATE)
        if v is None:
            out.update(prefixed(out))
        else:
            out.update(prefixed(ctx.learner.evaluate(v, test, ctx.eval_batch_size)))
        return out


@SERVER_ALGORITHMS.register("personal")
def make_personal_server(settings: Any, context: StageContext) -> PersonalServer:
    mask = split_mask(context.spec, personal_settings(settings).layers)
    return PersonalServer(personal=mask)


@CLIENT_ALGORITHMS.register("fedper")
def make_fedper(settings: Any, context: StageContext) -> FedPer:
    personal = personal_settings(settings)
    return FedPer(personal=split_mask(context.spec, personal.layers), settings=personal)


@CLIENT_ALGORITHMS.register("fedrep")
def make_fedrep(settings: Any, context: StageContext) -> FedRep:
    personal = personal_settings(settings)
    return FedRep(personal=split_mask(context.spec, personal.layers), settings=personal)


@CLIENT_ALGORITHMS.register("ditto")
def make_ditto(settings: Any, context: StageContext) -> Ditto:
    return Ditto(settings=personal_settings(settings))
