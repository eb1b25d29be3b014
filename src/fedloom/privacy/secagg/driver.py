"""Run one whole secure-aggregation round in process, with scripted dropouts.

:func:`run_secagg_round` is the tests' and benchmarks' way to use the protocol. It is a
thin layer over the same stage loop the engines run
(:func:`~fedloom.privacy.secagg.transport.serve_stages`), with an in-process exchange
that adds what experiments need and a deployment must not have: dropouts scripted per
stage, a hook that may read or replace any decoded message, and byte and time counters
per client and stage. Every message still goes through its wire encoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedloom.privacy.secagg.config import STAGES, SecAggConfig, Stage
from fedloom.privacy.secagg.messages import Message
from fedloom.privacy.secagg.randomness import SYSTEM_ENTROPY, Entropy
from fedloom.privacy.secagg.server import SecAggResult, SecAggServer
from fedloom.privacy.secagg.transport import DOWNLINK, UPLINK, SecAggParticipant, serve_stages

ServerFactory = Callable[..., SecAggServer]
Intercept = Callable[[Message], Message]


@dataclass(frozen=True)
class SecAggRoundResult:
    """The server's result plus timing-free and timed cost counters.

    ``bytes_sent[c][stage]`` / ``bytes_received[c][stage]`` are the encoded sizes of the
    messages client c sent to / got from the server at that stage (the setup broadcast
    counts as received at ``advertise_keys``). ``client_seconds`` is the wall-clock time
    of client c's side (decode, state machine, encode); ``server_seconds`` the rest of
    the round: building the server, its state-machine calls and its own encoding (not
    deterministic).
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


class _InstrumentedExchange:
    """An in-process exchange that scripts dropouts, applies a hook, counts and times.

    A client silent from some stage on gets no message at that stage or later, so
    neither direction counts bytes for it, as when its connection is gone.
    """

    def __init__(
        self,
        participants: Mapping[int, SecAggParticipant],
        silent_from: Mapping[int, Stage],
        intercept: Intercept | None,
    ) -> None:
        self.sent = {c: dict.fromkeys(STAGES, 0) for c in participants}
        self.received = {c: dict.fromkeys(STAGES, 0) for c in participants}
        self.client_seconds = dict.fromkeys(participants, 0.0)
        self.seconds = 0.0  # all time spent in here, which is not the server's
        self._participants = participants
        self._silent_from = silent_from
        self._intercept = intercept

    def __call__(self, stage: Stage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        entered = time.perf_counter()
        replies: dict[int, bytes] = {}
        for c, data in outgoing.items():
            if not self._sends_at(c, stage):
                continue
            self.received[c][stage] += len(data)
            data = self._tap(DOWNLINK[stage], data)
            started = time.perf_counter()
            reply = self._participants[c].respond(stage, data)
            self.client_seconds[c] += time.perf_counter() - started
            self.sent[c][stage] += len(reply)
            replies[c] = self._tap(UPLINK[stage], reply)
        self.seconds += time.perf_counter() - entered
        return replies

    def _sends_at(self, client: int, stage: Stage) -> bool:
        silent = self._silent_from.get(client)
        return silent is None or STAGES.index(silent) > STAGES.index(stage)

    def _tap(self, kind: type[Message], data: bytes) -> bytes:
        """Let the hook see (and maybe replace) the decoded message; bytes are counted before."""
        if self._intercept is None:
            return data
        replaced = self._intercept(kind.from_bytes(data))
        if not isinstance(replaced, kind):
            raise TypeError("an intercept hook must return a message of the same type")
        return replaced.to_bytes()


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

    As in the engines, a client's reply the server refuses is logged and counts as that
    client dropping; a client that raises (e.g. on a tampered share) ends the round.
    Raises :class:`RoundAbortedError` when too few clients survive a stage.
    """
    ids = sorted(updates)
    if not ids:
        raise ValueError("secure aggregation needs at least one update")
    length = common_length(updates)
    silent_from = _first_silent_stage(dropouts or {}, set(ids))
    participants = {c: SecAggParticipant(c, updates[c], entropy) for c in ids}
    exchange = _InstrumentedExchange(participants, silent_from, intercept)

    started = time.perf_counter()
    server = server_factory(ids, length, config, entropy=entropy)
    aggregate, _, _ = serve_stages(server, exchange)
    server_seconds = time.perf_counter() - started - exchange.seconds

    return SecAggRoundResult(
        aggregate, exchange.sent, exchange.received, exchange.client_seconds, server_seconds
    )


def common_length(updates: Mapping[int, np.ndarray]) -> int:
    """The length every update shares; refuses anything but flat vectors of one length.

    The in-process round drivers' check (also :func:`fedloom.privacy.he.run_he_round`'s).
    """
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
