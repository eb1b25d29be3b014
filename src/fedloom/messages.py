"""What travels between the server's round loop and clients, whatever engine carries it.

A task and a result carry *named* vectors (``{"delta": ..., "control": ...}``), scalar
config and metrics, and the model version they belong to. Every algorithm uses the same
four message types, so a new algorithm adds names, not fields, and no engine or wire
format changes for it. Constructors are keyword-only: a new field can never silently
shift the others.

Vectors are NumPy float32 arrays; engines that cross a process or network boundary
encode them with :mod:`fedloom.params` (named arrays on the wire, see the proto).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

#: A scalar a task's config or a result's metrics may hold (JSON-able on the wire).
Scalar = bool | int | float | str

#: The participant id of the CKKS key holder wherever participants are named by id
#: (client ids are partition numbers, never negative).
KEY_HOLDER_ID = -1

#: The broadcast vector every algorithm has: the global model.
GLOBAL = "global"
#: The uploaded vector every algorithm has: the client's model update w_local - w_global.
DELTA = "delta"

#: Task config keys the strategy sets for every algorithm (stages add their own keys).
#: HOLD: keep the upload for this secure-aggregation protocol instead of returning it.
HOLD = "hold"
#: DROP_STRAGGLERS: a client the systems model marks as a straggler need not compute.
DROP_STRAGGLERS = "drop_stragglers"
#: STEP_BUDGET: the most local steps this client may take this round (one client's own
#: key: a device that cannot finish its work by a deadline does the steps that fit).
STEP_BUDGET = "step_budget"


def upload_order(names: Iterable[str]) -> list[str]:
    """The order uploads are concatenated in for secure aggregation: delta, then by name."""
    names = list(names)
    rest = sorted(n for n in names if n != DELTA)
    return [DELTA, *rest] if DELTA in names else rest


@dataclass(frozen=True, kw_only=True)
class FitTask:
    """Train on one client's data starting from the round's broadcast vectors.

    ``config`` is what the strategy's stages tell this client this round (e.g. the DP
    clipping norm, whether to hold the update for secure aggregation, whether stragglers'
    partial work is discarded). The broadcast vectors (the global model and any others an
    algorithm sends to every client, such as SCAFFOLD's server control variate) travel
    beside the tasks, once per round.
    """

    client_id: int
    round: int
    #: The round of the global model this task trains from (the model after that round).
    model_version: int
    config: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(kw_only=True)
class FitResult:
    """A client's named update vectors and what they cost.

    ``vectors`` is empty when the client did no usable work (a dropped straggler) or when
    it holds the vectors for secure aggregation (``held``).
    """

    client_id: int
    round: int
    model_version: int
    num_examples: int
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    straggler: bool = False
    #: The client keeps its vectors for the secure-aggregation protocol that follows.
    held: bool = False

    @property
    def delta(self) -> np.ndarray | None:
        """The model update, when it came in the clear."""
        return self.vectors.get(DELTA)


@dataclass(frozen=True, kw_only=True)
class EvalTask:
    """Evaluate the round's global model (and any personal model) on a client's test set."""

    client_id: int
    round: int
    model_version: int
    config: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(kw_only=True)
class EvalResult:
    """Metrics of an evaluation; ``metrics`` always has ``loss`` when examples > 0."""

    client_id: int
    round: int
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class ClientFailure:
    """A client that raised: the round loop logs and records it, and goes on."""

    client_id: int
    round: int
    error: str
    traceback: str = ""


Broadcast = Mapping[str, np.ndarray]
