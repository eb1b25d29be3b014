"""The deployment client: register, pull tasks, train locally, push results, keep alive.

A client process reads only its own data. It learns the experiment (model, local
training settings, seed) from the server at registration, so the same config drives
simulation and deployment. It survives server restarts and network faults by
re-registering with exponential backoff and jitter.

Bring-your-own-model users implement :class:`ClientApp` (two methods) and call
:func:`run_client` with a factory for it; the built-in models use :class:`BuiltinApp`.
An app with state that must outlive the process (local DP's privacy ledger) also
implements :class:`StatefulApp`; the client then keeps that state in a file on this
machine (:mod:`fedloom.engine.grpc.client_state`), saved after every fit.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from fedloom.config import RunConfig, config_from_json
from fedloom.engine.grpc import (
    PROTOCOL_VERSION,
    SERVICE,
    max_message_bytes,
    secagg_message_limit,
)
from fedloom.engine.grpc import fedloom_pb2 as pb
from fedloom.engine.grpc.chunks import ChunkError, encode_chunks, read_chunks
from fedloom.engine.grpc.client_state import ClientStateFile, default_state_dir, site_name
from fedloom.messages import EvalResult, EvalTask, FitResult, FitTask
from fedloom.params import WIRE_DTYPE
from fedloom.privacy.secagg import STAGES, Stage
from fedloom.privacy.secagg.transport import SecAggParticipant

if TYPE_CHECKING:
    from fedloom.client.trainer import LocalTrainer

log = logging.getLogger("fedloom.client")


class ClientApp(Protocol):
    """What a deployment client runs. ``delta`` in a FitResult is ``w_local - w_global``.

    ``fit`` gets the round's global vector (float32, the server's ParamSpec order) and
    returns the update and the number of examples it trained on; ``evaluate`` scores the
    global vector on the client's local test data. Exceptions are reported to the
    server with their traceback and the client keeps serving.
    """

    def fit(self, task: FitTask, global_vector: np.ndarray) -> FitResult: ...

    def evaluate(self, task: EvalTask, global_vector: np.ndarray) -> EvalResult: ...


@runtime_checkable
class StatefulApp(Protocol):
    """A :class:`ClientApp` whose state must survive a restart of the client process.

    Local DP is the case: the ledger of DP-SGD steps is the site's spent privacy budget,
    and forgetting it on a restart would under-count ε. :func:`run_client` restores the
    state when it builds the app and saves it after every fit, before the update is sent.
    """

    def client_state(self) -> dict[str, Any] | None:
        """JSON-able state to keep, or None when this app keeps none (nothing is written)."""
        ...

    def restore_client_state(self, state: dict[str, Any]) -> None:
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
    """The service's methods; without (de)serializers, so requests and replies are bytes."""

    def __init__(self, channel: grpc.Channel) -> None:
        base = f"/{SERVICE}/"
        self.register = channel.unary_unary(base + "Register")
        self.heartbeat = channel.unary_unary(base + "Heartbeat")
        self.pull = channel.unary_stream(base + "PullTask")
        self.push = channel.stream_unary(base + "PushResult")


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
) -> int:
    """Serve tasks until the server says the run is over; return the number of tasks done.

    ``role = "key-holder"`` registers as a CKKS run's key holder (``make_app`` then
    builds a :class:`KeyHolderApp`): it trains nothing and is never sampled. Raises
    :class:`ClientRefusedError` if the server refuses the registration, and
    ``ConnectionError`` when the server stays unreachable for ``max_wait_s``.

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
    closed_streak = 0
    max_msg = max_message_bytes(chunk_bytes)
    try:
        while not stop.is_set():
            channel = credentials.channel(address, max_msg)
            stub = _Stub(channel)
            try:
                reply = pb.RegisterReply.FromString(
                    stub.register(
                        pb.RegisterRequest(
                            protocol_version=PROTOCOL_VERSION,
                            token=credentials.token,
                            partition=partition,
                            name=name,
                            num_examples=num_examples,
                            role=role,
                        ).SerializeToString(),
                        timeout=15,
                    )
                )
                if not reply.accepted:
                    raise ClientRefusedError(reply.reason)
                unreachable_since = None
                backoff.reset()
                key = reply.config_json + str(reply.client_id)
                if app is None or app_key != key:
                    if state_file is not None:
                        state_file.close()  # the new app may take the same file
                    app = make_app(config_from_json(reply.config_json), int(reply.client_id))
                    app_key = key
                    size = getattr(app, "num_parameters", reply.vector_size)
                    if size != reply.vector_size:
                        raise ClientRefusedError(
                            f"this client's data give a model with {size} parameters but the "
                            f"server's has {reply.vector_size}; the local file must have the "
                            "experiment's features and classes"
                        )
                    state_file = _resume_state(
                        app, state_dir, site or site_name(partition), reply.config_json
                    )
                if role == "key-holder":
                    log.info("registered as the key holder")
                else:
                    log.info("registered as client %d", reply.client_id)
                if _serve_session(stub, reply, app, chunk_bytes, stop, tally, state_file):
                    return tally[0]
            except _BadTaskError as err:
                log.warning("malformed task from the server (%s); registering again", err)
                stop.wait(backoff.next_delay())
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise ClientRefusedError(str(err.details())) from None
                if (
                    code == grpc.StatusCode.UNAVAILABLE
                    and "wrong_version_number" in str(err.details()).lower()
                ):
                    raise ClientRefusedError(
                        "the server speaks plaintext, not TLS: pass --insecure for a loopback "
                        "trial, or start the server with --tls-cert and --tls-key"
                    ) from None
                if code == grpc.StatusCode.UNAVAILABLE and _is_tls_failure(err):
                    raise ClientRefusedError(
                        "TLS handshake failed: the server's certificate is not trusted by "
                        "--root-cert (or the server refused this client's certificate)"
                    ) from None
                closed_streak = (
                    closed_streak + 1 if _closed_by_tls_peer(err, credentials, address) else 0
                )
                if closed_streak >= 3:
                    raise ClientRefusedError(
                        "TLS handshake failed: the server closes every TLS connection from this "
                        "client; it probably requires a client certificate (pass --cert and --key)"
                    ) from None
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > max_wait_s:
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


def _resume_state(
    app: ClientApp, state_dir: Path | None, site: str, config_json: str
) -> ClientStateFile | None:
    """Open the app's state file and restore what it holds; None if the app keeps no state.

    Raises :class:`ClientStateError` rather than starting fresh from a file it cannot use.
    """
    if not isinstance(app, StatefulApp) or app.client_state() is None:
        return None
    state_file = ClientStateFile(state_dir or default_state_dir(), site, config_json)
    saved = state_file.open()
    if saved is None:
        log.info("keeping this client's state in %s", state_file.path)
        return state_file
    try:
        app.restore_client_state(saved)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        state_file.close()
        raise state_file.unusable(f"malformed state: {err}") from None
    log.info("resumed this client's state from %s", state_file.path)
    return state_file


def _save_state(app: ClientApp, state_file: ClientStateFile | None) -> None:
    """Persist the app's state after a fit, before its result is sent (see client_state)."""
    if state_file is None or not isinstance(app, StatefulApp):
        return
    state = app.client_state()
    if state is not None:
        state_file.save(state)


def _is_tls_failure(err: grpc.RpcError) -> bool:
    text = str(err.details()).lower()
    return "ssl" in text or "handshake" in text or "certificate" in text


def _closed_by_tls_peer(err: grpc.RpcError, credentials: Credentials, address: str) -> bool:
    """A server that accepts TCP but closes the TLS socket: mutual TLS without our cert."""
    if credentials.insecure or credentials.cert is not None:
        return False
    if "socket closed" not in str(err.details()).lower():
        return False
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


class _BadTaskError(Exception):
    """The server sent a task this client cannot parse."""


def _serve_session(
    stub: _Stub,
    reply: pb.RegisterReply,
    app: ClientApp,
    chunk_bytes: int,
    stop: threading.Event,
    tally: list[int],
    state_file: ClientStateFile | None = None,
) -> bool:
    """Pull and run tasks for one session, counting them in ``tally``; True: the run is over.

    Returns early, run not over, when the server forgets the session (a restart), so
    the caller registers again. Network faults propagate as ``grpc.RpcError``.
    """
    session = reply.session_id
    alive = threading.Event()
    beat = threading.Thread(
        target=_heartbeat_loop,
        args=(stub, session, reply.heartbeat_interval_s, alive),
        daemon=True,
    )
    beat.start()
    held: dict[int, SecAggParticipant] = {}  # round -> update kept for secure aggregation
    busy = Backoff(initial_s=0.2, max_s=5.0)
    try:
        while not stop.is_set() and not alive.is_set():
            try:
                header, payload = _pull(stub, session, int(reply.vector_size))
            except grpc.RpcError as err:
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
                return True
            result: tuple[pb.ResultHeader, bytes | memoryview]
            if header.kind == pb.TASK_SECAGG:
                result = _run_secagg_stage(held, header, payload)
            elif header.kind == pb.TASK_HE:
                result = _run_he_stage(app, held, header, payload)
            elif header.kind in (pb.TASK_FIT, pb.TASK_EVALUATE):
                vector = np.frombuffer(payload, dtype=WIRE_DTYPE)
                result = _run_task(app, header, vector, held, state_file)
            else:  # a newer server's task: fail it (the server counts it), keep serving
                result = _unsupported(header)
            _push(stub, session, header, result, chunk_bytes)
            tally[0] += 1
        return False
    finally:
        alive.set()


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
        except grpc.RpcError:
            continue


def _pull(stub: _Stub, session: str, size: int) -> tuple[pb.TaskHeader, bytearray]:
    """One task: its header and payload (the global vector, or a secure-aggregation message).

    Chunks are written into one buffer of the announced size, so a large model is
    received with a single copy and stays writable for the trainer.
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
    if header.kind in (pb.TASK_FIT, pb.TASK_EVALUATE) and header.vector_size != size:
        raise _BadTaskError(f"task vector size {header.vector_size}, expected {size}")
    try:
        return header, read_chunks(stream, _expected_payload(header, size), pb.TaskMessage)
    except ChunkError as err:
        raise _BadTaskError(f"task payload: {err}") from None


def _expected_payload(header: pb.TaskHeader, size: int) -> int:
    if header.kind in (pb.TASK_FIT, pb.TASK_EVALUATE):
        return size * WIRE_DTYPE.itemsize
    if header.kind == pb.TASK_SECAGG:
        if not 0 < header.payload_size <= secagg_message_limit(size):
            raise _BadTaskError(f"secure-aggregation payload of {header.payload_size} bytes")
        return int(header.payload_size)
    if header.kind == pb.TASK_HE:
        # A public context (up to 32 MiB) or an aggregate (up to ~450 bytes per value
        # with the largest CKKS parameters).
        if not 0 < header.payload_size <= (1 << 26) + 512 * size:
            raise _BadTaskError(f"CKKS payload of {header.payload_size} bytes")
        return int(header.payload_size)
    return 0


def _run_secagg_stage(
    held: dict[int, SecAggParticipant], header: pb.TaskHeader, payload: bytearray
) -> tuple[pb.ResultHeader, bytes]:
    """Answer one secure-aggregation stage with the update held since this round's fit."""
    head = pb.ResultHeader(task_id=header.task_id, round=header.round)
    participant = held.get(header.round)
    try:
        if participant is None:
            raise ValueError(f"no update held for round {header.round}")
        stage = STAGES[header.secagg_stage]
        reply = participant.respond(stage, bytes(payload))
    except Exception as exc:  # reported to the server, which counts this client as dropped
        head.error = f"{type(exc).__name__}: {exc}"
        return head, b""
    if stage is Stage.UNMASKING:
        held.pop(header.round, None)
    head.payload_size = len(reply)
    return head, reply


def _unsupported(header: pb.TaskHeader) -> tuple[pb.ResultHeader, bytes]:
    log.warning("task kind %d is unknown to this client; upgrade fedloom", header.kind)
    head = pb.ResultHeader(task_id=header.task_id, round=header.round)
    head.error = f"task kind {header.kind} is not supported by this client; upgrade fedloom"
    return head, b""


def _run_he_stage(
    app: ClientApp,
    held: dict[int, SecAggParticipant],
    header: pb.TaskHeader,
    payload: bytearray,
) -> tuple[pb.ResultHeader, bytes]:
    """Answer one CKKS stage: as the key holder, or by encrypting this round's held update."""
    from fedloom.privacy.he_protocol import HE_STAGES, encrypt_for_round

    head = pb.ResultHeader(task_id=header.task_id, round=header.round)
    try:
        stage = HE_STAGES[header.he_stage]
        if isinstance(app, KeyHolderApp):
            reply = app.participant.respond(stage, bytes(payload))
        else:
            participant = held.pop(header.round, None)
            if participant is None:
                raise ValueError(f"no update held for round {header.round}")
            reply = encrypt_for_round(participant.update, bytes(payload))
    except Exception as exc:  # reported to the server: a dropout (or an aborted round)
        log.warning("CKKS stage refused: %s", exc)
        head.error = f"{type(exc).__name__}: {exc}"
        return head, b""
    head.payload_size = len(reply)
    return head, reply


def _run_task(
    app: ClientApp,
    header: pb.TaskHeader,
    vector: np.ndarray,
    held: dict[int, SecAggParticipant],
    state_file: ClientStateFile | None = None,
) -> tuple[pb.ResultHeader, bytes | memoryview]:
    """Run one task; a failure becomes an error header carrying the traceback.

    After a fit the app's state is saved before anything is returned for sending: if
    the save fails, the task fails and the update never leaves the machine.
    """
    head = pb.ResultHeader(task_id=header.task_id, round=header.round)
    try:
        if header.kind == pb.TASK_FIT:
            clip = header.clip_norm if header.HasField("clip_norm") else None
            task = FitTask(
                int(header.client_id),
                int(header.round),
                header.drop_stragglers,
                clip,
                header.secure,
            )
            res = app.fit(task, vector)
            _save_state(app, state_file)
            if "local_epsilon" in res.metrics:
                log.info(
                    "round %d: local DP epsilon spent by this client so far: %.6g (delta %.3g)",
                    task.round,
                    res.metrics["local_epsilon"],
                    res.metrics.get("local_delta", float("nan")),
                )
            head.num_examples = res.num_examples
            head.straggler = res.straggler
            head.metrics_json = json.dumps(_shareable(res.metrics))
            if res.delta is None:
                head.straggler = True
                return head, b""
            if header.secure:
                for old_round in [r for r in held if r < header.round]:
                    del held[old_round]
                held[header.round] = SecAggParticipant(int(header.client_id), res.delta)
                head.held = True
                return head, b""
            head.has_vector = True
            head.vector_size = int(res.delta.size)
            return head, np.ascontiguousarray(res.delta, dtype=WIRE_DTYPE).data
        ev = app.evaluate(EvalTask(int(header.client_id), int(header.round)), vector)
        head.num_examples = ev.num_examples
        head.metrics_json = json.dumps({"loss": ev.loss, "accuracy": ev.accuracy})
        return head, b""
    except Exception as exc:  # reported to the server, never raised
        log.exception("task %s failed", header.task_id)
        failed = pb.ResultHeader(task_id=header.task_id, round=header.round)
        failed.error = f"{type(exc).__name__}: {exc}"
        failed.metrics_json = json.dumps({"traceback": traceback.format_exc()})
        return failed, b""


#: Metrics a client keeps to itself: the pre-clip update norm is outside what central
#: DP accounts for, so it never leaves the machine.
PRIVATE_METRICS = frozenset({"update_norm"})


def _shareable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in PRIVATE_METRICS}


def _push(
    stub: _Stub,
    session: str,
    header: pb.TaskHeader,
    result: tuple[pb.ResultHeader, bytes | memoryview],
    chunk_bytes: int,
) -> None:
    head, payload = result
    head.session_id = session

    def messages() -> Iterator[bytes]:
        yield pb.ResultMessage(header=head).SerializeToString()
        yield from encode_chunks(payload, chunk_bytes)

    reply = pb.PushReply.FromString(stub.push(messages(), timeout=max(60.0, header.deadline_s)))
    if not reply.accepted:
        log.warning("server rejected the result of task %s: %s", header.task_id, reply.reason)


class KeyHolderApp:
    """A CKKS run's key holder: makes a key pair per round and decrypts only the sum.

    Run it on a machine the server's operator does not control (see the threat model in
    :mod:`fedloom.privacy.he`). ``min_contributors`` is this operator's policy: sums of
    fewer client contributions are not decrypted. It trains and evaluates nothing.
    """

    def __init__(self, cfg: RunConfig, client_id: int, min_contributors: int = 2) -> None:
        from fedloom.privacy.he_protocol import HEKeyHolderParticipant

        self.participant = HEKeyHolderParticipant(min_contributors=min_contributors)

    def fit(self, task: FitTask, global_vector: np.ndarray) -> FitResult:
        raise RuntimeError("the key holder trains nothing")

    def evaluate(self, task: EvalTask, global_vector: np.ndarray) -> EvalResult:
        raise RuntimeError("the key holder evaluates nothing")


class _TrainerApp:
    """A site served by a :class:`~fedloom.client.trainer.LocalTrainer`: the built-in apps.

    A :class:`StatefulApp` when local DP is on. Its state is the trainer's for this
    client, re-keyed from ``{part: {id: …}}`` to ``{part: …}``: the server may give a
    restarted own-data client another id, and the ledger is about the site, not the id.
    """

    trainer: LocalTrainer
    client_id: int

    def fit(self, task: FitTask, global_vector: np.ndarray) -> FitResult:
        return self.trainer.fit(task, global_vector)

    def evaluate(self, task: EvalTask, global_vector: np.ndarray) -> EvalResult:
        return self.trainer.evaluate_client(task, global_vector)

    def client_state(self) -> dict[str, Any] | None:
        if self.trainer.local_dp is None:
            return None  # only local DP keeps state across rounds today
        own = str(self.client_id)
        by_part = self.trainer.client_state(self.client_id)
        return {part: ids[own] for part, ids in by_part.items() if own in ids}

    def restore_client_state(self, state: dict[str, Any]) -> None:
        own = str(self.client_id)
        self.trainer.restore_client_state({part: {own: value} for part, value in state.items()})


class BuiltinApp(_TrainerApp):
    """A client of a built-in data set: the partition ``client_id`` of the config's data."""

    def __init__(self, cfg: RunConfig, client_id: int) -> None:
        import torch

        from fedloom.client.trainer import LocalTrainer
        from fedloom.data import build_federated_dataset

        torch.set_num_threads(cfg.engine.torch_threads)
        data = build_federated_dataset(cfg.data, cfg.seed)
        if not 0 <= client_id < data.num_clients:
            raise ClientRefusedError(
                f"partition {client_id} does not exist (0..{data.num_clients - 1})"
            )
        self.trainer = LocalTrainer(cfg, data)
        self.client_id = client_id


class OwnDataApp(_TrainerApp):
    """A client that trains on its own file: the experiment's data format, read locally.

    The server's config names the format (``data.name``: csv, mnist, shakespeare, ...)
    and its options (``label_column`` ...); ``data_path`` replaces ``data.path``. The
    file is split into local train and test parts (``data.test_fraction``); the test
    part serves federated evaluation. Nothing read here leaves the process.
    """

    def __init__(self, cfg: RunConfig, client_id: int, data_path: Path) -> None:
        import torch

        from fedloom.client.trainer import LocalTrainer
        from fedloom.data import build_federated_dataset
        from fedloom.data.base import ClientData

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
        trainer = LocalTrainer(cfg, local)
        trainer.own_data = ClientData(client_id, str(data_path), local.pooled_train(), local.test)
        self.trainer = trainer
        self.client_id = client_id
        self.num_parameters = trainer.num_parameters
