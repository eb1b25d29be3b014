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

import logging
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from fedloom.engine.grpc import PROTOCOL_VERSION, SERVICE
from fedloom.engine.grpc import fedloom_pb2 as pb
from fedloom.engine.grpc.auth import TokenStore
from fedloom.engine.grpc.chunks import ChunkError, encode_buffers, read_chunks
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

if TYPE_CHECKING:
    from fedloom.config import DeployConfig

log = logging.getLogger("fedloom.deploy")

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
    alive: bool = True
    tasks: queue.Queue[OpenTask] = field(default_factory=queue.Queue)


class Registry:
    """Sessions and open tasks, shared by the gRPC handlers and the executor.

    ``upload_sizes`` are the vectors a fit result must carry (the strategy's
    ``wire_layout``: name → length, or (length, dtype) for a codec's compact arrays).
    ``roles`` are the participants the strategy needs besides the clients; a
    registration for a role is accepted only from the name ``authorized[role]`` (the
    role's own name by default) when clients authenticate, is registered under the
    role's participant id, and is never sampled.
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
        self.lock = threading.Lock()
        self.sessions: dict[str, Session] = {}
        #: Latest session id per participant id (client ids, and roles' ids).
        self.by_client: dict[int, str] = {}
        self.open_tasks: dict[str, OpenTask] = {}
        self.rejections: Counter[str] = Counter()
        self.stopping = False
        self.told_to_stop: set[str] = set()

    def reject(self, reason: str, detail: str) -> None:
        with self.lock:
            self.rejections[reason] += 1
        log.warning("rejected (%s): %s", reason, detail)

    def all_told_to_stop(self) -> bool:
        with self.lock:
            alive = {s.session_id for s in self.sessions.values() if s.alive}
            return alive <= self.told_to_stop

    def alive_clients(self) -> list[int]:
        """The connected clients that train; never a role, which is never sampled."""
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

    def add_session(self, client_id: int, name: str) -> Session:
        """A new session for a participant (a client, or a role's id); its old one dies."""
        with self.lock:
            old = self.by_client.get(client_id)
            if old is not None:
                self._kill(self.sessions[old], "replaced by a new registration")
            session = Session(secrets.token_hex(16), client_id, name, time.monotonic())
            self.sessions[session.session_id] = session
            self.by_client[client_id] = session.session_id
            return session

    def session_for(self, client_id: int) -> Session | None:
        """The live session of a participant; the caller holds the lock."""
        sid = self.by_client.get(client_id)
        session = self.sessions[sid] if sid is not None else None
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

    def reap(self, timeout_s: float) -> None:
        """Declare dead the sessions whose heartbeats stopped; fail their open tasks."""
        now = time.monotonic()
        with self.lock:
            for session in self.sessions.values():
                if session.alive and now - session.last_seen > timeout_s:
                    self._kill(session, f"no heartbeat for {timeout_s:.0f} s")

    def _kill(self, session: Session, why: str) -> None:
        session.alive = False
        who = self.describe(session.client_id)
        log.warning("%s (%s) lost: %s", who, session.name, why)
        for ot in self.open_tasks.values():
            if ot.session_id == session.session_id and not ot.done.is_set():
                ot.outcome = ClientFailure(
                    client_id=ot.task.client_id, round=ot.task.round, error=f"client lost: {why}"
                )
                ot.done.set()


class FederationServicer:
    """Request handlers. Each takes raw bytes and returns raw bytes."""

    def __init__(
        self, registry: Registry, options: DeployOptions, tokens: TokenStore | None
    ) -> None:
        self.registry = registry
        self.options = options
        self.tokens = tokens

    # --- Register / Heartbeat -------------------------------------------------------------

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
        name = req.name or "client"
        authenticated = self.tokens is not None or _mtls_name(context) is not None
        if self.tokens is not None:
            owner = self.tokens.check(req.token)
            if owner is None:
                reason = "token refused: unknown or revoked; ask the operator for a valid token"
                reg.reject("bad_token", f"{name} from {context.peer()}: {reason}")
                return _refuse(reason)
            name = owner
        else:
            name = _mtls_name(context) or name
        if req.role not in ("", "trainer"):
            return self._register_role(req.role, name, authenticated, context)
        client_id = req.partition if req.partition >= 0 else reg.free_client_id()
        if client_id is None or not 0 <= client_id < reg.num_clients:
            reason = f"client id {req.partition} is outside 0..{reg.num_clients - 1}"
            reg.reject("bad_client_id", reason)
            return _refuse(reason)
        session = reg.add_session(int(client_id), name)
        log.info("client %d registered as '%s' from %s", client_id, name, context.peer())
        return self._accept(session)

    def _register_role(
        self, role: str, name: str, authenticated: bool, context: grpc.ServicerContext
    ) -> bytes:
        """Accept a participant for a role the run needs, if the credentials name it."""
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
        session = reg.add_session(reg.roles[role], name)
        log.info("%s registered as '%s' from %s", role, name, context.peer())
        return self._accept(session)

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

    def heartbeat(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            req = pb.HeartbeatRequest.FromString(raw)
        except DecodeError:
            self.registry.reject("malformed", "unparseable HeartbeatRequest")
            return pb.HeartbeatReply(known=False).SerializeToString()
        known = self.registry.touch(req.session_id) is not None
        if not known:
            self.registry.reject("unknown_session", f"heartbeat from {context.peer()}")
        return pb.HeartbeatReply(known=known).SerializeToString()

    # --- PullTask ---------------------------------------------------------------------

    def pull_task(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        reg = self.registry
        try:
            req = pb.PullRequest.FromString(raw)
        except DecodeError:
            reg.reject("malformed", "unparseable PullRequest")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed PullRequest")
        session = reg.touch(req.session_id)
        if session is None:
            reg.reject("unknown_session", f"PullTask from {context.peer()}")
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown session; register again")
            return
        deadline = time.monotonic() + self.options.poll_timeout_s
        while True:
            if reg.stopping:
                with reg.lock:
                    reg.told_to_stop.add(session.session_id)
                yield _task_header(pb.TASK_STOP)
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not context.is_active():
                yield _task_header(pb.TASK_IDLE)
                return
            try:
                ot = session.tasks.get(timeout=min(remaining, 0.25))
            except queue.Empty:
                continue
            if ot.done.is_set():  # expired or failed while queued
                continue
            yield from self._stream_task(ot)
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
        yield from encode_buffers(ot.payload, self.options.chunk_bytes)

    # --- PushResult -------------------------------------------------------------------

    def push_result(self, raws: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        reg = self.registry
        try:
            first = pb.ResultMessage.FromString(next(raws))
        except (DecodeError, StopIteration):
            return self._refuse_result("malformed", "unparseable or empty result stream")
        if first.WhichOneof("part") != "header":
            return self._refuse_result("malformed", "result stream does not start with a header")
        head = first.header
        session = reg.touch(head.session_id)
        if session is None:
            return self._refuse_result("unknown_session", f"result for task '{head.task_id[:40]}'")
        with reg.lock:
            ot = reg.open_tasks.get(head.task_id)
        if ot is None:
            return self._refuse_result("task_not_open", f"task '{head.task_id[:40]}' is not open")
        if ot.session_id != session.session_id:
            return self._refuse_result(
                "wrong_session", f"task {ot.task_id} belongs to another client"
            )
        if head.round != ot.task.round:
            return self._refuse_result(
                "stale_round", f"result for round {head.round}, task is round {ot.task.round}"
            )
        if ot.done.is_set():
            return self._refuse_result(
                "duplicate", f"task {ot.task_id} already answered or expired"
            )
        try:
            outcome = self._read_outcome(ot, head, raws)
        except WireError as rej:
            refused = self._refuse_result(rej.reason, str(rej))  # counted before it closes
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
                return self._refuse_result("duplicate", f"task {ot.task_id} already answered")
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
    def _chunks(raws: Iterator[bytes], size: int) -> bytearray:
        try:
            return read_chunks(raws, size)
        except ChunkError as err:
            raise WireError(err.reason, str(err)) from None

    def _refuse_result(self, reason: str, detail: str) -> bytes:
        self.registry.reject(reason, detail)
        return pb.PushReply(accepted=False, reason=f"{reason}: {detail}").SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's methods; without (de)serializers, so requests and replies are bytes."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Register": grpc.unary_unary_rpc_method_handler(self.register),
                "Heartbeat": grpc.unary_unary_rpc_method_handler(self.heartbeat),
                "PullTask": grpc.unary_stream_rpc_method_handler(self.pull_task),
                "PushResult": grpc.stream_unary_rpc_method_handler(self.push_result),
            },
        )


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
        while True:
            connected = len(self.registry.alive_clients())
            missing = self.registry.missing_roles()
            if connected >= count and not missing:
                return
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
        reg = self.registry
        with reg.lock:
            session = reg.session_for(task.client_id)
            if session is None:
                self._pending.append(
                    ClientFailure(
                        client_id=task.client_id, round=task.round, error="client not connected"
                    )
                )
                return
            ot = OpenTask(secrets.token_hex(16), task, session.session_id, payload, infos)
            reg.open_tasks[ot.task_id] = ot
        session.tasks.put(ot)
        self._pending.append(ot)

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
            item.done.wait(max(0.0, deadline - time.monotonic()))
            with reg.lock:
                reg.open_tasks.pop(item.task_id, None)
                if not item.done.is_set():
                    item.done.set()  # closes the task: a late result is rejected
                    item.outcome = None
            outcomes.append(self._finish(item))
        return outcomes

    def _finish(self, ot: OpenTask) -> Outcome:
        task = ot.task
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

    def close(self, wait: bool = False) -> None:
        """Stop the reaper and end the run: each client is told so at its next poll.

        With ``wait``, return once every live client has been told, or after one long
        poll (plus 2 s) at the most; then stopping the gRPC server loses no one.
        """
        self.registry.stopping = True
        self._stop.set()
        if not wait:
            return
        deadline = time.monotonic() + self.options.poll_timeout_s + 2.0
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
) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the bound port (``:0`` picks a free one)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
        maximum_concurrent_rpcs=max_workers * 4,
    )
    server.add_generic_rpc_handlers((servicer.handler(),))
    try:  # grpcio >= 1.70 raises RuntimeError on a failed bind; older ones returned 0
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        server.stop(None)
        raise OSError(f"cannot listen on {address}; is the address valid and the port free?")
    server.start()
    return server, port
