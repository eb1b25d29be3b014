"""Run one whole secure-aggregation round in process, with scripted dropouts.

:func:`run_secagg_round` is the simulation engine's (and the tests') way to use the
protocol: it creates one :class:`SecAggClient` per update and a :class:`SecAggServer`,
and carries every message between them through its wire encoding (``to_bytes`` then
``from_bytes``), counting bytes per client and stage. A real deployment moves the same
messages over its own transport instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedloom.privacy.secagg.client import SecAggClient
from fedloom.privacy.secagg.config import STAGES, SecAggConfig, Stage
from fedloom.privacy.secagg.messages import Message
from fedloom.privacy.secagg.randomness import SYSTEM_ENTROPY, Entropy
from fedloom.privacy.secagg.server import SecAggResult, SecAggServer

M = TypeVar("M", bound=Message)
ServerFactory = Callable[..., SecAggServer]
Intercept = Callable[[Message], Message]


@dataclass(frozen=True)
class SecAggRoundResult:
    """The server's result plus timing-free and timed cost counters.

    ``bytes_sent[c][stage]`` / ``bytes_received[c][stage]`` are the encoded sizes of the
    messages client c sent to / got from the server at that stage (the setup broadcast
    counts as received at ``advertise_keys``). ``client_seconds`` and ``server_seconds``
    are wall-clock compute time of the state-machine calls (not deterministic).
    """

    aggregate: SecAggResult
    bytes_sent: dict[int, dict[Stage, int]]
    bytes_received: dict[int, dict[Stage, int]]
    client_seconds: dict[int, float]
    server_seconds: float

    @property
    def sum(self) -> np.ndarray:
        return self.aggregate.sum

    @property
    def num_contributors(self) -> int:
        return self.aggregate.num_contributors

    def total_bytes(self, client_id: int) -> tuple[int, int]:
        """(sent, received) by one client over the whole round."""
        return sum(self.bytes_sent[client_id].values()), sum(
            self.bytes_received[client_id].values()
        )


class _Wire:
    """Carries messages through their encoding, counting bytes and applying a hook."""

    def __init__(self, client_ids: Iterable[int], intercept: Intercept | None) -> None:
        self.sent = {c: dict.fromkeys(STAGES, 0) for c in client_ids}
        self.received = {c: dict.fromkeys(STAGES, 0) for c in client_ids}
        self._intercept = intercept

    def up(self, client: int, stage: Stage, message: M) -> M:
        return self._carry(self.sent[client], stage, message)

    def down(self, client: int, stage: Stage, message: M) -> M:
        return self._carry(self.received[client], stage, message)

    def _carry(self, ledger: dict[Stage, int], stage: Stage, message: M) -> M:
        data = message.to_bytes()
        ledger[stage] += len(data)
        decoded = type(message).from_bytes(data)
        if self._intercept is None:
            return decoded
        replaced = self._intercept(decoded)
        if not isinstance(replaced, type(message)):
            raise TypeError("an intercept hook must return a message of the same type")
        return replaced


class _Clock:
    """Wall-clock compute time per client and for the server."""

    def __init__(self, client_ids: Iterable[int]) -> None:
        self.clients = dict.fromkeys(client_ids, 0.0)
        self.server = 0.0

    @contextmanager
    def client(self, client_id: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.clients[client_id] += time.perf_counter() - start

    @contextmanager
    def serving(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.server += time.perf_counter() - start


def run_secagg_round(
    updates: Mapping[int, np.ndarray],
    config: SecAggConfig | None = None,
    *,
    dropouts: Mapping[Stage, Iterable[int]] | None = None,
    entropy: Entropy = SYSTEM_ENTROPY,
    server_factory: ServerFactory = SecAggServer,
    intercept: Intercept | None = None,
) -> SecAggRoundResult:
    """Securely sum ``updates`` (client id → flat vector) in one SecAgg+ round.

    ``dropouts[stage]`` lists clients that go silent from that stage on (a client that
    drops at ``masked_input`` has shared its keys but never sends its masked vector).
    ``intercept`` sees, and may replace, every message after decoding (tests use it to
    tamper with or replay traffic). ``server_factory`` builds the server from
    ``(client_ids, vector_length, config, entropy=...)``.

    Raises :class:`RoundAbortedError` when too few clients survive a stage.
    """
    ids = sorted(updates)
    if not ids:
        raise ValueError("secure aggregation needs at least one update")
    length = _common_length(updates)
    silent_from = _first_silent_stage(dropouts or {}, set(ids))
    wire, clock = _Wire(ids, intercept), _Clock(ids)

    def alive(stage: Stage, candidates: Iterable[int]) -> list[int]:
        """Clients among ``candidates`` that still send at ``stage``."""
        now = STAGES.index(stage)
        return [c for c in candidates if c not in silent_from or STAGES.index(silent_from[c]) > now]

    with clock.serving():
        server = server_factory(ids, length, config, entropy=entropy)
    clients = {c: SecAggClient(c, entropy=entropy) for c in ids}

    stage = Stage.ADVERTISE_KEYS
    for c in alive(stage, ids):
        setup = wire.down(c, stage, server.setup)
        with clock.client(c):
            advert = clients[c].advertise_keys(setup)
        advert = wire.up(c, stage, advert)
        with clock.serving():
            server.receive_advertise_keys(advert)
    with clock.serving():
        broadcasts = server.broadcast_keys()

    stage = Stage.SHARE_KEYS
    for c in alive(stage, broadcasts):
        broadcast = wire.down(c, stage, broadcasts[c])
        with clock.client(c):
            shares = clients[c].share_keys(broadcast)
        shares = wire.up(c, stage, shares)
        with clock.serving():
            server.receive_share_keys(shares)
    with clock.serving():
        bundles = server.route_shares()

    stage = Stage.MASKED_INPUT
    for c in alive(stage, bundles):
        bundle = wire.down(c, stage, bundles[c])
        with clock.client(c):
            masked = clients[c].masked_input(bundle, updates[c])
        masked = wire.up(c, stage, masked)
        with clock.serving():
            server.receive_masked_input(masked)
    with clock.serving():
        requests = server.unmask_requests()

    stage = Stage.UNMASKING
    for c in alive(stage, requests):
        request = wire.down(c, stage, requests[c])
        with clock.client(c):
            response = clients[c].unmask(request)
        response = wire.up(c, stage, response)
        with clock.serving():
            server.receive_unmask_response(response)
    with clock.serving():
        aggregate = server.finalize()

    return SecAggRoundResult(aggregate, wire.sent, wire.received, clock.clients, clock.server)


def _common_length(updates: Mapping[int, np.ndarray]) -> int:
    shapes = {np.shape(v) for v in updates.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"updates must be flat vectors of one length, got shapes {shapes}")
    return int(next(iter(shapes))[0])


def _first_silent_stage(dropouts: Mapping[Stage, Iterable[int]], ids: set[int]) -> dict[int, Stage]:
    silent: dict[int, Stage] = {}
    for stage in STAGES:
        for c in dropouts.get(stage, ()):
            if c not in ids:
                raise ValueError(f"dropout client {c} has no update")
            silent.setdefault(c, stage)
    return silent
