"""The deployment client: register, pull tasks, train locally, push results, keep alive.

A client process reads only its own data. It learns the experiment (model, local
training settings, seed, strategy) from the server at registration, so the same config
drives simulation and deployment. It survives server restarts and network faults by
re-registering with exponential backoff and jitter.

The built-in apps (:class:`BuiltinApp`, :class:`OwnDataApp`) run the strategy's
client side, a :class:`~fedloom.client.runtime.ClientRuntime`, exactly as the
simulation does, and keep the client's :class:`~fedloom.client_store.ClientState` in a
file on this machine (:mod:`fedloom.engine.grpc.client_state`), saved after every fit
before the update is sent. Bring-your-own-model users implement :class:`ClientApp` (two
methods) and call :func:`run_client` with a factory for it. A process that holds a role
(CKKS's key holder) runs a :class:`ParticipantApp` around the role's participant. This
module knows no algorithm, privacy mechanism or protocol: tasks carry named vectors and
a scalar config, and protocol stages are opaque bytes for the app to answer.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from fedloom.client.runtime import PRIVATE_METRICS, ClientRuntime
from fedloom.client_store import ClientState
from fedloom.config import RunConfig, config_from_json
from fedloom.engine.grpc import (
    AUTH_HEADER,
    PROTOCOL_VERSION,
    SERVICE,
    SESSION_HEADER,
    exchange_message_limit,
    max_message_bytes,
)
from fedloom.engine.grpc import fedloom_pb2 as pb
from fedloom.engine.grpc.chunks import ChunkError, encode_buffers, read_chunks
from fedloom.engine.grpc.client_state import (
    ClientStateError,
    ClientStateFile,
    default_state_dir,
    site_name,
)
from fedloom.engine.grpc.tls_check import diagnose_tls
from fedloom.engine.grpc.wire import (
    LayoutEntry,
    WireError,
    check_infos,
    decode_config,
    payload_bytes,
    result_order,
    split_vectors,
    vector_buffers,
    vector_infos,
)
from fedloom.exchange import ExchangeRequest, Participant
from fedloom.messages import EvalResult, EvalTask, FitResult, FitTask

log = logging.getLogger("fedloom.client")

#: A broadcast may hold at most this many model-sized vectors (the global model, a
#: server control variate, ...); a task announcing more is refused unread.
MAX_BROADCAST_MODELS = 16

Buffer = bytes | bytearray | memoryview


class ClientApp(Protocol):
    """What a deployment client runs.

    ``fit`` gets the round's task (client id, round, model version, the strategy's
    scalar config) and broadcast vectors (``{"global": w, ...}``: float32, the server's
    ParamSpec order) and returns a :class:`~fedloom.messages.FitResult` whose vectors
    are the strategy's uploads (``{"delta": w_local - w_global}`` for FedAvg) and the
    number of examples it trained on; ``evaluate`` scores the global model on the
    client's local test data (``metrics={"loss": ..., "accuracy": ...}``). Exceptions
    are reported to the server with their traceback and the client keeps serving.
    """

    def fit(self, task: FitTask, broadcast: dict[str, np.ndarray]) -> FitResult: ...

    def evaluate(self, task: EvalTask, broadcast: dict[str, np.ndarray]) -> EvalResult: ...


@runtime_checkable
class ExchangeApp(Protocol):
    """An app that answers protocol stages (secure aggregation, a role such as CKKS's
    key holder). ``participant_id`` is this process's id in the run."""

    def respond(self, request: ExchangeRequest, participant_id: int, payload: bytes) -> bytes: ...


@runtime_checkable
class StatefulApp(Protocol):
    """A :class:`ClientApp` whose state must survive a restart of the client process.

    Local DP is the case that makes it a safety property: the ledger of DP-SGD steps is
    the site's spent privacy budget, and forgetting it on a restart would under-count ε.
    :func:`run_client` restores the state when it builds the app and saves it after
    every fit, before the update is sent; nothing is written while the state is empty.
    """

    def client_state(self) -> ClientState:
        """The state to keep (empty: nothing to keep yet)."""
        ...

    def restore_client_state(self, state: ClientState) -> None:
        """Continue from what :meth:`client_state` returned before the restart."""
        ...


AppFactory = Callable[[RunConfig, int], ClientApp]


class ClientRefusedError(Exception):
    """The server refused this client; the message is the server's one-line reason."""


@dataclass
class Credentials:
    """How to reach the server: TLS roots, optional client certificate, optional token."""

    root_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str = ""
    insecure: bool = False

    def channel(self, address: str, max_message_bytes: int) -> grpc.Channel:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if self.insecure:
            return grpc.insecure_channel(address, options=options)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.root_cert.read_bytes() if self.root_cert else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )
        return grpc.secure_channel(address, creds, options=options)


class Backoff:
    """Exponential backoff with full jitter (the AWS architecture blog's scheme)."""

    def __init__(self, initial_s: float = 0.2, max_s: float = 10.0) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self.attempt = 0

    def next_delay(self) -> float:
        cap = min(self.max_s, self.initial_s * (2**self.attempt))
        self.attempt += 1
        return random.uniform(0.0, cap)

    def reset(self) -> None:
        self.attempt = 0


class _Stub:
    """The service's methods; without (de)serializers, so requests and replies are bytes.

    Every call carries the credential (``token``) and, once registered, the session in
    its metadata: the server authenticates each call before reading it.
    """

    def __init__(self, channel: grpc.Channel, token: str = "") -> None:
        base = f"/{SERVICE}/"
        self.token = token
        self.session = ""
        self._register = channel.unary_unary(base + "Register")
        self._heartbeat = channel.unary_unary(base + "Heartbeat")
        self._pull = channel.unary_stream(base + "PullTask")
        self._push = channel.stream_unary(base + "PushResult")
        self._deregister = channel.unary_unary(base + "Deregister")

    def metadata(self) -> list[tuple[str, str]]:
        md = [(AUTH_HEADER, f"Bearer {self.token}")] if self.token else []
        return md + ([(SESSION_HEADER, self.session)] if self.session else [])

    def register(self, request: bytes, timeout: float | None = None) -> bytes:
        return self._register(request, timeout=timeout, metadata=self.metadata())

    def heartbeat(self, request: bytes, timeout: float | None = None) -> bytes:
        return self._heartbeat(request, timeout=timeout, metadata=self.metadata())

    def pull(self, request: bytes, timeout: float | None = None) -> Iterator[bytes]:
        return self._pull(request, timeout=timeout, metadata=self.metadata())

    def push(self, requests: Iterator[bytes], timeout: float | None = None) -> bytes:
        return self._push(requests, timeout=timeout, metadata=self.metadata())

    def deregister(self, request: bytes, timeout: float | None = None) -> bytes:
        return self._deregister(request, timeout=timeout, metadata=self.metadata())


def run_client(
    address: str,
    make_app: AppFactory,
    credentials: Credentials,
    partition: int = -1,
    name: str = "client",
    num_examples: int = 0,
    max_wait_s: float = 300.0,
    chunk_bytes: int = 1 << 20,
    stop: threading.Event | None = None,
    role: str = "",
    state_dir: Path | None = None,
    site: str = "",
    replace_stale: bool = False,
) -> int:
    """Serve tasks until the server says the run is over; return the number of tasks done.

    ``role`` registers for a role the run's strategy needs besides the clients (such
    as CKKS's ``key-holder``; ``make_app`` then builds an app that answers the role's
    exchanges, e.g. a :class:`ParticipantApp`): it trains nothing and is never sampled.
    Raises
    :class:`ClientRefusedError` if the server refuses the registration, and
    ``ConnectionError`` when the server stays unreachable for ``max_wait_s`` before
    this client first registered. Once registered (and after the server said it stops
    to be resumed, TASK_PAUSE) the client waits for its server without a limit: it ends
    only when the run is over or ``stop`` is set.

    A client that cannot go on (its app cannot be built from its data, its state file
    is unusable) ends its session with the reason before raising, so the server never
    samples it again. ``replace_stale`` takes over this identity's session on the
    server if that session's heartbeats have stopped (never a live one).

    A :class:`StatefulApp` with state keeps it in ``state_dir`` (default
    :func:`~fedloom.engine.grpc.client_state.default_state_dir`), in a file named by
    ``site`` (default ``partition-K``; see :func:`~fedloom.engine.grpc.client_state.site_name`)
    and the experiment's config; an unusable file raises
    :class:`~fedloom.engine.grpc.client_state.ClientStateError`.
    """
    stop = stop or threading.Event()
    backoff = Backoff()
    unreachable_since: float | None = None
    app: ClientApp | None = None
    app_key = ""
    state_file: ClientStateFile | None = None
    tally = [0]  # tasks completed, across sessions (kept when a session ends by a fault)
    previous = ""  # the last session this process held: proves a reconnect is this process
    paused = False  # the server stopped to be resumed: wait for it without a limit
    joined = False  # registered once: from then on the client waits for its server
    max_msg = max_message_bytes(chunk_bytes)
    try:
        while not stop.is_set():
            channel = credentials.channel(address, max_msg)
            stub = _Stub(channel, credentials.token)
            try:
                try:
                    raw_reply = stub.register(
                        pb.RegisterRequest(
                            protocol_version=PROTOCOL_VERSION,
                            partition=partition,
                            name=name,
                            num_examples=num_examples,
                            role=role,
                            previous_session=previous,
                            replace_stale=replace_stale,
                        ).SerializeToString(),
                        timeout=15,
                    )
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.UNIMPLEMENTED and credentials.token:
                        raise ClientRefusedError(
                            "token refused: unknown or revoked (or the server runs another "
                            "fedloom version); ask the operator for a valid token"
                        ) from None
                    raise
                reply = pb.RegisterReply.FromString(raw_reply)
                if not reply.accepted:
                    raise ClientRefusedError(reply.reason)
                if unreachable_since is not None and (joined or paused):
                    log.warning("server %s is back; registered again", address)
                unreachable_since = None
                paused = False
                joined = True
                backoff.reset()
                stub.session = previous = reply.session_id
                # Heartbeats start now: building the app (data, model, checks) can take
                # longer than the server's heartbeat timeout, and it may assign a task at once.
                ended = _start_heartbeats(stub, reply)
                try:
                    key = f"{reply.run_id}:{reply.client_id}:{reply.config_json}"
                    if app is None or app_key != key:
                        if state_file is not None:
                            state_file.close()  # the new app may take the same file
                        app = None
                        try:
                            app = make_app(
                                config_from_json(reply.config_json), int(reply.client_id)
                            )
                            size = getattr(app, "num_parameters", reply.vector_size)
                            if size != reply.vector_size:
                                raise ClientRefusedError(
                                    f"this client's data give a model with {size} parameters "
                                    f"but the server's has {reply.vector_size}; the local file "
                                    "must have the experiment's features and classes"
                                )
                            state_file = _resume_state(
                                app,
                                state_dir,
                                site or site_name(partition),
                                reply.config_json,
                                run_id=reply.run_id,
                            )
                        except Exception as exc:
                            _deregister(stub, exc)
                            raise
                        app_key = key
                    if role:
                        log.info("registered as the %s", role)
                    else:
                        log.info("registered as client %d", reply.client_id)
                    try:
                        outcome = _serve_session(
                            stub, reply, app, chunk_bytes, stop, tally, ended, state_file
                        )
                    except ClientStateError as exc:
                        _deregister(stub, exc)
                        raise
                    if outcome == _OVER:
                        return tally[0]
                    if outcome == _PAUSED:
                        # ``previous`` stays: until the old server is gone, registering
                        # there again must replace this process's own session.
                        paused = True
                        log.warning(
                            "the server stopped to be resumed; waiting for it to come back "
                            "(stop this client with Ctrl-C)"
                        )
                        stop.wait(backoff.next_delay())
                finally:
                    ended.set()
            except _BadTaskError as err:
                log.warning("malformed task from the server (%s); registering again", err)
                stop.wait(backoff.next_delay())
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise ClientRefusedError(str(err.details())) from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    # gRPC names no TLS cause and would retry it forever: ask TLS itself.
                    cause = diagnose_tls(
                        address,
                        insecure=credentials.insecure,
                        root_cert=credentials.root_cert,
                        cert=credentials.cert,
                        key=credentials.key,
                    )
                    if cause is not None:
                        raise ClientRefusedError(cause) from None
                now = time.monotonic()
                if unreachable_since is None and (joined or paused):
                    log.warning(
                        "server %s unavailable (%s); waiting for it to come back "
                        "(stop this client with Ctrl-C)",
                        address,
                        code.name,
                    )
                unreachable_since = unreachable_since or now
                # --max-wait bounds the wait for a server this client never reached; once
                # in a run, the client waits for its server (a restart, a --resume).
                if not (joined or paused) and now - unreachable_since > max_wait_s:
                    raise ConnectionError(
                        f"server {address} unreachable for {max_wait_s:.0f} s ({code.name}); "
                        "check the address and that the server is running"
                    ) from None
                delay = backoff.next_delay()
                log.info("server unavailable (%s); retrying in %.2f s", code.name, delay)
                stop.wait(delay)
            finally:
                channel.close()
        return tally[0]
    finally:
        if state_file is not None:
            state_file.close()


def _deregister(stub: _Stub, exc: BaseException) -> None:
    """Tell the server this client cannot go on, and why (best effort: it may be gone)."""
    reason = " ".join(str(exc).split())[:500] or type(exc).__name__
    try:
        stub.deregister(
            pb.DeregisterRequest(session_id=stub.session, reason=reason).SerializeToString(),
            timeout=5,
        )
    except grpc.RpcError as err:
        log.info("could not tell the server this client leaves (%s)", err.code().name)


def _resume_state(
    app: ClientApp, state_dir: Path | None, site: str, config_json: str, *, run_id: str = ""
) -> ClientStateFile | None:
    """The app's state file, with what it holds restored; None if the app keeps no state.

    The file is opened (and locked) now only if it exists; otherwise at the first save
    of a non-empty state, so an algorithm that keeps nothing never touches the disk.
    Raises :class:`ClientStateError` rather than starting fresh from a file it cannot use.
    """
    if not isinstance(app, StatefulApp):
        return None
    state_file = ClientStateFile(state_dir or default_state_dir(), site, config_json, run_id=run_id)
    if not state_file.path.exists():
        return state_file
    saved = state_file.open()
    if saved is None:
        return state_file
    app.restore_client_state(saved)
    log.info("resumed this client's state from %s", state_file.path)
    return state_file


def _save_state(app: ClientApp, state_file: ClientStateFile | None) -> None:
    """Persist the app's state after a fit, before its result is sent (see client_state).

    Raises :class:`ClientStateError` (the client stops; the update is never sent) when
    the file cannot be taken or written.
    """
    if state_file is None or not isinstance(app, StatefulApp):
        return
    state = app.client_state()
    if not state_file.is_open:
        if state.is_empty():
            return
        if state_file.open() is not None:
            state_file.close()
            raise ClientStateError(
                f"client state file '{state_file.path}' appeared while this client ran "
                "(another client of this site?); restart this client to resume from it"
            )
        log.info("keeping this client's state in %s", state_file.path)
    state_file.save(state)


class _BadTaskError(Exception):
    """The server sent a task this client cannot parse."""


_OVER, _PAUSED = "over", "paused"


def _serve_session(
    stub: _Stub,
    reply: pb.RegisterReply,
    app: ClientApp,
    chunk_bytes: int,
    stop: threading.Event,
    tally: list[int],
    ended: threading.Event,
    state_file: ClientStateFile | None = None,
) -> str:
    """Pull and run tasks for one session, counting them in ``tally``.

    Returns ``_OVER`` when the run is over, ``_PAUSED`` when the server stops to be
    resumed, and ``""`` when the server forgets the session (a restart: the heartbeats
    set ``ended``), so the caller registers again. Network faults propagate as
    ``grpc.RpcError``.
    """
    session = reply.session_id
    own_id = int(reply.client_id)
    busy = Backoff(initial_s=0.2, max_s=5.0)
    while not stop.is_set() and not ended.is_set():
        try:
            header, payload, layout = _pull(stub, session, int(reply.vector_size))
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
                return ""  # the server no longer knows this session (a restart): register
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            # The server is at its concurrent-call limit: keep the session, poll later.
            stop.wait(busy.next_delay())
            continue
        busy.reset()
        if header.kind == pb.TASK_IDLE:
            continue
        if header.kind == pb.TASK_STOP:
            log.info("the server ended the run")
            return _OVER
        if header.kind == pb.TASK_PAUSE:
            return _PAUSED
        result: tuple[pb.ResultHeader, Sequence[Buffer]]
        if header.kind == pb.TASK_EXCHANGE:
            limit = exchange_message_limit(int(reply.vector_size))
            result = _run_exchange(app, header, payload, own_id, limit)
        elif header.kind in (pb.TASK_FIT, pb.TASK_EVALUATE):
            result = _run_task(app, header, payload, layout, own_id, state_file)
        else:  # a newer server's task: fail it (the server counts it), keep serving
            result = _unsupported(header)
        _push(stub, session, header, result, chunk_bytes)
        # Drop the task's buffers before the next pull, so that it can receive into the
        # same memory (chunks.RECEIVE_BUFFERS) instead of holding two payloads at once.
        del payload, result
        tally[0] += 1
    return ""


def _start_heartbeats(stub: _Stub, reply: pb.RegisterReply) -> threading.Event:
    """Keep the session alive from a thread; set the returned event to stop (it is also
    set when the server no longer knows the session)."""
    ended = threading.Event()
    threading.Thread(
        target=_heartbeat_loop,
        args=(stub, reply.session_id, reply.heartbeat_interval_s, ended),
        daemon=True,
    ).start()
    return ended


def _heartbeat_loop(stub: _Stub, session: str, interval: float, ended: threading.Event) -> None:
    while not ended.wait(interval):
        try:
            reply = pb.HeartbeatReply.FromString(
                stub.heartbeat(
                    pb.HeartbeatRequest(session_id=session).SerializeToString(), timeout=5
                )
            )
            if not reply.known:
                ended.set()  # the server forgot us (restart): register again
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                ended.set()  # refused at the gate: the session is gone; register again
            continue
        except ValueError:
            # The session's channel was closed under this beat (the session ended between
            # the wait and the call): gRPC raises ValueError, not an RpcError. Nothing to do.
            return


def _pull(
    stub: _Stub, session: str, dimension: int
) -> tuple[pb.TaskHeader, np.ndarray, list[LayoutEntry]]:
    """One task: its header, payload and the payload's vector layout (fit, evaluate).

    The payload is the broadcast vectors or a protocol message. Chunks are written into
    one buffer of the announced size, so a large model is received with a single copy
    and stays writable for training; an announcement beyond the bounds is refused
    before anything is allocated.
    """
    stream: Iterator[bytes] = stub.pull(
        pb.PullRequest(session_id=session).SerializeToString(), timeout=120
    )
    first = next(stream, None)
    if first is None:
        raise _BadTaskError("task stream without a header")
    try:
        msg = pb.TaskMessage.FromString(first)
    except DecodeError as err:
        raise _BadTaskError("unparseable task message") from err
    if msg.WhichOneof("part") != "header":
        raise _BadTaskError("task stream does not start with a header")
    header = msg.header
    layout: list[LayoutEntry] = []
    size = 0
    if header.kind in (pb.TASK_FIT, pb.TASK_EVALUATE):
        try:
            layout = check_infos(header.vectors, max_total=MAX_BROADCAST_MODELS * max(dimension, 1))
        except WireError as err:
            raise _BadTaskError(f"task vectors: {err}") from None
        size = payload_bytes(layout)
    elif header.kind == pb.TASK_EXCHANGE:
        if not 0 < header.payload_size <= exchange_message_limit(dimension):
            raise _BadTaskError(f"exchange payload of {header.payload_size} bytes")
        size = int(header.payload_size)
    try:
        return header, read_chunks(stream, size, pb.TaskMessage), layout
    except ChunkError as err:
        raise _BadTaskError(f"task payload: {err}") from None


def _unsupported(header: pb.TaskHeader) -> tuple[pb.ResultHeader, Sequence[Buffer]]:
    log.warning("task kind %d is unknown to this client; upgrade fedloom", header.kind)
    head = pb.ResultHeader(task_id=header.task_id, round=header.round)
    head.error = f"task kind {header.kind} is not supported by this client; upgrade fedloom"
    return head, ()


def _check_participant(header: pb.TaskHeader, own_id: int) -> None:
    if header.client_id != own_id:
        raise ValueError(f"task for participant {header.client_id}, but this client is {own_id}")


def _run_exchange(
    app: ClientApp, header: pb.TaskHeader, payload: np.ndarray, own_id: int, limit: int
) -> tuple[pb.ResultHeader, Sequence[Buffer]]:
    """Answer one protocol stage through the app; a refusal is reported (a dropout)."""
    head = pb.ResultHeader(task_id=header.task_id, round=header.round)
    try:
        _check_participant(header, own_id)
        if not isinstance(app, ExchangeApp):
            raise ValueError(f"this client answers no protocol ('{header.protocol[:40]}')")
        request = ExchangeRequest(
            protocol=header.protocol,
            round=int(header.round),
            stage=int(header.stage),
            reply_limit=limit,
        )
        reply = app.respond(request, own_id, bytes(payload))
        if not 0 < len(reply) <= limit:
            raise ValueError(f"a reply of {len(reply)} bytes is outside 1..{limit}")
    except Exception as exc:  # reported to the server, which counts this as a dropout
        log.warning("%s stage %d refused: %s", header.protocol[:40], header.stage, exc)
        head.error = f"{type(exc).__name__}: {exc}"
        return head, ()
    head.payload_size = len(reply)
    return head, (reply,)


def _run_task(
    app: ClientApp,
    header: pb.TaskHeader,
    payload: np.ndarray,
    layout: list[LayoutEntry],
    own_id: int,
    state_file: ClientStateFile | None = None,
) -> tuple[pb.ResultHeader, Sequence[Buffer]]:
    """Run one fit or evaluate task; a failure becomes an error header with the traceback.

    After a fit the app's state is saved before anything is returned for sending: if
    the save fails, the client stops (:class:`ClientStateError`) and the update never
    leaves the machine. Private metrics (:data:`~fedloom.client.runtime.PRIVATE_METRICS`)
    never leave it either.
    """
    head = pb.ResultHeader(task_id=header.task_id, round=header.round)
    try:
        _check_participant(header, own_id)
        rnd, version = int(header.round), int(header.model_version)
        config = decode_config(header.config_json)
        broadcast = split_vectors(payload, layout)
        if header.kind == pb.TASK_FIT:
            res = app.fit(
                FitTask(client_id=own_id, round=rnd, model_version=version, config=config),
                broadcast,
            )
            _save_state(app, state_file)
            if "local_epsilon" in res.metrics:
                log.info(
                    "round %d: local DP epsilon spent by this client so far: %.6g (delta %.3g)",
                    header.round,
                    res.metrics["local_epsilon"],
                    res.metrics.get("local_delta", float("nan")),
                )
            head.num_examples = res.num_examples
            head.straggler = res.straggler
            head.metrics_json = json.dumps(_shareable(res.metrics))
            if res.held:
                head.held = True
                return head, ()
            if not res.vectors:
                head.straggler = True
                return head, ()
            order = result_order(res.vectors)
            head.vectors.extend(vector_infos(res.vectors, order=order))
            return head, vector_buffers(res.vectors, order)
        ev = app.evaluate(
            EvalTask(client_id=own_id, round=rnd, model_version=version, config=config),
            broadcast,
        )
        head.num_examples = ev.num_examples
        head.metrics_json = json.dumps(_shareable(ev.metrics))
        return head, ()
    except ClientStateError:
        raise
    except Exception as exc:  # reported to the server, never raised
        log.exception("task %s failed", header.task_id)
        failed = pb.ResultHeader(task_id=header.task_id, round=header.round)
        failed.error = f"{type(exc).__name__}: {exc}"
        failed.metrics_json = json.dumps({"traceback": traceback.format_exc()})
        return failed, ()


def _shareable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in PRIVATE_METRICS}


def _push(
    stub: _Stub,
    session: str,
    header: pb.TaskHeader,
    result: tuple[pb.ResultHeader, Sequence[Buffer]],
    chunk_bytes: int,
) -> None:
    head, payload = result
    head.session_id = session

    def messages() -> Iterator[bytes]:
        yield pb.ResultMessage(header=head).SerializeToString()
        yield from encode_buffers(payload, chunk_bytes)

    reply = pb.PushReply.FromString(stub.push(messages(), timeout=max(60.0, header.deadline_s)))
    if not reply.accepted:
        log.warning("server rejected the result of task %s: %s", header.task_id, reply.reason)


# ----------------------------------------------------------------------------- apps


class ParticipantApp:
    """A process that holds a role: answers one protocol's stages, trains nothing.

    CKKS's key holder is one (``fedloom client --key-holder`` builds it around
    :class:`fedloom.privacy.stages.KeyHolderSide`); run it on a machine the server's
    operator does not control (see the threat model in :mod:`fedloom.privacy.he`).
    """

    def __init__(self, *, protocol: str, participant: Participant) -> None:
        self.protocol = protocol
        self.participant = participant

    def respond(self, request: ExchangeRequest, participant_id: int, payload: bytes) -> bytes:
        if request.protocol != self.protocol:
            raise ValueError(
                f"this participant answers '{self.protocol}', not '{request.protocol[:40]}'"
            )
        return self.participant.respond(request.stage, payload)

    def fit(self, task: FitTask, broadcast: dict[str, np.ndarray]) -> FitResult:
        raise RuntimeError(f"a {self.protocol} participant trains nothing")

    def evaluate(self, task: EvalTask, broadcast: dict[str, np.ndarray]) -> EvalResult:
        raise RuntimeError(f"a {self.protocol} participant evaluates nothing")


class RuntimeApp:
    """One site served by the strategy's client runtime, as the simulation runs it.

    Keeps the site's :class:`~fedloom.client_store.ClientState` (a :class:`StatefulApp`);
    a fit that raises leaves it as it was. Protocol stages go to the runtime, which
    holds this round's upload for them.
    """

    def __init__(self, runtime: ClientRuntime, client_id: int) -> None:
        self.runtime = runtime
        self.client_id = client_id
        self.num_parameters = runtime.learner.binding.spec.size
        self.state = ClientState()

    def fit(self, task: FitTask, broadcast: dict[str, np.ndarray]) -> FitResult:
        work = self.state.copy()
        result = self.runtime.fit(task, broadcast, work)
        self.state = work
        return result

    def evaluate(self, task: EvalTask, broadcast: dict[str, np.ndarray]) -> EvalResult:
        return self.runtime.evaluate(task, broadcast, self.state.copy())

    def respond(self, request: ExchangeRequest, participant_id: int, payload: bytes) -> bytes:
        return self.runtime.respond(request, participant_id, payload)

    def client_state(self) -> ClientState:
        return self.state

    def restore_client_state(self, state: ClientState) -> None:
        self.state = state.copy()


class BuiltinApp(RuntimeApp):
    """A client of a built-in data set: the partition ``client_id`` of the config's data."""

    def __init__(self, cfg: RunConfig, client_id: int) -> None:
        import torch

        from fedloom.data import build_federated_dataset
        from fedloom.strategies import build_client_runtime, build_learner

        torch.set_num_threads(cfg.engine.torch_threads)
        data = build_federated_dataset(cfg.data, cfg.seed)
        if not 0 <= client_id < data.num_clients:
            raise ClientRefusedError(
                f"partition {client_id} does not exist (0..{data.num_clients - 1})"
            )
        runtime = build_client_runtime(
            cfg,
            build_learner(cfg, data),
            lambda cid: data.clients[cid],
            num_clients=data.num_clients,
        )
        super().__init__(runtime, client_id)


class OwnDataApp(RuntimeApp):
    """A client that trains on its own file: the experiment's data format, read locally.

    The server's config names the format (``data.name``: csv, mnist, shakespeare, ...)
    and its options (``label_column`` ...); ``data_path`` replaces ``data.path``. The
    file is split into local train and test parts (``data.test_fraction``); the test
    part serves federated evaluation. Nothing read here leaves the process.
    """

    def __init__(self, cfg: RunConfig, client_id: int, data_path: Path) -> None:
        import torch

        from fedloom.data import build_federated_dataset
        from fedloom.data.base import ClientData
        from fedloom.strategies import build_client_runtime, build_learner

        torch.set_num_threads(cfg.engine.torch_threads)
        if cfg.data.name == "csv" and cfg.data.classes is None:
            raise ClientRefusedError(
                "the experiment does not pin data.classes, so this site's labels could map "
                "to different class ids than other sites'; ask the operator to set it"
            )
        local_cfg = cfg.data.model_copy(update={"path": str(data_path), "num_clients": 1})
        if local_cfg.partition != "natural":
            local_cfg = local_cfg.model_copy(update={"partition": "iid"})
        local = build_federated_dataset(local_cfg, cfg.seed)
        own = ClientData(client_id, str(data_path), local.pooled_train(), local.test)
        runtime = build_client_runtime(
            cfg, build_learner(cfg, local), lambda _cid: own, num_clients=cfg.data.num_clients
        )
        super().__init__(runtime, client_id)
