"""The deployment server: gRPC service, client sessions, and the executor the round loop uses.

The round loop (:class:`fedloom.server.loop.FederatedServer`) is the same one the
simulation uses; :class:`GrpcExecutor` is just another
:class:`~fedloom.server.loop.ClientExecutor`. It puts tasks in the queues of connected
clients' sessions, and waits for results until the round deadline. Clients pull tasks
(long poll) and push results, so the server never dials out and clients behind NAT work.

The transport is generic: a fit or evaluate task carries the round's named broadcast
vectors and the strategy's scalar config, a result carries named upload vectors and
metrics, and a protocol that runs inside a round (secure aggregation) is a series of
:class:`ExchangeTask` s of opaque bytes. Nothing here knows an algorithm, a privacy
mechanism or a protocol; the roles a strategy needs besides the clients (CKKS's key
holder) are names and participant ids handed in by the wiring.

Everything that arrives is untrusted. Handlers receive raw bytes and parse them
themselves, so a malformed message is *our* rejection (logged and counted by reason)
rather than an opaque gRPC error; uploaded vectors must be exactly the ones the
strategy expects (names and sizes; their values are the strategy's to check, as for
every engine); a result must match a task that is open, assigned to the sender's
session, and not yet answered. Every rejection leaves the round and the other results
untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from fedloom.engine.grpc import AUTH_HEADER, PROTOCOL_VERSION, SERVICE, SESSION_HEADER
from fedloom.engine.grpc import fedloom_pb2 as pb
from fedloom.engine.grpc.auth import TokenStore
from fedloom.engine.grpc.chunks import ChunkError, encode_buffers, read_chunks
from fedloom.engine.grpc.serving import AioServer, BlockingReader, StreamEnded, TaskMailbox
from fedloom.engine.grpc.wire import (
    WireError,
    broadcast_order,
    check_infos,
    decode_metrics,
    encode_config,
    layout_total,
    numeric_metrics,
    payload_bytes,
    split_vectors,
    vector_buffers,
    vector_infos,
)
from fedloom.exchange import ExchangeRequest, Role
from fedloom.messages import (
    DELTA,
    HOLD,
    Broadcast,
    ClientFailure,
    EvalResult,
    EvalTask,
    FitResult,
    FitTask,
)
from fedloom.store import atomic_write

if TYPE_CHECKING:
    from fedloom.config import DeployConfig

log = logging.getLogger("fedloom.deploy")
#: The operator's view (whom the server waits for): shown by ``fedloom server`` at INFO.
progress = logging.getLogger("fedloom.progress")
#: How often the server says whom it waits for while it waits.
PROGRESS_EVERY_S = 10.0
#: How stale a heartbeat's view of the revocation file may be (registration reads it fresh).
REVOCATION_MAX_AGE_S = 1.0

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, kw_only=True)
class ExchangeTask:
    """One stage of a protocol for one participant; the payload travels beside it."""

    client_id: int
    round: int
    request: ExchangeRequest


@dataclass(kw_only=True)
class ExchangeReply:
    client_id: int
    round: int
    payload: bytes


Task = FitTask | EvalTask | ExchangeTask
Outcome = FitResult | EvalResult | ExchangeReply | ClientFailure


@dataclass
class DeployOptions:
    """Timing and size limits of the deployment (see ``[deploy]`` in the run config)."""

    round_timeout_s: float = 600.0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 10.0
    poll_timeout_s: float = 5.0
    chunk_bytes: int = 1 << 20
    wait_for_clients_s: float = 300.0
    max_streams_per_client: int = 4
    idle_stream_timeout_s: float = 30.0

    @classmethod
    def from_config(cls, deploy: DeployConfig) -> DeployOptions:
        """The options of a run config's ``[deploy]`` section."""
        return cls(**{f.name: getattr(deploy, f.name) for f in fields(cls)})


@dataclass
class OpenTask:
    task_id: str
    task: Task
    session_id: str
    #: The payload's buffers, streamed back to back (broadcast vectors or a message).
    payload: Sequence[Buffer]
    #: The broadcast vectors' names and sizes (fit and evaluate tasks).
    infos: Sequence[pb.VectorInfo] = ()
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None


@dataclass
class Session:
    session_id: str
    client_id: int
    name: str
    last_seen: float
    #: Who holds the session: the token's or certificate's identity, or for a server
    #: without client authentication a stand-in per participant id.
    identity: str = ""
    peer: str = ""
    alive: bool = True
    tasks: TaskMailbox[OpenTask] = field(default_factory=TaskMailbox)
    #: PullTask and PushResult calls of this session now in progress.
    streams: int = 0
    #: Why the session ended (empty while it is alive).
    ended: str = ""


@dataclass
class ClientLedger:
    """What the server saw of one participant across its sessions (the operator's view).

    Counts only: nothing of a client's updates or data is kept here.
    """

    tasks_done: int = 0
    deadlines_missed: int = 0
    #: Whether the participant's latest task missed the round deadline.
    late: bool = False
    rejected: int = 0
    last_rejection: str = ""


@dataclass(frozen=True)
class ClientStatus:
    """One participant's status at one moment, for a read-only view (the dashboard).

    ``state`` is ``dropped`` (no live session; ``detail`` says why), ``rejected`` (its
    latest message was refused), ``straggling`` (its latest task missed the round
    deadline), ``training`` (a fit task of it is open) or ``connected``.
    """

    client_id: int
    name: str
    identity: str
    state: str
    detail: str
    silent_s: float
    tasks_done: int
    deadlines_missed: int
    rejected: int


class IdentityBook:
    """Which participant id each identity holds in this run, kept in the run directory.

    An identity keeps its id across reconnects and server restarts (``--resume``), and
    an id once held by one identity is never given to another: a token or certificate
    cannot take over another site's client id, and one site cannot take several.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._ids: dict[str, int] = {}
        if path is not None and path.exists():
            raw = json.loads(path.read_text())
            self._ids = {str(k): int(v) for k, v in raw.items()}

    def id_of(self, identity: str) -> int | None:
        return self._ids.get(identity)

    def holder_of(self, participant_id: int) -> str | None:
        return next((i for i, p in self._ids.items() if p == participant_id), None)

    def bind(self, identity: str, participant_id: int) -> None:
        self._ids[identity] = participant_id
        if self.path is not None:
            atomic_write(self.path, json.dumps(self._ids, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Refusal:
    """A registration refused: the rejection's reason and the one line the client sees."""

    reason: str
    line: str


class RateLimitedLog:
    """Warnings for rejected messages: the first of each reason at once, then at most one
    line per ``every_s`` per reason, which says how many were not logged since."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._quiet: Counter[str] = Counter()
        self._lock = threading.Lock()

    def warn(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self.every_s:
                self._quiet[reason] += 1
                return
            quiet = self._quiet.pop(reason, 0)
            self._last[reason] = now
        more = f" (+{quiet} more '{reason}' since the last line)" if quiet else ""
        log.warning("rejected (%s): %s%s", reason, detail, more)


class Registry:
    """Sessions and open tasks, shared by the gRPC handlers and the executor.

    ``upload_sizes`` are the vectors a fit result must carry (the strategy's
    ``wire_layout``: name → length, or (length, dtype) for a codec's compact arrays).
    ``roles`` are the participants the strategy needs besides the clients; a
    registration for a role is accepted only from the name ``authorized[role]`` (the
    role's own name by default) when clients authenticate, is registered under the
    role's participant id, and is never sampled.

    One identity has at most one live session (:meth:`open_session`), and its
    participant id comes from the :class:`IdentityBook`.
    """

    def __init__(
        self,
        num_clients: int,
        vector_size: int,
        config_json: str,
        *,
        upload_sizes: Mapping[str, int | tuple[int, str]] | None = None,
        roles: Sequence[Role] = (),
        authorized: Mapping[str, str] | None = None,
        run_id: str = "",
        book: IdentityBook | None = None,
        options: DeployOptions | None = None,
    ) -> None:
        self.num_clients = num_clients
        self.run_id = run_id
        self.vector_size = vector_size
        self.config_json = config_json
        self.upload_sizes: dict[str, int | tuple[int, str]] = dict(
            upload_sizes or {DELTA: vector_size}
        )
        self.roles = {r.name: r.participant_id for r in roles}
        self.authorized = {name: (authorized or {}).get(name, name) for name in self.roles}
        self._role_names = {pid: name for name, pid in self.roles.items()}
        self.book = book or IdentityBook()
        self.options = options or DeployOptions()
        self.lock = threading.Lock()
        self.sessions: dict[str, Session] = {}
        #: Latest session id per participant id (client ids, and roles' ids).
        self.by_client: dict[int, str] = {}
        self.open_tasks: dict[str, OpenTask] = {}
        self.rejections: Counter[str] = Counter()
        self.rejection_log = RateLimitedLog()
        self.stopping = False
        #: With ``stopping``: the run is not over, clients wait for the server to return.
        self.pausing = False
        self.told_to_stop: set[str] = set()
        #: Per participant id: tasks done, deadlines missed, messages refused.
        self.ledgers: dict[int, ClientLedger] = {}

    def reject(self, reason: str, detail: str, *, client_id: int | None = None) -> None:
        """Count a refused message (by reason, and against ``client_id`` when known)."""
        with self.lock:
            self.rejections[reason] += 1
            if client_id is not None:
                ledger = self.ledgers.setdefault(client_id, ClientLedger())
                ledger.rejected += 1
                ledger.last_rejection = reason
        self.rejection_log.warn(reason, detail)

    def task_finished(self, client_id: int, *, late: bool, ok: bool) -> None:
        """Count a task's outcome for the participant's status: ``late`` (it missed the
        deadline) or ``ok`` (a result was accepted; clears an earlier refusal)."""
        with self.lock:
            ledger = self.ledgers.setdefault(client_id, ClientLedger())
            ledger.late = late
            if late:
                ledger.deadlines_missed += 1
            elif ok:
                ledger.tasks_done += 1
                ledger.last_rejection = ""

    def status_snapshot(self) -> list[ClientStatus]:
        """Every client that ever held a session, as a read-only copy (roles excluded).

        The seam between the deployment and an observer (the dashboard): it takes the
        lock briefly, copies counters and flags, and changes nothing.
        """
        now = time.monotonic()
        with self.lock:
            training = {
                ot.session_id
                for ot in self.open_tasks.values()
                if isinstance(ot.task, FitTask) and not ot.done.is_set()
            }
            out: list[ClientStatus] = []
            for cid, sid in sorted(self.by_client.items()):
                if cid in self._role_names:
                    continue
                session = self.sessions[sid]
                ledger = self.ledgers.get(cid, ClientLedger())
                if not session.alive:
                    state, detail = "dropped", session.ended
                elif ledger.last_rejection:
                    state, detail = "rejected", f"message refused: {ledger.last_rejection}"
                elif ledger.late:
                    state, detail = "straggling", "missed the round deadline"
                elif sid in training:
                    state, detail = "training", ""
                else:
                    state, detail = "connected", ""
                out.append(
                    ClientStatus(
                        client_id=cid,
                        name=session.name,
                        identity=session.identity,
                        state=state,
                        detail=detail,
                        silent_s=round(now - session.last_seen, 1),
                        tasks_done=ledger.tasks_done,
                        deadlines_missed=ledger.deadlines_missed,
                        rejected=ledger.rejected,
                    )
                )
            return out

    def wake_polls(self) -> None:
        """Wake every waiting long poll so that it looks at the run's state now."""
        with self.lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            session.tasks.wake()

    def all_told_to_stop(self) -> bool:
        with self.lock:
            alive = {s.session_id for s in self.sessions.values() if s.alive}
            return alive <= self.told_to_stop

    def alive_clients(self) -> list[int]:
        """The connected clients that train; never a role, which is never sampled.

        Sessions whose heartbeats stopped are evicted first, so a dead session is never
        sampled (and waited for) even between two passes of the reaper.
        """
        self.reap(self.options.heartbeat_timeout_s)
        with self.lock:
            return sorted(
                c
                for c, s in self.by_client.items()
                if c not in self._role_names and self.sessions[s].alive
            )

    def missing_roles(self) -> list[str]:
        """The roles the run needs that have no live session."""
        with self.lock:
            return [name for name, pid in self.roles.items() if self.session_for(pid) is None]

    def describe(self, participant_id: int) -> str:
        role = self._role_names.get(participant_id)
        return role if role is not None else f"client {participant_id}"

    def add_session(self, client_id: int, name: str, identity: str = "") -> Session:
        """A new session for a participant (a client, or a role's id); its old one dies."""
        with self.lock:
            return self._add_locked(client_id, name, identity or f"client {client_id}", "")

    def _add_locked(self, client_id: int, name: str, identity: str, peer: str) -> Session:
        old = self.by_client.get(client_id)
        if old is not None and self.sessions[old].alive:
            self._kill(self.sessions[old], "replaced by a new registration of the same process")
        session = Session(
            secrets.token_hex(16), client_id, name, time.monotonic(), identity=identity, peer=peer
        )
        self.sessions[session.session_id] = session
        self.by_client[client_id] = session.session_id
        return session

    def open_session(
        self,
        *,
        identity: str | None,
        requested: int,
        name: str,
        peer: str,
        role: str = "",
        previous: str = "",
        replace_stale: bool = False,
    ) -> Session | Refusal:
        """A session for an authenticated ``identity`` (None: the server authenticates no
        one), or why not.

        An identity's participant id is the one it was first given in this run (the
        requested ``--partition``, else the lowest id no identity holds). A live session
        of the same identity is replaced only by the process that holds it (it proves so
        with ``previous``, its old session id), or with ``replace_stale`` once its
        heartbeats have stopped for three intervals; otherwise the registration is
        refused: two processes never share one identity.
        """
        with self.lock:
            if role:
                pid: int | Refusal = self.roles[role]
            elif identity is None:
                pid = self._anonymous_id(requested)
            else:
                pid = self._identity_id(identity, requested)
            if isinstance(pid, Refusal):
                return pid
            key = identity if identity is not None else f"{role or 'client'} {pid}"
            held = self.book.id_of(key) if identity is not None else None
            if held is not None and held != pid:
                what = self.describe(held)
                return Refusal(
                    "identity_in_use",
                    f"identity '{key}' is {what} of this run and cannot also be {role or pid}",
                )
            live = self._live_session_of(key)
            if live is not None and live.session_id != previous:
                stale_s = time.monotonic() - live.last_seen
                if not (replace_stale and stale_s > 3 * self.options.heartbeat_interval_s):
                    return Refusal(
                        "identity_in_use",
                        f"identity '{key}' already has a live session ({self.describe(pid)}, "
                        f"from {live.peer or 'unknown'}); stop that process first, or pass "
                        "--replace-stale to take over a session whose heartbeats stopped",
                    )
                log.warning(
                    "%s (%s): replacing a session silent for %.1f s (--replace-stale)",
                    self.describe(pid),
                    key,
                    stale_s,
                )
            if identity is not None and held is None:
                self.book.bind(key, pid)
            return self._add_locked(pid, name, key, peer)

    def _live_session_of(self, identity: str) -> Session | None:
        return next((s for s in self.sessions.values() if s.alive and s.identity == identity), None)

    def _anonymous_id(self, requested: int) -> int | Refusal:
        if requested >= 0:
            if requested >= self.num_clients:
                return Refusal(
                    "bad_client_id",
                    f"client id {requested} is outside 0..{self.num_clients - 1}",
                )
            return requested
        live = {s.client_id for s in self.sessions.values() if s.alive}
        free = next((c for c in range(self.num_clients) if c not in live), None)
        if free is None:
            return Refusal("bad_client_id", f"all {self.num_clients} client ids are connected")
        return free

    def _identity_id(self, identity: str, requested: int) -> int | Refusal:
        held = self.book.id_of(identity)
        if held is not None:
            if held in self._role_names:
                return Refusal(
                    "identity_in_use",
                    f"identity '{identity}' is this run's {self._role_names[held]}; "
                    "it cannot also train",
                )
            if requested >= 0 and requested != held:
                return Refusal(
                    "identity_in_use",
                    f"identity '{identity}' is client {held} of this run; start it with "
                    f"--partition {held}, or without --partition",
                )
            return held
        if requested >= 0:
            if requested >= self.num_clients:
                return Refusal(
                    "bad_client_id",
                    f"client id {requested} is outside 0..{self.num_clients - 1}",
                )
            owner = self.book.holder_of(requested)
            if owner is not None:
                return Refusal(
                    "identity_in_use",
                    f"client id {requested} belongs to identity '{owner}' in this run; "
                    "each site uses its own token or certificate",
                )
            return requested
        free = next((c for c in range(self.num_clients) if self.book.holder_of(c) is None), None)
        if free is None:
            return Refusal(
                "identity_in_use",
                f"all {self.num_clients} client ids belong to other identities in this run",
            )
        return free

    def session_for(self, client_id: int) -> Session | None:
        """The live session of a participant; the caller holds the lock."""
        sid = self.by_client.get(client_id)
        session = self.sessions[sid] if sid is not None else None
        return session if session is not None and session.alive else None

    def live(self, session_id: str) -> Session | None:
        """The live session ``session_id``, without counting it as a sign of life."""
        with self.lock:
            session = self.sessions.get(session_id)
            return session if session is not None and session.alive else None

    def free_client_id(self) -> int | None:
        taken = set(self.alive_clients())
        return next((c for c in range(self.num_clients) if c not in taken), None)

    def touch(self, session_id: str) -> Session | None:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None or not session.alive:
                return None
            session.last_seen = time.monotonic()
            return session

    def deregister(self, session: Session, reason: str) -> None:
        """The client ended its session (it failed locally): never sampled again."""
        with self.lock:
            if session.alive:
                self._kill(session, reason, verb="left")

    def reap(self, timeout_s: float) -> None:
        """Declare dead the sessions whose heartbeats stopped; fail their open tasks."""
        now = time.monotonic()
        with self.lock:
            for session in self.sessions.values():
                if session.alive and now - session.last_seen > timeout_s:
                    self._kill(session, f"no heartbeat for {timeout_s:.0f} s")

    def _kill(self, session: Session, why: str, verb: str = "lost") -> None:
        session.alive = False
        session.ended = f"{verb}: {why}"
        who = self.describe(session.client_id)
        log.warning("%s (%s) %s: %s", who, session.identity or session.name, verb, why)
        for ot in self.open_tasks.values():
            if ot.session_id == session.session_id and not ot.done.is_set():
                ot.outcome = ClientFailure(
                    client_id=ot.task.client_id, round=ot.task.round, error=f"client lost: {why}"
                )
                ot.done.set()


class FederationServicer:
    """Request handlers. Each takes raw bytes and returns raw bytes.

    Every call is authenticated before a handler runs (:class:`_Gate`): Register by the
    credential (a token in the call's metadata; the client certificate of mutual TLS is
    checked by the TLS handshake itself), every other call by a live session in its
    metadata that belongs to the credential's identity. Handlers then check that the
    session named in the message is that one.
    """

    def __init__(
        self,
        registry: Registry,
        options: DeployOptions,
        tokens: TokenStore | None,
        revoked: RevocationList | None = None,
    ) -> None:
        self.registry = registry
        self.options = options
        self.tokens = tokens
        self.revoked = revoked
        #: A result stream silent this long loses its call (it holds a worker thread);
        #: read afresh at every wait, so a change applies to streams already open.
        self.idle_stream_s = options.idle_stream_timeout_s

    def identity(self, metadata: Any, context: grpc.ServicerContext | None = None) -> str | None:
        """The caller's identity: its token's owner, else its certificate's common name."""
        if self.tokens is not None:
            return self.tokens.check(_bearer(metadata))
        return _mtls_name(context) if context is not None else None

    # --- Register / Heartbeat / Deregister -------------------------------------------------

    def register(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        reg = self.registry
        try:
            req = pb.RegisterRequest.FromString(raw)
        except DecodeError:
            reg.reject("malformed", "unparseable RegisterRequest")
            return _refuse("malformed RegisterRequest")
        if req.protocol_version != PROTOCOL_VERSION:
            reason = (
                f"protocol version {req.protocol_version} is not supported by this server "
                f"(it speaks {PROTOCOL_VERSION}); install the matching fedloom version"
            )
            reg.reject("protocol_version", reason)
            return _refuse(reason)
        identity = self.identity(context.invocation_metadata(), context)
        authenticated = self.tokens is not None or identity is not None
        if self.tokens is not None and identity is None:  # the gate lets none through
            reason = "token refused: unknown or revoked; ask the operator for a valid token"
            reg.reject("bad_token", f"from {context.peer()}: {reason}")
            return _refuse(reason)
        if identity is not None and self.revoked is not None and self.revoked.has(identity):
            reason = f"the credential of identity '{identity}' is revoked; ask the operator"
            reg.reject("revoked", f"from {context.peer()}: {reason}")
            return _refuse(reason)
        name = identity or req.name or "client"
        role = req.role if req.role not in ("", "trainer") else ""
        if role:
            refusal = self._check_role(role, name, authenticated)
            if refusal is not None:
                return refusal
        opened = reg.open_session(
            identity=identity if authenticated else None,
            requested=int(req.partition),
            name=name,
            peer=context.peer(),
            role=role,
            previous=req.previous_session,
            replace_stale=req.replace_stale,
        )
        if isinstance(opened, Refusal):
            reg.reject(opened.reason, f"'{name}' from {context.peer()}: {opened.line}")
            return _refuse(opened.line)
        log.info(
            "%s registered as '%s' from %s",
            reg.describe(opened.client_id),
            opened.identity,
            context.peer(),
        )
        return self._accept(opened)

    def _check_role(self, role: str, name: str, authenticated: bool) -> bytes | None:
        """A refusal if this run has no such role or the credentials do not name it."""
        reg = self.registry
        if role not in reg.roles:
            needed = ", ".join(f"'{r}'" for r in reg.roles) or "none"
            reason = (
                f"this run has no role '{role[:40]}' (roles it needs: {needed}); "
                "start this process as a training client"
            )
            reg.reject("bad_role", reason)
            return _refuse(reason)
        wanted = reg.authorized[role]
        if authenticated and name != wanted:
            reason = (
                f"'{name}' is not this run's {role} ('{wanted}'); give the {role} "
                f"the token or certificate issued to '{wanted}'"
            )
            reg.reject("bad_role", reason)
            return _refuse(reason)
        return None

    def _accept(self, session: Session) -> bytes:
        """The reply to an accepted registration: the session and the experiment."""
        return pb.RegisterReply(
            accepted=True,
            session_id=session.session_id,
            client_id=session.client_id,
            config_json=self.registry.config_json,
            run_id=self.registry.run_id,
            vector_size=self.registry.vector_size,
            heartbeat_interval_s=self.options.heartbeat_interval_s,
        ).SerializeToString()

    def _own_session(self, session_id: str, context: grpc.ServicerContext) -> bool:
        """Whether ``session_id`` is the session this call was admitted for."""
        return _session_header(context.invocation_metadata()) == session_id

    async def heartbeat(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Answered on the serving loop: it only stamps the session (a short lock), and
        every live client sends one each interval, so a thread hop would dominate it."""
        try:
            req = pb.HeartbeatRequest.FromString(raw)
        except DecodeError:
            self.registry.reject("malformed", "unparseable HeartbeatRequest")
            return pb.HeartbeatReply(known=False).SerializeToString()
        if not self._own_session(req.session_id, context):
            self.registry.reject("wrong_session", f"heartbeat from {context.peer()}")
            return pb.HeartbeatReply(known=False).SerializeToString()
        session = self.registry.touch(req.session_id)
        if session is None:
            self.registry.reject("unknown_session", f"heartbeat from {context.peer()}")
        elif self.revoked is not None and self.revoked.has(
            session.identity, max_age_s=REVOCATION_MAX_AGE_S
        ):
            self.registry.deregister(session, "its credential was revoked")
            session = None
        return pb.HeartbeatReply(known=session is not None).SerializeToString()

    def deregister(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        """A client that cannot go on ends its session; the reason goes to the log."""
        try:
            req = pb.DeregisterRequest.FromString(raw)
        except DecodeError:
            self.registry.reject("malformed", "unparseable DeregisterRequest")
            return pb.DeregisterReply(known=False).SerializeToString()
        session = self.registry.live(req.session_id)
        if session is None or not self._own_session(req.session_id, context):
            self.registry.reject("unknown_session", f"deregister from {context.peer()}")
            return pb.DeregisterReply(known=False).SerializeToString()
        reason = " ".join(req.reason.split())[:500] or "no reason given"
        self.registry.deregister(session, reason)
        return pb.DeregisterReply(known=True).SerializeToString()

    # --- PullTask ---------------------------------------------------------------------

    async def pull_task(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """The long poll: a coroutine on the serving loop, so a waiting client holds no
        thread (see :mod:`fedloom.engine.grpc.serving`)."""
        reg = self.registry
        try:
            req = pb.PullRequest.FromString(raw)
        except DecodeError:
            reg.reject("malformed", "unparseable PullRequest")
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed PullRequest")
        if not self._own_session(req.session_id, context):
            reg.reject("wrong_session", f"PullTask from {context.peer()}")
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "not this call's session")
        session = reg.touch(req.session_id)
        if session is None:
            reg.reject("unknown_session", f"PullTask from {context.peer()}")
            await _abort(context, grpc.StatusCode.NOT_FOUND, "unknown session; register again")
        if not self._open_stream(session):
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls in progress")
        try:
            async for message in self._poll(session):
                yield message
        finally:
            self._close_stream(session)

    def _open_stream(self, session: Session) -> bool:
        """Count a call of ``session`` in progress; False (counted) if over its cap."""
        reg = self.registry
        with reg.lock:
            if session.streams >= self.options.max_streams_per_client:
                over = True
            else:
                session.streams += 1
                over = False
        if over:
            reg.reject(
                "too_many_streams",
                f"{reg.describe(session.client_id)} ({session.identity}) has "
                f"{self.options.max_streams_per_client} calls in progress",
            )
        return not over

    def _close_stream(self, session: Session) -> None:
        with self.registry.lock:
            session.streams -= 1

    async def _poll(self, session: Session) -> AsyncIterator[bytes]:
        """A task for ``session`` as soon as one is queued, else an idle header after the
        poll timeout; a stop or pause as soon as the run ends (the executor wakes every
        waiting poll then). A client that goes away cancels the wait."""
        reg = self.registry
        deadline = time.monotonic() + self.options.poll_timeout_s
        while True:
            if reg.stopping:
                with reg.lock:
                    reg.told_to_stop.add(session.session_id)
                yield _task_header(pb.TASK_PAUSE if reg.pausing else pb.TASK_STOP)
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                yield _task_header(pb.TASK_IDLE)
                return
            ot = await session.tasks.get(timeout=remaining)
            if ot is None or ot.done.is_set():  # woken, timed out, or expired while queued
                continue
            for message in self._stream_task(ot):
                yield message
            return

    def _stream_task(self, ot: OpenTask) -> Iterator[bytes]:
        task = ot.task
        header = pb.TaskHeader(
            task_id=ot.task_id,
            round=task.round,
            client_id=task.client_id,
            deadline_s=self.options.round_timeout_s,
        )
        if isinstance(task, ExchangeTask):
            header.kind = pb.TASK_EXCHANGE
            header.protocol = task.request.protocol
            header.stage = task.request.stage
            header.payload_size = sum(len(memoryview(b).cast("B")) for b in ot.payload)
        else:
            header.kind = pb.TASK_FIT if isinstance(task, FitTask) else pb.TASK_EVALUATE
            header.model_version = task.model_version
            header.config_json = encode_config(task.config)
            header.vectors.extend(ot.infos)
        yield pb.TaskMessage(header=header).SerializeToString()
        try:
            # Straight from the vectors' own memory (the broadcast is not copied); each
            # chunk message costs one slice and one concatenation, nothing per byte in
            # Python.
            yield from encode_buffers(ot.payload, self.options.chunk_bytes)
        finally:
            # Streamed (or the stream ended): the task no longer pins its payload.
            ot.payload = ()

    # --- PushResult -------------------------------------------------------------------

    async def push_result(
        self, messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        """A result stream, read and checked on a worker thread (the checks are numpy
        work that must not stall the serving loop); every wait for the client's next
        message is bounded by ``deploy.idle_stream_timeout_s``."""
        session = self.registry.live(_session_header(context.invocation_metadata()))
        if session is None:  # the gate admitted it; the session died since
            return self._refuse_result("unknown_session", "result from an ended session")
        if not self._open_stream(session):
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls in progress")
        peer = context.peer()
        raws = BlockingReader(
            messages,
            asyncio.get_running_loop(),
            idle_s=lambda: self.idle_stream_s,
            on_idle=lambda: self.registry.reject(
                "idle_stream", f"result stream from {peer} silent for {self.idle_stream_s:.0f} s"
            ),
        )
        loop = asyncio.get_running_loop()
        reading = loop.run_in_executor(None, self._push_closing, raws, session)
        try:
            reply = await asyncio.shield(reading)
        except asyncio.CancelledError:  # the client went away: free the worker, then end
            raws.close()
            raise
        if reply is None:  # idle (counted by the reader) or broken
            await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "result stream went silent")
        return reply

    def _push_closing(self, raws: BlockingReader, session: Session) -> bytes | None:
        """:meth:`_push` on a worker thread; None if the stream went idle or broke."""
        try:
            return self._push(raws, session)
        except StreamEnded:
            return None
        finally:
            self._close_stream(session)

    def _push(self, raws: Iterator[bytes], caller: Session) -> bytes:
        reg = self.registry
        try:
            first = pb.ResultMessage.FromString(next(raws))
        except (DecodeError, StopIteration):
            return self._refuse_result(
                "malformed", "unparseable or empty result stream", caller.client_id
            )
        if first.WhichOneof("part") != "header":
            return self._refuse_result(
                "malformed", "result stream does not start with a header", caller.client_id
            )
        head = first.header
        if head.session_id != caller.session_id:
            known = reg.live(head.session_id) is not None
            return self._refuse_result(
                "wrong_session" if known else "unknown_session",
                f"result for task '{head.task_id[:40]}' names another session",
                caller.client_id,
            )
        session = reg.touch(head.session_id)
        if session is None:
            return self._refuse_result(
                "unknown_session", f"result for task '{head.task_id[:40]}'", caller.client_id
            )
        with reg.lock:
            ot = reg.open_tasks.get(head.task_id)
        if ot is None:
            return self._refuse_result(
                "task_not_open", f"task '{head.task_id[:40]}' is not open", caller.client_id
            )
        if ot.session_id != session.session_id:
            return self._refuse_result(
                "wrong_session", f"task {ot.task_id} belongs to another client", caller.client_id
            )
        if head.round != ot.task.round:
            return self._refuse_result(
                "stale_round",
                f"result for round {head.round}, task is round {ot.task.round}",
                caller.client_id,
            )
        if ot.done.is_set():
            return self._refuse_result(
                "duplicate", f"task {ot.task_id} already answered or expired", caller.client_id
            )
        try:
            outcome = self._read_outcome(ot, head, raws)
        except WireError as rej:
            # counted before it closes
            refused = self._refuse_result(rej.reason, str(rej), caller.client_id)
            if isinstance(ot.task, ExchangeTask):
                # A participant answers a protocol stage once: a refused reply (over the
                # protocol's limit) is its dropout there, now rather than at the deadline.
                failure = ClientFailure(
                    client_id=ot.task.client_id,
                    round=ot.task.round,
                    error=f"reply refused ({rej.reason}): {rej}",
                )
                with reg.lock:
                    if not ot.done.is_set():
                        ot.outcome = failure
                        ot.done.set()
            return refused
        with reg.lock:
            if ot.done.is_set():
                return self._refuse_result(
                    "duplicate", f"task {ot.task_id} already answered", caller.client_id
                )
            ot.outcome = outcome
            ot.done.set()
        return pb.PushReply(accepted=True).SerializeToString()

    def _read_outcome(self, ot: OpenTask, head: Any, raws: Iterator[bytes]) -> Outcome:
        task = ot.task
        metrics = decode_metrics(head.metrics_json)
        who = {"client_id": task.client_id, "round": task.round}
        if head.error:
            _drain(raws, limit=0)
            tb = metrics.get("traceback", "")
            return ClientFailure(**who, error=head.error[:2000], traceback=str(tb)[:20000])
        if head.num_examples < 0:
            raise WireError("bad_value", f"num_examples {head.num_examples} is negative")
        if isinstance(task, ExchangeTask):
            payload = self._read_payload(head, raws, task.request.reply_limit)
            return ExchangeReply(**who, payload=payload)
        if isinstance(task, EvalTask):
            _drain(raws, limit=0)
            return EvalResult(
                **who, num_examples=int(head.num_examples), metrics=_eval_metrics(head, metrics)
            )
        clean = numeric_metrics(metrics)

        def result(**kw: Any) -> FitResult:
            return FitResult(
                client_id=task.client_id,
                round=task.round,
                model_version=task.model_version,
                num_examples=int(head.num_examples),
                metrics=clean,
                **kw,
            )

        if head.held:
            _drain(raws, limit=0)
            if not task.config.get(HOLD):
                raise WireError("unexpected_held", "a held update for a task that holds none")
            return result(straggler=bool(head.straggler), held=True)
        sizes = self.registry.upload_sizes
        layout = check_infos(head.vectors, expected=sizes, max_total=layout_total(sizes))
        if not layout:
            _drain(raws, limit=0)
            if not head.straggler:
                raise WireError("missing_vector", "a training result without an update")
            return result(straggler=True)
        # Values are the strategy's to judge (NaN or Inf makes the update a recorded
        # failure of this client, as in simulation): the task is answered now rather
        # than left open until the round deadline.
        vectors = split_vectors(self._chunks(raws, payload_bytes(layout)), layout)
        return result(vectors=vectors, straggler=bool(head.straggler))

    def _read_payload(self, head: Any, raws: Iterator[bytes], limit: int) -> bytes:
        """A protocol-stage reply: exactly ``payload_size`` bytes, at most ``limit``.

        The limit is the protocol's largest legitimate reply at that stage
        (:attr:`~fedloom.exchange.ExchangeRequest.reply_limit`); anything claiming more
        is refused unread.
        """
        size = int(head.payload_size)
        if not 0 < size <= limit:
            raise WireError("oversized", f"exchange reply of {size} bytes (limit {limit})")
        return bytes(self._chunks(raws, size))

    @staticmethod
    def _chunks(raws: Iterator[bytes], size: int) -> np.ndarray:
        """The payload in one buffer of the announced size (reused across rounds once
        the previous round's update is released; see :func:`read_chunks`)."""
        try:
            return read_chunks(raws, size)
        except ChunkError as err:
            raise WireError(err.reason, str(err)) from None

    def _refuse_result(self, reason: str, detail: str, client_id: int | None = None) -> bytes:
        self.registry.reject(reason, detail, client_id=client_id)
        return pb.PushReply(accepted=False, reason=f"{reason}: {detail}").SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's methods behind the authentication gate (:class:`_Gate`)."""
        return _Gate(
            self,
            {
                "Register": grpc.unary_unary_rpc_method_handler(self.register),
                "Heartbeat": grpc.unary_unary_rpc_method_handler(self.heartbeat),
                "PullTask": grpc.unary_stream_rpc_method_handler(self.pull_task),
                "PushResult": grpc.stream_unary_rpc_method_handler(self.push_result),
                "Deregister": grpc.unary_unary_rpc_method_handler(self.deregister),
            },
        )


class _Gate(grpc.GenericRpcHandler):
    """Admits a call only with credentials, before any of its messages is read.

    gRPC asks for a call's handler on its serving thread, with the call's metadata and
    before a worker thread is taken; answering None there ends the call at once
    (UNIMPLEMENTED) at no cost. So a flood of calls without a valid token, or without a
    live session of the caller's own identity, never occupies a worker: it cannot stall
    registrations or rounds. Each refused call is counted under ``unauthenticated``.
    """

    def __init__(
        self, servicer: FederationServicer, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self.servicer = servicer
        self.handlers = {f"/{SERVICE}/{name}": h for name, h in handlers.items()}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self.handlers.get(details.method)
        if handler is None:
            return None
        servicer, reg = self.servicer, self.servicer.registry
        metadata = details.invocation_metadata
        identity = servicer.identity(metadata) if servicer.tokens is not None else None
        if details.method.endswith("/Register"):
            if servicer.tokens is not None and identity is None:
                reg.reject("bad_token", "a registration without a valid token")
                return None
            return handler
        if servicer.tokens is not None and identity is None:
            reg.reject("unauthenticated", f"{details.method} without a valid token")
            return None
        session = reg.live(_session_header(metadata))
        if session is None:
            reg.reject("unauthenticated", f"{details.method} without a live session")
            return None
        if identity is not None and session.identity != identity:
            reg.reject(
                "wrong_session",
                f"'{identity}' called {details.method} with the session of '{session.identity}'",
            )
            return None
        return handler


class RevocationList:
    """Identities whose credentials are revoked (one per line), re-read when it changes.

    A certificate cannot be un-issued; listing its identity here (``fedloom certs
    --revoke NAME``) makes the server refuse it at registration and end its session.
    Registration looks at the file every time; heartbeats (every live client, on the
    event loop) accept an answer up to ``max_age_s`` old, so a fleet costs one ``stat``
    per second rather than one per heartbeat.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._mtime = -1.0
        self._checked = -math.inf
        self._names: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def has(self, identity: str, *, max_age_s: float = 0.0) -> bool:
        with self._lock:
            now = self._clock()
            if now - self._checked >= max_age_s:
                self._reload()
                self._checked = now
            return identity in self._names

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._names, self._mtime = frozenset(), -1.0
            return
        if mtime != self._mtime:
            lines = self.path.read_text().splitlines()
            self._names = frozenset(n.strip() for n in lines if n.strip())
            self._mtime = mtime


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str
) -> NoReturn:
    """Ends the call with ``code``; ``context.abort`` always raises, but its stub does not
    say so, and this lets the type checker follow the handlers' early exits."""
    await context.abort(code, details)
    raise AssertionError("grpc.aio's abort returned")  # it raises; never reached


def _bearer(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == AUTH_HEADER and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return ""


def _session_header(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == SESSION_HEADER and isinstance(value, str):
            return value[:64]
    return ""


def _eval_metrics(head: Any, metrics: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation's metrics: finite numbers only, with ``loss`` when it had examples."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not _finite_number(value):
            raise WireError(
                "bad_value", f"evaluation metric '{str(key)[:40]}' is not a finite number"
            )
        out[str(key)] = float(value)
    if head.num_examples > 0 and "loss" not in out:
        raise WireError("bad_value", "evaluation loss missing")
    return out


def _finite_number(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))
    )


def _drain(raws: Iterator[bytes], limit: int) -> None:
    for count, _ in enumerate(raws, start=1):
        if count > limit:
            raise WireError("oversized", "unexpected chunks after a vector-less result")


def _refuse(reason: str) -> bytes:
    return pb.RegisterReply(accepted=False, reason=reason).SerializeToString()


def _task_header(kind: int) -> bytes:
    return pb.TaskMessage(header=pb.TaskHeader(kind=kind)).SerializeToString()  # type: ignore[arg-type]


def _mtls_name(context: grpc.ServicerContext) -> str | None:
    auth = context.auth_context()
    names = auth.get("x509_common_name") or []
    return names[0].decode() if names else None


class GrpcExecutor:
    """A :class:`~fedloom.server.loop.ClientExecutor` over connected client processes.

    Deployed clients keep their own state on their own machines, so the checkpoint's
    client-state reference is empty and restoring one is a no-op.
    """

    def __init__(self, registry: Registry, options: DeployOptions) -> None:
        self.registry = registry
        self.options = options
        self._reported: Counter[str] = Counter()
        #: Tasks opened and not yet collected (the round loop is one thread).
        self._pending: list[OpenTask | Outcome] = []
        #: Submitted fit tasks not yet collected, with their deadlines (asynchronous loop).
        self._in_flight: list[tuple[OpenTask | Outcome, float]] = []
        self._next_report = time.monotonic() + PROGRESS_EVERY_S
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True)
        self._reaper.start()

    def _reap_loop(self) -> None:
        while not self._stop.wait(min(1.0, self.options.heartbeat_timeout_s / 4)):
            self.registry.reap(self.options.heartbeat_timeout_s)

    def available_clients(self) -> list[int]:
        return self.registry.alive_clients()

    def connected_clients(self) -> list[int]:
        return self.registry.alive_clients()

    def wait_for_clients(self, count: int) -> None:
        """Block until ``count`` clients and every role the run needs are connected.

        Raises ``TimeoutError`` with what is missing after ``deploy.wait_for_clients_s``.
        """
        wait_s = self.options.wait_for_clients_s
        deadline = time.monotonic() + wait_s
        next_report = time.monotonic() + PROGRESS_EVERY_S
        while True:
            connected = len(self.registry.alive_clients())
            missing = self.registry.missing_roles()
            if connected >= count and not missing:
                return
            if time.monotonic() >= next_report:
                next_report += PROGRESS_EVERY_S
                roles = f"; no {', '.join(missing)} yet" if missing else ""
                progress.info(
                    "waiting for clients: %d of %d connected%s (gives up in %.0f s)",
                    connected,
                    count,
                    roles,
                    max(0.0, deadline - time.monotonic()),
                )
            if time.monotonic() > deadline:
                if connected >= count:
                    role = missing[0]
                    raise TimeoutError(
                        f"no {role} connected within {wait_s:.0f} s; start one with "
                        f"'fedloom client --{role} --server ADDRESS ...'"
                    )
                raise TimeoutError(
                    f"only {connected} of the {count} clients needed "
                    f"connected within {wait_s:.0f} s; start more "
                    "clients or lower server.min_fit_clients"
                )
            time.sleep(0.05)

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast
    ) -> list[FitResult | ClientFailure]:
        out = self._run(tasks, *_encode_broadcast(broadcast))
        return [o for o in out if isinstance(o, FitResult | ClientFailure)]

    def evaluate(
        self, tasks: Sequence[EvalTask], broadcast: Broadcast
    ) -> list[EvalResult | ClientFailure]:
        out = self._run(tasks, *_encode_broadcast(broadcast))
        return [o for o in out if isinstance(o, EvalResult | ClientFailure)]

    def exchange(self, request: ExchangeRequest, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        """One protocol stage: a task per participant, the replies that came back in time.

        A participant that fails, dies, misses the deadline or answers with more than
        ``request.reply_limit`` bytes is absent from the result (a dropout there).
        """
        replies: dict[int, bytes] = {}
        for pid, data in outgoing.items():
            task = ExchangeTask(client_id=pid, round=request.round, request=request)
            self._open(task, [data])
        for out in self._collect():
            if isinstance(out, ExchangeReply):
                replies[out.client_id] = out.payload
            elif isinstance(out, ClientFailure):
                log.warning(
                    "%s stage %d: %s dropped out: %s",
                    request.protocol,
                    request.stage,
                    self.registry.describe(out.client_id),
                    out.error,
                )
        return replies

    def _run(
        self, tasks: Sequence[Task], payload: Sequence[Buffer], infos: Sequence[pb.VectorInfo]
    ) -> list[Outcome]:
        for task in tasks:
            self._open(task, payload, infos)
        return self._collect()

    def _open(
        self, task: Task, payload: Sequence[Buffer], infos: Sequence[pb.VectorInfo] = ()
    ) -> None:
        self._pending.append(self._open_task(task, payload, infos))

    def _open_task(
        self, task: Task, payload: Sequence[Buffer], infos: Sequence[pb.VectorInfo] = ()
    ) -> OpenTask | ClientFailure:
        """Queue ``task`` for its client's session (a failure if it has none)."""
        reg = self.registry
        with reg.lock:
            session = reg.session_for(task.client_id)
            if session is None:
                return ClientFailure(
                    client_id=task.client_id, round=task.round, error="client not connected"
                )
            ot = OpenTask(secrets.token_hex(16), task, session.session_id, payload, infos)
            reg.open_tasks[ot.task_id] = ot
        session.tasks.put(ot)
        return ot

    # --- tasks in flight across rounds (the asynchronous loop) -------------------------

    def submit_fit(self, tasks: Sequence[FitTask], broadcast: Broadcast) -> None:
        """Queue fit tasks that :meth:`fit_completed` collects as they come back.

        Each has its own deadline (``deploy.round_timeout_s`` from now); the handlers
        check results exactly as for a round's tasks (open, the sender's own, once).
        """
        payload, infos = _encode_broadcast(broadcast)
        deadline = time.monotonic() + self.options.round_timeout_s
        for task in tasks:
            self._in_flight.append((self._open_task(task, payload, infos), deadline))

    def fit_completed(self, *, wait_s: float) -> list[FitResult | ClientFailure]:
        """The submitted tasks that were answered, failed (a lost session fails its task
        when the reaper ends it) or passed their deadline, in submission order."""
        until = time.monotonic() + wait_s
        while True:
            now = time.monotonic()
            ready = [
                (item, due)
                for item, due in self._in_flight
                if not isinstance(item, OpenTask) or item.done.is_set() or now >= due
            ]
            if ready or not self._in_flight or now >= until:
                break
            if now >= self._next_report:
                self._next_report = now + PROGRESS_EVERY_S
                self._report_training()
            time.sleep(min(0.02, max(0.0, until - now)))
        done = {id(item) for item, _ in ready}
        self._in_flight = [(item, due) for item, due in self._in_flight if id(item) not in done]
        out: list[FitResult | ClientFailure] = []
        for item, _ in ready:
            if isinstance(item, OpenTask):
                with self.registry.lock:
                    self.registry.open_tasks.pop(item.task_id, None)
                    if not item.done.is_set():
                        item.done.set()  # past its deadline: a late result is rejected
                        item.outcome = None
                outcome = self._finish(item)
            else:
                outcome = item
            if isinstance(outcome, FitResult | ClientFailure):
                out.append(outcome)
        return out

    def _collect(self) -> list[Outcome]:
        """Wait for the opened tasks until the round deadline; their outcomes in order."""
        reg = self.registry
        opened, self._pending = self._pending, []
        deadline = time.monotonic() + self.options.round_timeout_s
        outcomes: list[Outcome] = []
        for item in opened:
            if not isinstance(item, OpenTask):
                outcomes.append(item)
                continue
            while not item.done.wait(min(PROGRESS_EVERY_S, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    break
                self._report_waiting(opened, deadline)
            with reg.lock:
                reg.open_tasks.pop(item.task_id, None)
                if not item.done.is_set():
                    item.done.set()  # closes the task: a late result is rejected
                    item.outcome = None
            outcomes.append(self._finish(item))
        return outcomes

    def _report_training(self) -> None:
        """Tell the operator who trains a task of the asynchronous loop right now."""
        reg = self.registry
        with reg.lock:
            names = [
                reg.describe(item.task.client_id)
                for item, _ in self._in_flight
                if isinstance(item, OpenTask) and not item.done.is_set()
            ]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        progress.info("asynchronous: %d tasks in flight (%s)", len(names), shown or "none")

    def _report_waiting(self, opened: Sequence[OpenTask | Outcome], deadline: float) -> None:
        """Tell the operator whom the round waits for, and until when."""
        reg = self.registry
        waiting = [o for o in opened if isinstance(o, OpenTask) and not o.done.is_set()]
        if not waiting:
            return
        with reg.lock:
            names = [
                f"{reg.describe(o.task.client_id)} ({reg.sessions[o.session_id].identity})"
                for o in waiting
                if o.session_id in reg.sessions
            ]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        progress.info(
            "round %d: waiting for %s (deadline in %.0f s)",
            waiting[0].task.round,
            shown,
            max(0.0, deadline - time.monotonic()),
        )

    def _finish(self, ot: OpenTask) -> Outcome:
        task = ot.task
        self.registry.task_finished(
            task.client_id,
            late=ot.outcome is None,
            ok=ot.outcome is not None and not isinstance(ot.outcome, ClientFailure),
        )
        if ot.outcome is not None:
            return ot.outcome
        who = self.registry.describe(task.client_id)
        log.warning("%s missed the round %d deadline", who, task.round)
        with self.registry.lock:
            self.registry.rejections["deadline_missed"] += 1
        if isinstance(task, FitTask):
            return FitResult(
                client_id=task.client_id,
                round=task.round,
                model_version=task.model_version,
                num_examples=0,
                straggler=True,
            )
        return ClientFailure(
            client_id=task.client_id, round=task.round, error="missed the round deadline"
        )

    def round_metrics(self) -> dict[str, Any]:
        """Rejections since the last call, by reason, for the round record."""
        with self.registry.lock:
            now = Counter(self.registry.rejections)
        delta = now - self._reported
        self._reported = now
        return {"rejected_messages": sum(delta.values()), "rejected_by_reason": dict(delta)}

    def save_client_state(self) -> dict[str, Any]:
        """Deployed clients keep their own state on their machines: nothing to reference."""
        return {}

    def load_client_state(self, manifest: Mapping[str, Any]) -> None:
        return None

    def close(self, wait: bool = False, *, pause: bool = False) -> None:
        """Stop the reaper and end the run: each client is told so at its next poll.

        With ``pause`` the run is not over (the server stops to be resumed): clients are
        told to wait for it and register again, not to exit. With ``wait``, return once
        every live client has been told, or after one long poll (plus 2 s) at the most;
        then stopping the gRPC server loses no one.
        """
        self.registry.pausing = pause
        self.registry.stopping = True
        self.registry.wake_polls()
        self._stop.set()
        if not wait:
            return
        deadline = time.monotonic() + self.options.poll_timeout_s + 2.0
        training = [due for item, due in self._in_flight if isinstance(item, OpenTask)]
        if training and not pause:
            # Clients still training a task of the asynchronous loop hear that the run is
            # over only when they poll after it (a client waits for its server as long as
            # the run lasts): wait for them, at most until their tasks' deadlines. Their
            # results are taken and not used.
            progress.info(
                "the run is over; waiting for %d clients to finish their task", len(training)
            )
            deadline = max(deadline, max(training) + 2.0)
        while time.monotonic() < deadline and not self.registry.all_told_to_stop():
            time.sleep(0.05)


def _encode_broadcast(broadcast: Broadcast) -> tuple[list[memoryview], list[pb.VectorInfo]]:
    """The broadcast's buffers (shared by every task of the round) and their header entries."""
    order = broadcast_order(broadcast)
    return vector_buffers(broadcast, order), vector_infos(broadcast, order=order)


def start_grpc_server(
    servicer: FederationServicer,
    address: str,
    credentials: grpc.ServerCredentials | None,
    max_workers: int = 64,
    max_message_bytes: int = 8 << 20,
    *,
    max_calls: int = 8192,
) -> tuple[AioServer, int]:
    """Start serving; returns the server and the bound port (``:0`` picks a free one).

    ``max_workers`` threads run the handlers that compute; long polls wait on the event
    loop without one. ``max_calls`` bounds the calls in progress (each live client holds
    one long poll): beyond it a call is refused (RESOURCE_EXHAUSTED).
    """
    server = AioServer(
        (servicer.handler(),),
        address,
        credentials,
        max_workers=max_workers,
        max_calls=max_calls,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # One server per address: with port reuse (gRPC's default on Linux) a second
            # server binds the same port and the clients split between the two runs.
            ("grpc.so_reuseport", 0),
            # Calls that arrive faster than the loop takes them wait in gRPC core, which
            # cancels those beyond 1,000 by default: a fleet re-polling at once after a
            # round would lose hundreds of calls (measured with 2,000 clients). Let as
            # many wait as may be in progress.
            ("grpc.server.max_pending_requests", max_calls),
            ("grpc.server.max_pending_requests_hard_limit", 2 * max_calls),
        ],
    )
    return server, server.port
