"""The deployment server: gRPC service, client sessions, and the executor the round loop uses.

The round loop (:class:`fedloom.server.loop.FederatedServer`) is the same one the
simulation uses; :class:`GrpcExecutor` is just another :class:`ClientExecutor`. It puts
tasks in the queues of connected clients' sessions, and waits for results until the
round deadline. Clients pull tasks (long poll) and push results, so the server never
dials out and clients behind NAT work.

Everything that arrives is untrusted. Handlers receive raw bytes and parse them
themselves, so a malformed message is *our* rejection (logged and counted by reason)
rather than an opaque gRPC error; vectors are length-checked and must be finite; a
result must match a task that is open, assigned to the sender's session, and not yet
answered. Every rejection leaves the round and the other results untouched.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from fedloom.engine.grpc import PROTOCOL_VERSION, SERVICE, secagg_message_limit
from fedloom.engine.grpc import fedloom_pb2 as pb
from fedloom.engine.grpc.auth import TokenStore
from fedloom.engine.grpc.chunks import ChunkError, encode_chunks, read_chunks
from fedloom.messages import (
    KEY_HOLDER_ID,
    ClientFailure,
    EvalResult,
    EvalTask,
    FitResult,
    FitTask,
)
from fedloom.params import WIRE_DTYPE, encode_vector
from fedloom.privacy.secagg import STAGES, SecAggConfig, Stage
from fedloom.privacy.secagg.transport import SecureSum, serve_secagg_round

if TYPE_CHECKING:
    from fedloom.config import DeployConfig

log = logging.getLogger("fedloom.deploy")


@dataclass(frozen=True)
class StageTask:
    """One stage of a secure-aggregation protocol for one participant.

    ``protocol`` is ``"secagg"`` (stage indexes :data:`fedloom.privacy.secagg.STAGES`) or
    ``"he"`` (stage indexes :data:`fedloom.privacy.he_protocol.HE_STAGES`; participant
    :data:`~fedloom.messages.KEY_HOLDER_ID` is the key holder). ``reply_limit`` bounds the
    answer's size: anything larger is refused unread.
    """

    client_id: int
    round: int
    protocol: Literal["secagg", "he"]
    stage: int
    payload: bytes
    reply_limit: int


@dataclass
class StageReply:
    client_id: int
    round: int
    payload: bytes


Task = FitTask | EvalTask | StageTask
Outcome = FitResult | EvalResult | StageReply | ClientFailure


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
    payload: bytes
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
    """Sessions and open tasks, shared by the gRPC handlers and the executor."""

    def __init__(
        self,
        num_clients: int,
        vector_size: int,
        config_json: str,
        key_holder_name: str | None = None,
    ) -> None:
        self.num_clients = num_clients
        #: Who may register as the CKKS key holder (None: the run has no key holder).
        self.key_holder_name = key_holder_name
        self.vector_size = vector_size
        self.config_json = config_json
        self.lock = threading.Lock()
        self.sessions: dict[str, Session] = {}
        #: Latest session id per client id; the key holder's is under KEY_HOLDER_ID.
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
        """The connected clients that train; never the key holder, which is never sampled."""
        with self.lock:
            return sorted(
                c
                for c, s in self.by_client.items()
                if c != KEY_HOLDER_ID and self.sessions[s].alive
            )

    def add_session(self, client_id: int, name: str) -> Session:
        """A new session for a client (or, as KEY_HOLDER_ID, the key holder); its old one dies."""
        with self.lock:
            old = self.by_client.get(client_id)
            if old is not None:
                self._kill(self.sessions[old], "replaced by a new registration")
            session = Session(secrets.token_hex(16), client_id, name, time.monotonic())
            self.sessions[session.session_id] = session
            self.by_client[client_id] = session.session_id
            return session

    def session_for(self, client_id: int) -> Session | None:
        """The live session of a client (or of the key holder); the caller holds the lock."""
        sid = self.by_client.get(client_id)
        session = self.sessions[sid] if sid is not None else None
        return session if session is not None and session.alive else None

    def key_holder_alive(self) -> bool:
        with self.lock:
            return self.session_for(KEY_HOLDER_ID) is not None

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
        who = "key holder" if session.client_id == KEY_HOLDER_ID else f"client {session.client_id}"
        log.warning("%s (%s) lost: %s", who, session.name, why)
        for ot in self.open_tasks.values():
            if ot.session_id == session.session_id and not ot.done.is_set():
                ot.outcome = ClientFailure(
                    ot.task.client_id, ot.task.round, f"client lost: {why}", ""
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
        if req.role == "key-holder":
            return self._register_key_holder(name, authenticated, context)
        if req.role not in ("", "trainer"):
            reason = f"unknown role '{req.role[:40]}'; a client is a trainer or the key-holder"
            reg.reject("bad_role", reason)
            return _refuse(reason)
        client_id = req.partition if req.partition >= 0 else reg.free_client_id()
        if client_id is None or not 0 <= client_id < reg.num_clients:
            reason = f"client id {req.partition} is outside 0..{reg.num_clients - 1}"
            reg.reject("bad_client_id", reason)
            return _refuse(reason)
        session = reg.add_session(int(client_id), name)
        log.info("client %d registered as '%s' from %s", client_id, name, context.peer())
        return self._accept(session)

    def _register_key_holder(
        self, name: str, authenticated: bool, context: grpc.ServicerContext
    ) -> bytes:
        """Accept the CKKS key holder, if this run has one and the credentials name it."""
        reg = self.registry
        wanted = reg.key_holder_name
        if wanted is None:
            reason = "this run does not use CKKS aggregation, so it has no key holder"
            reg.reject("bad_role", reason)
            return _refuse(reason)
        if authenticated and name != wanted:
            reason = (
                f"'{name}' is not this run's key holder ('{wanted}'); give the key holder "
                f"the token or certificate issued to '{wanted}'"
            )
            reg.reject("bad_role", reason)
            return _refuse(reason)
        session = reg.add_session(KEY_HOLDER_ID, name)
        log.info("key holder registered as '%s' from %s", name, context.peer())
        return self._accept(session)

    def _accept(self, session: Session) -> bytes:
        """The reply to an accepted registration: the session and the experiment."""
        return pb.RegisterReply(
            accepted=True,
            session_id=session.session_id,
            client_id=session.client_id,
            config_json=self.registry.config_json,
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
            vector_size=self.registry.vector_size,
            deadline_s=self.options.round_timeout_s,
        )
        if isinstance(task, FitTask):
            header.kind = pb.TASK_FIT
            header.drop_stragglers = task.drop_stragglers
            header.secure = task.secure
            if task.clip_norm is not None:
                header.clip_norm = task.clip_norm
        elif isinstance(task, EvalTask):
            header.kind = pb.TASK_EVALUATE
        else:
            header.payload_size = len(ot.payload)
            if task.protocol == "secagg":
                header.kind = pb.TASK_SECAGG
                header.secagg_stage = task.stage
            else:
                header.kind = pb.TASK_HE
                header.he_stage = task.stage
        yield pb.TaskMessage(header=header).SerializeToString()
        yield from encode_chunks(ot.payload, self.options.chunk_bytes)

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
        except _RejectedError as rej:
            return self._refuse_result(rej.reason, rej.detail)
        with reg.lock:
            if ot.done.is_set():
                return self._refuse_result("duplicate", f"task {ot.task_id} already answered")
            ot.outcome = outcome
            ot.done.set()
        return pb.PushReply(accepted=True).SerializeToString()

    def _read_outcome(self, ot: OpenTask, head: Any, raws: Iterator[bytes]) -> Outcome:
        task = ot.task
        try:
            metrics = json.loads(head.metrics_json) if head.metrics_json else {}
        except json.JSONDecodeError:
            raise _RejectedError("malformed", "metrics_json is not JSON") from None
        if not isinstance(metrics, dict):
            raise _RejectedError("malformed", "metrics_json is not an object")
        if head.error:
            _drain(raws, limit=0)
            tb = metrics.get("traceback", "")
            return ClientFailure(task.client_id, task.round, head.error[:2000], str(tb)[:20000])
        if head.num_examples < 0:
            raise _RejectedError("bad_value", f"num_examples {head.num_examples} is negative")
        if isinstance(task, EvalTask):
            _drain(raws, limit=0)
            loss: Any = metrics.get("loss")
            acc: Any = metrics.get("accuracy")
            if not (_finite_number(loss) and _finite_number(acc)):
                raise _RejectedError("bad_value", "evaluation loss/accuracy missing or not finite")
            return EvalResult(
                task.client_id, task.round, int(head.num_examples), float(loss), float(acc)
            )
        if isinstance(task, StageTask):
            payload = self._read_payload(head, raws, task.reply_limit)
            return StageReply(task.client_id, task.round, payload)
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        if head.held:
            _drain(raws, limit=0)
            if not task.secure:
                raise _RejectedError("unexpected_held", "a held update for a non-secure task")
            return FitResult(
                task.client_id, task.round, None, int(head.num_examples), False, clean, held=True
            )
        if not head.has_vector:
            _drain(raws, limit=0)
            if not head.straggler:
                raise _RejectedError("missing_vector", "a training result without an update")
            return FitResult(task.client_id, task.round, None, int(head.num_examples), True, clean)
        expected = self.registry.vector_size * WIRE_DTYPE.itemsize
        if head.vector_size != self.registry.vector_size:
            raise _RejectedError(
                "wrong_shape",
                f"vector size {head.vector_size}, expected {self.registry.vector_size}",
            )
        delta = np.frombuffer(self._chunks(raws, expected), dtype=WIRE_DTYPE)
        if not np.all(np.isfinite(delta)):
            raise _RejectedError("not_finite", "update contains NaN or Inf")
        return FitResult(
            task.client_id, task.round, delta, int(head.num_examples), bool(head.straggler), clean
        )

    def _read_payload(self, head: Any, raws: Iterator[bytes], limit: int) -> bytes:
        """A protocol-stage reply: exactly ``payload_size`` bytes, at most ``limit``.

        The limit is the largest legitimate reply at that stage (e.g. a masked vector of
        ``vector_size`` integers of up to 8 bytes each plus framing); anything claiming
        more is refused unread.
        """
        size = int(head.payload_size)
        if not 0 < size <= limit:
            raise _RejectedError("oversized", f"secure-aggregation payload of {size} bytes")
        return bytes(self._chunks(raws, size))

    @staticmethod
    def _chunks(raws: Iterator[bytes], size: int) -> bytearray:
        try:
            return read_chunks(raws, size)
        except ChunkError as err:
            raise _RejectedError(err.reason, str(err)) from None

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


class _RejectedError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _finite_number(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))
    )


def _drain(raws: Iterator[bytes], limit: int) -> None:
    for count, _ in enumerate(raws, start=1):
        if count > limit:
            raise _RejectedError("oversized", "unexpected chunks after a vector-less result")


def _refuse(reason: str) -> bytes:
    return pb.RegisterReply(accepted=False, reason=reason).SerializeToString()


def _task_header(kind: int) -> bytes:
    return pb.TaskMessage(header=pb.TaskHeader(kind=kind)).SerializeToString()  # type: ignore[arg-type]


def _mtls_name(context: grpc.ServicerContext) -> str | None:
    auth = context.auth_context()
    names = auth.get("x509_common_name") or []
    return names[0].decode() if names else None


class GrpcExecutor:
    """A :class:`~fedloom.server.loop.ClientExecutor` over connected client processes."""

    def __init__(
        self,
        registry: Registry,
        options: DeployOptions,
        secure_aggregation: Literal["none", "secagg+", "ckks"] = "none",
    ) -> None:
        self.registry = registry
        self.options = options
        self.secure_aggregation = secure_aggregation
        self._reported: Counter[str] = Counter()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True)
        self._reaper.start()

    def _reap_loop(self) -> None:
        while not self._stop.wait(min(1.0, self.options.heartbeat_timeout_s / 4)):
            self.registry.reap(self.options.heartbeat_timeout_s)

    def available_clients(self) -> list[int]:
        return self.registry.alive_clients()

    def wait_for_clients(self, count: int) -> None:
        """Block until ``count`` clients (and a CKKS run's key holder) are connected.

        Raises ``TimeoutError`` with what is missing after ``deploy.wait_for_clients_s``.
        """
        wait_s = self.options.wait_for_clients_s
        deadline = time.monotonic() + wait_s
        need_key_holder = self.secure_aggregation == "ckks"
        while True:
            connected = len(self.registry.alive_clients())
            holder_missing = need_key_holder and not self.registry.key_holder_alive()
            if connected >= count and not holder_missing:
                return
            if time.monotonic() > deadline:
                if connected >= count:
                    raise TimeoutError(
                        f"no CKKS key holder connected within {wait_s:.0f} s; start one with "
                        "'fedloom client --key-holder --server ADDRESS ...'"
                    )
                raise TimeoutError(
                    f"only {connected} of the {count} clients needed "
                    f"connected within {wait_s:.0f} s; start more "
                    "clients or lower server.min_fit_clients"
                )
            time.sleep(0.05)

    def fit(
        self, tasks: Sequence[FitTask], global_vector: np.ndarray
    ) -> list[FitResult | ClientFailure]:
        payload = encode_vector(global_vector)
        out = self._run(tasks, [payload] * len(tasks))
        return [o for o in out if isinstance(o, FitResult | ClientFailure)]

    def evaluate(
        self, tasks: Sequence[EvalTask], global_vector: np.ndarray
    ) -> list[EvalResult | ClientFailure]:
        payload = encode_vector(global_vector)
        out = self._run(tasks, [payload] * len(tasks))
        return [o for o in out if isinstance(o, EvalResult | ClientFailure)]

    def secure_sum(
        self, rnd: int, client_ids: Sequence[int], vector_length: int, config: SecAggConfig
    ) -> SecureSum:
        """Secure aggregation with connected clients: each stage is a task per participant.

        A client that fails, dies or misses the deadline at a stage is a dropout there,
        which SecAgg+ recovers from (or aborts the round, naming the cause); under CKKS
        it is left out of the sum, and a silent key holder aborts the round.
        """
        if self.secure_aggregation == "ckks":
            return self._ckks_sum(rnd, client_ids, vector_length)
        limit = secagg_message_limit(vector_length)

        def exchange(stage: Stage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
            return self._stage(rnd, "secagg", STAGES.index(stage), outgoing, limit)

        return serve_secagg_round(client_ids, vector_length, config, exchange)

    def _ckks_sum(self, rnd: int, client_ids: Sequence[int], vector_length: int) -> SecureSum:
        """CKKS: the key holder's public key out, ciphertexts in, the sum decrypted by it.

        Imported here because TenSEAL is an optional extra. This process only ever
        loads the public context (HEAggregator refuses a secret key).
        """
        from fedloom.privacy.he_protocol import (
            HE_STAGES,
            EncryptRequest,
            HEStage,
            reply_limit,
            serve_he_round,
        )

        def exchange(stage: HEStage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
            public = None
            if stage is HEStage.ENCRYPT and outgoing:
                public = EncryptRequest.from_bytes(next(iter(outgoing.values()))).public_context
            limit = reply_limit(stage, vector_length, public)
            return self._stage(rnd, "he", HE_STAGES.index(stage), outgoing, limit)

        return serve_he_round(rnd, client_ids, vector_length, exchange)

    def _stage(
        self,
        rnd: int,
        protocol: Literal["secagg", "he"],
        stage: int,
        outgoing: Mapping[int, bytes],
        reply_limit: int,
    ) -> dict[int, bytes]:
        tasks = [
            StageTask(c, rnd, protocol, stage, data, reply_limit) for c, data in outgoing.items()
        ]
        replies: dict[int, bytes] = {}
        for out in self._run(tasks, [t.payload for t in tasks]):
            if isinstance(out, StageReply):
                replies[out.client_id] = out.payload
            else:
                log.warning(
                    "%s stage %d: participant %d dropped out", protocol, stage, out.client_id
                )
        return replies

    def _run(self, tasks: Sequence[Task], payloads: Sequence[bytes]) -> list[Outcome]:
        reg = self.registry
        opened: list[OpenTask | Outcome] = []
        for task, payload in zip(tasks, payloads, strict=True):
            with reg.lock:
                session = reg.session_for(task.client_id)
                if session is None:
                    opened.append(
                        ClientFailure(task.client_id, task.round, "client not connected", "")
                    )
                    continue
                ot = OpenTask(secrets.token_hex(16), task, session.session_id, payload)
                reg.open_tasks[ot.task_id] = ot
            session.tasks.put(ot)
            opened.append(ot)
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
        log.warning("client %d missed the round %d deadline", task.client_id, task.round)
        with self.registry.lock:
            self.registry.rejections["deadline_missed"] += 1
        if isinstance(task, FitTask):
            return FitResult(task.client_id, task.round, None, 0, straggler=True)
        return ClientFailure(task.client_id, task.round, "missed the round deadline", "")

    def round_metrics(self) -> dict[str, Any]:
        """Rejections since the last call, by reason, for the round record."""
        with self.registry.lock:
            now = Counter(self.registry.rejections)
        delta = now - self._reported
        self._reported = now
        return {"rejected_messages": sum(delta.values()), "rejected_by_reason": dict(delta)}

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
