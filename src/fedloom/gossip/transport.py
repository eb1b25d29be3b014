"""Gossip between peer processes: a small gRPC service of raw-bytes messages.

The peers do not speak the server–client protocol (``engine/grpc/fedloom.proto``): a
peer only *pushes* its half-step model of round r to each neighbour and *pings* them,
so two unary methods under a generic handler carry hand-framed bytes:

``Push``  request = ``MAGIC | u32 header length | header JSON | float32 little-endian
          model``, header ``{"v": 1, "sender": id, "round": r, "size": d}``; reply one
          status word (``accepted``, ``late``, ``early``, ``duplicate``).
``Ping``  request empty; reply JSON ``{"peer": id, "round": r}`` (the round it works on).

Every push is bounded before it is believed: over the model's size plus a small
header it is refused and counted (gRPC itself refuses, unread, pushes over twice
that); the header must parse, name a round, and a model of exactly
the run's dimension, all finite. The caller must *be* the peer it claims: the service
asks ``identify`` (mutual-TLS certificate name or bearer token, wired by the CLI) who is
calling, and the sender field must be that identity's peer id and a neighbour of this
peer in that round's graph. Refusals are counted per reason (``MessageLedger``) and
logged once per reason and round.

This module knows nothing of the engine, the model or how credentials are read: the
command line (``cli/peer.py``) hands it gRPC credentials and an ``identify`` callable.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

log = logging.getLogger("fedloom.gossip.peer")

SERVICE = "fedloom.gossip.Peer"
PUSH = f"/{SERVICE}/Push"
PING = f"/{SERVICE}/Ping"
MAGIC = b"FLGP"
WIRE_VERSION = 1
#: A push header is a few dozen bytes; anything longer is refused unread.
MAX_HEADER_BYTES = 1024
_PREFIX = struct.Struct("<4sI")

ACCEPTED, LATE, EARLY, DUPLICATE = "accepted", "late", "early", "duplicate"
#: Outcomes of a push seen from the sender (besides the receiver's status words).
UNREACHABLE, REFUSED, TIMEOUT = "unreachable", "refused", "timeout"

_IDENTITY = (lambda b: b, lambda b: b)  # request/response (de)serializers: raw bytes


class MessageRejectedError(ValueError):
    """A push that breaks the wire rules; ``reason`` is the counter it is filed under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class PeerAddress:
    """A peer of the run: its id (= its data partition), where it listens, who it is."""

    peer_id: int
    address: str
    #: The name it proves (its certificate's common name or its token's name).
    identity: str


def default_identity(peer_id: int) -> str:
    return f"peer-{peer_id}"


def parse_peers(spec: str) -> dict[int, PeerAddress]:
    """Peers from a file (one ``ID HOST:PORT [IDENTITY]`` a line, ``#`` comments) or an
    inline list ``ID=HOST:PORT,ID=HOST:PORT``. Ids must be 0..n-1, each once; the
    identity defaults to ``peer-ID``."""
    path = Path(spec)
    rows: list[tuple[str, list[str]]] = []
    if path.is_file():
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            text = line.split("#", 1)[0].strip()
            if text:
                rows.append((f"{path} line {lineno}", text.split()))
    elif "=" in spec:
        for item in spec.split(","):
            if item.strip():
                rows.append((f"'{item.strip()}'", item.strip().replace("=", " ", 1).split()))
    else:
        raise ValueError(
            f"--peers '{spec}' is neither a file nor a list like 0=HOST:PORT,1=HOST:PORT"
        )
    peers: dict[int, PeerAddress] = {}
    for where, parts in rows:
        if len(parts) not in (2, 3) or not parts[0].isdigit() or ":" not in parts[1]:
            raise ValueError(f"{where}: expected 'ID HOST:PORT [IDENTITY]'")
        peer_id = int(parts[0])
        if peer_id in peers:
            raise ValueError(f"{where}: peer {peer_id} is listed twice")
        identity = parts[2] if len(parts) == 3 else default_identity(peer_id)
        peers[peer_id] = PeerAddress(peer_id, parts[1], identity)
    if sorted(peers) != list(range(len(peers))):
        raise ValueError(f"peer ids must be 0..{len(peers) - 1}, each once; got {sorted(peers)}")
    if len({p.identity for p in peers.values()}) != len(peers):
        raise ValueError("two peers share one identity; give each peer its own")
    return peers


def encode_model(*, sender: int, rnd: int, vector: np.ndarray) -> bytes:
    header = json.dumps(
        {"v": WIRE_VERSION, "sender": sender, "round": rnd, "size": int(vector.size)}
    ).encode()
    body = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    return _PREFIX.pack(MAGIC, len(header)) + header + body


def max_push_bytes(dimension: int) -> int:
    """The largest push a peer accepts for a model of ``dimension`` parameters."""
    return _PREFIX.size + MAX_HEADER_BYTES + 4 * dimension


def decode_model(data: bytes, *, dimension: int) -> tuple[int, int, np.ndarray]:
    """``(sender, round, model)`` of a push, or :class:`MessageRejectedError`."""
    if len(data) > max_push_bytes(dimension):
        raise MessageRejectedError("oversize", f"{len(data)} bytes")
    if len(data) < _PREFIX.size:
        raise MessageRejectedError("malformed", "shorter than its prefix")
    magic, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC or header_len > MAX_HEADER_BYTES:
        raise MessageRejectedError("malformed", "not a gossip push")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + header_len])
        version, sender, rnd, size = (header[k] for k in ("v", "sender", "round", "size"))
    except (ValueError, KeyError, TypeError):
        raise MessageRejectedError("malformed", "unreadable header") from None
    if version != WIRE_VERSION:
        raise MessageRejectedError("version", f"wire version {version}, this peer speaks 1")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (sender, rnd, size)):
        raise MessageRejectedError("malformed", "header fields must be integers")
    body = data[_PREFIX.size + header_len :]
    if size != dimension or len(body) != 4 * dimension:
        raise MessageRejectedError("shape", f"{len(body) // 4} values, the model has {dimension}")
    vector = np.frombuffer(body, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise MessageRejectedError("non_finite", "NaN or Inf in the model")
    return sender, rnd, vector


class MessageLedger:
    """Counts refused messages per reason; logs the first of each reason per round."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._logged: set[tuple[str, int]] = set()

    def refuse(self, reason: str, detail: str, *, rnd: int) -> None:
        with self._lock:
            self.counts[reason] += 1
            first = (reason, rnd) not in self._logged
            self._logged.add((reason, rnd))
        if first:
            log.warning("refused a gossip message (%s): %s", reason, detail)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class Inbox:
    """Neighbours' models by round; the peer's own round moves forward through it.

    A push for a round the peer has finished is ``late`` (dropped); one more than
    ``lookahead`` rounds ahead is ``early`` (dropped, so a runaway sender cannot fill
    memory); at most one model per sender and round is kept.
    """

    def __init__(self, *, lookahead: int) -> None:
        self.lookahead = lookahead
        self._cond = threading.Condition()
        self._round = 1
        self._models: dict[int, dict[int, np.ndarray]] = {}
        self.bytes_received: Counter[int] = Counter()

    @property
    def round(self) -> int:
        with self._cond:
            return self._round

    def put(self, sender: int, rnd: int, vector: np.ndarray, nbytes: int) -> str:
        with self._cond:
            if rnd < self._round:
                return LATE
            if rnd > self._round + self.lookahead:
                return EARLY
            slot = self._models.setdefault(rnd, {})
            if sender in slot:
                return DUPLICATE
            slot[sender] = vector
            self.bytes_received[rnd] += nbytes
            self._cond.notify_all()
            return ACCEPTED

    def wait(
        self,
        rnd: int,
        expected: set[int],
        *,
        accept: set[int],
        deadline: float,
        still_expected: Callable[[set[int]], set[int]],
        poll_s: float = 0.5,
    ) -> dict[int, np.ndarray]:
        """Round ``rnd``'s models from ``accept`` (the neighbours), once every one in
        ``expected`` has arrived or the deadline has passed. Every ``poll_s`` those still
        missing go through ``still_expected``, which drops neighbours known to be gone (a
        refused ping), so a dead neighbour costs one probe, not the whole timeout."""
        waiting = set(expected)
        while True:
            with self._cond:
                waiting -= set(self._models.get(rnd, {}))
                now = time.monotonic()
                if waiting and now < deadline:
                    self._cond.wait(timeout=min(poll_s, deadline - now))
                    waiting -= set(self._models.get(rnd, {}))
                    now = time.monotonic()
                if not waiting or now >= deadline:
                    have = self._models.get(rnd, {})
                    return {j: v for j, v in have.items() if j in accept}
            waiting &= still_expected(waiting)

    def finish(self, rnd: int) -> None:
        """Round ``rnd`` is mixed: later pushes for it are late; its models are freed."""
        with self._cond:
            self._round = rnd + 1
            for r in [r for r in self._models if r <= rnd]:
                del self._models[r]
            for r in [r for r in self.bytes_received if r < rnd]:
                del self.bytes_received[r]


class PeerService(grpc.GenericRpcHandler):
    """The two methods a peer serves, each call authenticated before it is read.

    ``identify(context)`` returns the caller's proven name or None; ``peers`` maps
    each name to a peer id; ``is_neighbour(sender, round)`` says whether this peer
    mixes with ``sender`` in that round.
    """

    def __init__(
        self,
        *,
        peer_id: int,
        dimension: int,
        inbox: Inbox,
        ledger: MessageLedger,
        peers: Mapping[int, PeerAddress],
        identify: Callable[[grpc.ServicerContext], str | None],
        is_neighbour: Callable[[int, int], bool],
    ) -> None:
        self.peer_id = peer_id
        self.dimension = dimension
        self.inbox = inbox
        self.ledger = ledger
        self.identify = identify
        self.is_neighbour = is_neighbour
        self._ids = {p.identity: p.peer_id for p in peers.values()}
        self._handlers = {
            PUSH: grpc.unary_unary_rpc_method_handler(self.push, *_IDENTITY),
            PING: grpc.unary_unary_rpc_method_handler(self.ping, *_IDENTITY),
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handlers.get(handler_call_details.method)

    def _caller(self, context: grpc.ServicerContext) -> int:
        name = self.identify(context)
        caller = self._ids.get(name) if name is not None else None
        if caller is None:
            self.ledger.refuse(
                "unauthenticated", f"caller '{name}' is no peer of this run", rnd=self.inbox.round
            )
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a peer of this run")
        assert caller is not None
        return caller

    def ping(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._caller(context)
        return json.dumps({"peer": self.peer_id, "round": self.inbox.round}).encode()

    def push(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        caller = self._caller(context)
        rnd = self.inbox.round
        try:
            sender, msg_round, vector = decode_model(request, dimension=self.dimension)
        except MessageRejectedError as err:
            self.ledger.refuse(err.reason, f"from peer {caller}: {err}", rnd=rnd)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            raise  # abort raises; this line is for the type checker
        if sender != caller:
            self.ledger.refuse(
                "impersonation", f"peer {caller} sent a model as peer {sender}", rnd=rnd
            )
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "sender is not the caller")
        if msg_round < 1 or not self.is_neighbour(sender, msg_round):
            self.ledger.refuse(
                "not_neighbour", f"peer {sender} is no neighbour in round {msg_round}", rnd=rnd
            )
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not a neighbour in that round")
        status = self.inbox.put(sender, msg_round, vector, len(request))
        if status != ACCEPTED:
            self.ledger.refuse(status, f"peer {sender}'s round {msg_round} (at {rnd})", rnd=rnd)
        return status.encode()


def start_peer_server(
    address: str,
    service: PeerService,
    credentials: grpc.ServerCredentials | None,
    *,
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Serve ``service`` on ``address`` (TLS when ``credentials``); returns (server, port)."""
    # Twice the bound: a push somewhat too large still reaches the handler, which
    # refuses and counts it ("oversize"); gRPC refuses anything larger unread.
    limit = 2 * max_push_bytes(service.dimension)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        handlers=[service],
        options=[("grpc.max_receive_message_length", limit)],
    )
    port = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot listen on {address} (in use, or not an address of this host)")
    server.start()
    return server, port


#: Reconnect promptly: a neighbour that restarts or starts late is found within a
#: second, not after gRPC's default backoff of up to two minutes.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class Neighbours:
    """Channels to the other peers; every call has a deadline and never raises."""

    def __init__(
        self,
        peers: Mapping[int, PeerAddress],
        *,
        own_id: int,
        credentials: grpc.ChannelCredentials | None,
        token: str | None = None,
        server_name: str | None = None,
        dimension: int,
    ) -> None:
        options: list[tuple[str, Any]] = [
            *_CHANNEL_OPTIONS,
            ("grpc.max_send_message_length", max_push_bytes(dimension)),
        ]
        if server_name is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channels: dict[int, grpc.Channel] = {}
        self._push: dict[int, Callable[..., bytes]] = {}
        self._ping: dict[int, Callable[..., bytes]] = {}
        for j, peer in peers.items():
            if j == own_id:
                continue
            channel = (
                grpc.secure_channel(peer.address, credentials, options=options)
                if credentials is not None
                else grpc.insecure_channel(peer.address, options=options)
            )
            self._channels[j] = channel
            self._push[j] = channel.unary_unary(PUSH, *_IDENTITY)
            self._ping[j] = channel.unary_unary(PING, *_IDENTITY)

    def ping(self, j: int, *, timeout: float, wait_for_ready: bool = False) -> str:
        """``accepted`` when the neighbour answers, else why not (``unreachable``,
        ``refused``, ``timeout``)."""
        try:
            self._ping[j](
                b"", timeout=timeout, metadata=self._metadata, wait_for_ready=wait_for_ready
            )
            return ACCEPTED
        except grpc.RpcError as err:
            return _failure(err)

    def push(self, j: int, payload: bytes, *, timeout: float) -> str:
        try:
            reply = self._push[j](payload, timeout=timeout, metadata=self._metadata)
            return reply.decode(errors="replace")
        except grpc.RpcError as err:
            return _failure(err)

    def push_all(self, targets: Iterable[int], payload: bytes, *, timeout: float) -> dict[int, str]:
        """Push to each target in parallel; each one's status."""
        targets = list(targets)
        if not targets:
            return {}
        with futures.ThreadPoolExecutor(max_workers=len(targets)) as pool:
            done = {j: pool.submit(self.push, j, payload, timeout=timeout) for j in targets}
        return {j: f.result() for j, f in done.items()}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def _failure(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return UNREACHABLE
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TIMEOUT
    return REFUSED
