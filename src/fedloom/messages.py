"""What travels between the server's round loop and clients, whatever engine carries it.

These are plain dataclasses so every engine (in-process, process pool, and later Ray
and gRPC) moves the same things. Vectors are NumPy float32 arrays here; engines that
cross a process or network boundary encode them with :func:`fedloom.params.encode_vector`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: The participant id of the CKKS key holder wherever participants are named by id
#: (client ids are partition numbers, never negative).
KEY_HOLDER_ID = -1


@dataclass(frozen=True)
class FitTask:
    """Train on one client's data starting from the round's global model."""

    client_id: int
    round: int
    #: True when the server discards stragglers' partial work (FedAvg as published), so a
    #: client that the systems model marks as a straggler need not compute at all.
    drop_stragglers: bool = False
    #: Central DP (``privacy.mechanism = "central"``): the L2 norm the client must clip its
    #: update to this round. None means the configured ``privacy.clipping_norm``, which is
    #: right unless adaptive clipping moves C from round to round.
    clip_norm: float | None = None
    #: Secure aggregation: the client keeps its update for the protocol that follows
    #: instead of returning it, and answers with metadata only.
    secure: bool = False


@dataclass
class FitResult:
    """A client's update ``delta = w_local - w_global`` and what it cost."""

    client_id: int
    round: int
    delta: np.ndarray | None
    num_examples: int
    straggler: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    #: The client holds ``delta`` for secure aggregation (``delta`` is None here).
    held: bool = False


@dataclass(frozen=True)
class EvalTask:
    """Evaluate the round's global model on one client's local test set."""

    client_id: int
    round: int


@dataclass
class EvalResult:
    client_id: int
    round: int
    num_examples: int
    loss: float
    accuracy: float


@dataclass
class ClientFailure:
    """A client that raised: the round loop logs and records it, and goes on."""

    client_id: int
    round: int
    error: str
    traceback: str
