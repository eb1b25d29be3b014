"""Run SecAgg+ over any transport: the server side as a loop over stages, the client side
as a responder to one stage message at a time.

An engine supplies ``exchange(stage, {client: message bytes}) -> {client: reply bytes}``:
it delivers each client its message and returns the replies that arrived in time.
Clients that do not answer are dropouts, recovered by the protocol. A reply that does
not decode, claims another sender, or breaks the protocol is treated as that client
dropping (and logged): one bad client cannot abort the round unless it takes the
survivors below the threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from fedloom.privacy.secagg.client import SecAggClient
from fedloom.privacy.secagg.config import SecAggConfig, Stage
from fedloom.privacy.secagg.errors import RoundAbortedError, SecAggError
from fedloom.privacy.secagg.messages import (
    AdvertiseKeys,
    KeyBroadcast,
    MaskedInput,
    Message,
    RoundSetup,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedloom.privacy.secagg.randomness import SYSTEM_ENTROPY, Entropy
from fedloom.privacy.secagg.server import SecAggResult, SecAggServer

log = logging.getLogger("fedloom.secagg")

Exchange = Callable[[Stage, Mapping[int, bytes]], dict[int, bytes]]

#: The message type the server sends each client at each stage (decoders key on it).
DOWNLINK: dict[Stage, type[Message]] = {
    Stage.ADVERTISE_KEYS: RoundSetup,
    Stage.SHARE_KEYS: KeyBroadcast,
    Stage.MASKED_INPUT: ShareBundle,
    Stage.UNMASKING: UnmaskRequest,
}
#: The message type a client answers with at each stage.
UPLINK: dict[Stage, type[Message]] = {
    Stage.ADVERTISE_KEYS: AdvertiseKeys,
    Stage.SHARE_KEYS: ShareKeys,
    Stage.MASKED_INPUT: MaskedInput,
    Stage.UNMASKING: UnmaskResponse,
}


@dataclass
class SecureSum:
    """What the server learns from a round: the sum, who contributed, and the traffic."""

    sum: np.ndarray
    contributors: tuple[int, ...]
    bytes_up: int
    bytes_down: int


StageT = TypeVar("StageT")


class CountingExchange(Generic[StageT]):
    """An engine's exchange that also counts what it moves: ``down`` is every byte sent
    to participants, ``up`` every byte of their replies.

    Both server loops (:func:`serve_stages` here, ``he_protocol.serve_he_round`` for
    CKKS) send through one, so a round's ``bytes_up`` / ``bytes_down`` and those carried
    by its abort error are counted the same way.
    """

    def __init__(self, exchange: Callable[[StageT, Mapping[int, bytes]], dict[int, bytes]]) -> None:
        self._exchange = exchange
        self.up = 0
        self.down = 0

    def __call__(self, stage: StageT, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        self.down += sum(len(b) for b in outgoing.values())
        replies = self._exchange(stage, outgoing)
        self.up += sum(len(b) for b in replies.values())
        return replies


def _sender(message: Message) -> int:
    if isinstance(message, AdvertiseKeys):
        return message.keys.client_id
    sender = getattr(message, "sender", None)
    if not isinstance(sender, int):
        raise SecAggError(f"{type(message).__name__} has no sender")
    return sender


def serve_secagg_round(
    client_ids: Sequence[int],
    vector_length: int,
    config: SecAggConfig,
    exchange: Exchange,
) -> SecureSum:
    """The server's side of one round. Raises ``RoundAbortedError`` if too few survive."""
    server = SecAggServer(sorted(client_ids), vector_length, config)
    result, bytes_up, bytes_down = serve_stages(server, exchange)
    return SecureSum(result.sum, tuple(result.contributors), bytes_up, bytes_down)


def serve_stages(server: SecAggServer, exchange: Exchange) -> tuple[SecAggResult, int, int]:
    """Step a fresh ``server`` through all four stages over ``exchange``.

    The one stage loop of the package: engines reach it through
    :func:`serve_secagg_round`, and :func:`~fedloom.privacy.secagg.driver.run_secagg_round`
    passes its own server (tests substitute recording ones) and an instrumented
    exchange. Returns the result and the bytes that went up and down.
    """
    counted = CountingExchange(exchange)
    try:
        result = _step_stages(server, counted)
    except RoundAbortedError as err:  # the bytes were still sent: the round record counts them
        err.bytes_up, err.bytes_down = counted.up, counted.down
        raise
    return result, counted.up, counted.down


def _step_stages(server: SecAggServer, exchange: Exchange) -> SecAggResult:
    """Each stage: the server's messages out, the replies that decode in, then the next."""
    out = dict.fromkeys(server.setup.client_ids, server.setup.to_bytes())
    for m in _collect(exchange, Stage.ADVERTISE_KEYS, out):
        _receive(server.receive_advertise_keys, m)
    out = {c: b.to_bytes() for c, b in server.broadcast_keys().items()}
    for m in _collect(exchange, Stage.SHARE_KEYS, out):
        _receive(server.receive_share_keys, m)
    out = {c: b.to_bytes() for c, b in server.route_shares().items()}
    for m in _collect(exchange, Stage.MASKED_INPUT, out):
        _receive(server.receive_masked_input, m)
    out = {c: r.to_bytes() for c, r in server.unmask_requests().items()}
    for m in _collect(exchange, Stage.UNMASKING, out):
        _receive(server.receive_unmask_response, m)
    return server.finalize()


def _collect(exchange: Exchange, stage: Stage, outgoing: Mapping[int, bytes]) -> list[Message]:
    """The stage's replies that decode and name their sender; the rest count as dropouts."""
    accepted: list[Message] = []
    for client, data in sorted(exchange(stage, outgoing).items()):
        try:
            message = UPLINK[stage].from_bytes(data)
            if _sender(message) != client:
                raise SecAggError(f"claims to come from client {_sender(message)}")
        except (SecAggError, ValueError) as err:
            log.warning("secagg %s: client %d's reply rejected: %s", stage, client, err)
            continue
        accepted.append(message)
    return accepted


def _receive(handler: Callable[..., None], message: Message) -> None:
    try:
        handler(message)
    except SecAggError as err:
        log.warning(
            "secagg: %s from client %d rejected: %s", type(message).__name__, _sender(message), err
        )


@dataclass
class SecAggParticipant:
    """A client's side of one round: holds its update until the masked-input stage.

    ``entropy`` is for tests that need reproducible secrets; leave it at the default
    (``os.urandom``) everywhere else.
    """

    client_id: int
    update: np.ndarray
    entropy: Entropy = field(default=SYSTEM_ENTROPY, repr=False)
    client: SecAggClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = SecAggClient(self.client_id, entropy=self.entropy)

    def respond(self, stage: Stage, payload: bytes) -> bytes:
        """Answer the server's message for ``stage`` (raises on a malformed message)."""
        if stage is Stage.ADVERTISE_KEYS:
            return self.client.advertise_keys(RoundSetup.from_bytes(payload)).to_bytes()
        if stage is Stage.SHARE_KEYS:
            return self.client.share_keys(KeyBroadcast.from_bytes(payload)).to_bytes()
        if stage is Stage.MASKED_INPUT:
            bundle = ShareBundle.from_bytes(payload)
            return self.client.masked_input(bundle, self.update).to_bytes()
        return self.client.unmask(UnmaskRequest.from_bytes(payload)).to_bytes()


def exchange_in_process(participants: Mapping[int, SecAggParticipant]) -> Exchange:
    """An exchange for simulation: every participant answers at once, in this process.

    The messages still go through their byte encoding, so simulation exercises exactly
    what a deployment sends.
    """

    def exchange(stage: Stage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        return {c: participants[c].respond(stage, data) for c, data in outgoing.items()}

    return exchange
