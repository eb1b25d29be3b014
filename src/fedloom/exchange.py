"""The engine-neutral exchange primitive: opaque protocol messages to participants and
their replies back.

Multi-message protocols that run inside a round (SecAgg+, CKKS aggregation) are written
against :class:`Exchange` only. An engine implements it by delivering each participant
its bytes (in this process, over a pipe, over gRPC) and returning the replies that
arrived; it knows no protocol, stage meaning or role. On the client side a
:class:`Participant` answers one stage at a time; the client runtime finds it by
protocol name in :data:`fedloom.registry.PROTOCOL_PARTICIPANTS`.

Participants are named by integer id: client ids are non-negative, and a role the
strategy needs besides the clients (CKKS's key holder) has a negative id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True, kw_only=True)
class ExchangeRequest:
    """One stage of one protocol in one round."""

    protocol: str
    round: int
    stage: int
    #: The largest reply accepted from a participant; longer ones are dropped unread.
    reply_limit: int


class Exchange(Protocol):
    def __call__(self, request: ExchangeRequest, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        """Deliver ``outgoing[p]`` to each participant ``p``; the replies that came back.

        A participant that fails, times out or sends more than ``reply_limit`` bytes is
        absent from the result: protocols treat that as a dropout.
        """
        ...


class Participant(Protocol):
    """A client's side of a protocol for one round."""

    def respond(self, stage: int, payload: bytes) -> bytes:
        """The reply to the server's message for ``stage`` (raises to refuse)."""
        ...

    def finished(self, stage: int) -> bool:
        """True when the participant needs nothing more after answering ``stage``."""
        ...


class ParticipantFactory(Protocol):
    def __call__(self, *, participant_id: int, held: np.ndarray | None) -> Participant:
        """A participant holding ``held`` (the client's flattened upload; None for a role
        such as a key holder, which holds no update)."""
        ...


@dataclass(frozen=True, kw_only=True)
class Role:
    """A participant the protocol needs besides the sampled clients."""

    name: str
    participant_id: int


@dataclass(kw_only=True)
class SecureSumOutcome:
    """What the server learns from a secure-aggregation round.

    ``total`` is the sum of the contributors' uploads (None when the round aborted, with
    the cause in ``aborted``); the bytes count every message of the protocol.
    """

    total: np.ndarray | None
    contributors: tuple[int, ...]
    bytes_up: int
    bytes_down: int
    aborted: str | None = None


class SecureAggregator(Protocol):
    """The server half of a secure-aggregation protocol, as the strategy sees it."""

    protocol: str

    def roles(self) -> list[Role]: ...

    def run(
        self, rnd: int, client_ids: list[int], length: int, exchange: Exchange
    ) -> SecureSumOutcome: ...
