"""The two halves of a federated algorithm, as small classes over explicit state.

A *client algorithm* turns the round's broadcast vectors, the client's own persisted
state and its data into named update vectors and metrics. A *server algorithm* decides
what is broadcast and turns the aggregated uploads into the pseudo-gradient the server
optimizer applies. FedAvg is the identity on both sides; SCAFFOLD adds a control
variate on each; FedNova normalizes; personalization keeps part of the model home.
(The split follows pfl-research's ``simulate_one_user`` / ``process_aggregated_statistics``
and FedJAX's ``init`` / ``apply``.)

Factories are registered by name (:data:`fedloom.registry.CLIENT_ALGORITHMS`,
:data:`fedloom.registry.SERVER_ALGORITHMS`) and called with the algorithm's own
settings and a :class:`StageContext`; nothing else of the run reaches them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedloom.client.learner import Learner, SGDSettings, WorkPlan, WorkSettings
from fedloom.client_store import ClientState
from fedloom.data.base import ClientData
from fedloom.data.server import ServerData
from fedloom.messages import DELTA, GLOBAL, Broadcast, FitResult, Scalar
from fedloom.params import ParamSpec


@dataclass(frozen=True, kw_only=True)
class StageContext:
    """What any stage may know about the run it is built for."""

    num_clients: int
    spec: ParamSpec
    seed: int
    #: Expected number of clients per round (for stages that normalize by it).
    expected_clients: float = 1.0
    #: The server's own examples (never a client's), from which a server-side stage
    #: reserves the slice it trains on (FLTrust's root data set); None: the server has none.
    server_data: ServerData | None = None
    #: Builds a fresh copy of the run's model, for a stage that trains on the server.
    learner_factory: Callable[[], Learner] | None = None
    #: The clients' local work and optimizer (``client`` section), for a stage that trains
    #: on the server exactly as a client would.
    work: WorkSettings = field(default_factory=WorkSettings)
    sgd: SGDSettings = field(default_factory=SGDSettings)

    @property
    def dimension(self) -> int:
        return self.spec.size


@dataclass(kw_only=True)
class ClientContext:
    """Everything a client algorithm sees for one task: nothing of other clients."""

    client_id: int
    round: int
    config: Mapping[str, Scalar]
    broadcast: Broadcast
    data: ClientData
    learner: Learner
    #: The client's persisted state; the algorithm edits it in place.
    state: ClientState
    seed: int
    work: WorkSettings
    sgd: SGDSettings
    #: This round's local work (fit only; None for evaluation).
    plan: WorkPlan | None = None
    eval_batch_size: int = 512


@dataclass
class ClientUpdate:
    """What a client algorithm returns from a fit: named vectors and metrics."""

    vectors: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    #: The example count to report when it is not the client's training-set size (None:
    #: that size). The server's guard rails cap whatever is claimed here.
    num_examples: int | None = None


class ClientAlgorithm(Protocol):
    """The client half of an algorithm."""

    def fit(self, ctx: ClientContext) -> ClientUpdate: ...

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        """Metrics on the client's test set (``loss`` first; empty without test data)."""
        ...


class ServerAlgorithm(Protocol):
    """The server half of an algorithm."""

    #: The vectors every client uploads, ``"delta"`` first.
    uploads: tuple[str, ...]

    def broadcast(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """The vectors sent to every sampled client this round (``"global"`` included)."""
        ...

    def task_config(self, rnd: int) -> dict[str, Scalar]: ...

    def upload_sizes(self, dimension: int) -> dict[str, int]:
        """The length of every upload, ``"delta"`` first, for a model of ``dimension``."""
        ...

    def combine(
        self,
        *,
        rnd: int,
        aggregate: np.ndarray,
        extras: Mapping[str, np.ndarray],
        contributors: Sequence[FitResult],
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The pseudo-gradient for the server optimizer, and fields for the round record.

        ``aggregate`` is the aggregator's combination of the ``"delta"`` uploads,
        ``extras`` the plain mean of each other upload over the contributors.
        """
        ...

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None: ...

    def global_for_evaluation(self, weights: np.ndarray) -> np.ndarray:
        """The model the server evaluates centrally (the global weights, as a rule)."""
        ...


def full_global(ctx: ClientContext) -> np.ndarray:
    """The global model as a full vector (the broadcast's ``"global"``)."""
    return np.asarray(ctx.broadcast[GLOBAL], dtype=np.float32)


class PlainServer:
    """The server half of FedAvg and every algorithm whose only upload is the model
    update: broadcast the model, pass the aggregate on (McMahan et al. 2017)."""

    uploads: tuple[str, ...] = (DELTA,)

    def broadcast(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        return {GLOBAL: weights}

    def task_config(self, rnd: int) -> dict[str, Scalar]:
        return {}

    def upload_sizes(self, dimension: int) -> dict[str, int]:
        return {DELTA: dimension}

    def combine(
        self,
        *,
        rnd: int,
        aggregate: np.ndarray,
        extras: Mapping[str, np.ndarray],
        contributors: Sequence[FitResult],
    ) -> tuple[np.ndarray, dict[str, Any]]:
        return aggregate, {}

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        return None

    def global_for_evaluation(self, weights: np.ndarray) -> np.ndarray:
        return weights


@dataclass(frozen=True, kw_only=True)
class AlgorithmSettings:
    """The settings an algorithm's two halves are built from (and nothing else of the run)."""

    proximal_mu: float = 0.0
    #: The server's learning rate (SCAFFOLD's global step η_g is the server optimizer's).
    server_lr: float = 1.0
    #: Free-form settings of a user-registered algorithm (``client.options``).
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Personalization keys (``personal`` section) for the personalized algorithms.
    personal: Any = None
    #: Local-DP settings when clients train with DP-SGD, else None.
    local_dp: Any = None
