"""Over a thousand hostile messages at a running server: each rejected and counted."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedloom.config import ConfigError, load_config
from fedloom.data import build_federated_dataset
from fedloom.engine.grpc import PROTOCOL_VERSION
from fedloom.engine.grpc import fedloom_pb2 as pb
from fedloom.engine.grpc.auth import TokenStore, add_token
from fedloom.engine.grpc.client import (
    BuiltinApp,
    Credentials,
    _Stub,
    run_client,
)
from fedloom.engine.grpc.server import (
    DeployOptions,
    FederationServicer,
    GrpcExecutor,
    Registry,
    start_grpc_server,
)
from fedloom.engine.grpc.wire import WireError, check_infos, decode_config
from fedloom.exchange import ExchangeRequest, Role
from fedloom.messages import GLOBAL, EvalTask, FitResult, FitTask
from fedloom.strategies import build_learner, build_strategy

from .deploy_helpers import Proc, fedloom, num_parameters, serving


def _register(port: int, token: str = "", **fields: object) -> pb.RegisterReply:
    """Register with the server on the loopback ``port``, over a channel of its own."""
    request = pb.RegisterRequest(**fields).SerializeToString()  # type: ignore[arg-type]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb.RegisterReply.FromString(_Stub(channel, token).register(request))


def _header(**kw: object) -> bytes:
    return pb.ResultMessage(header=pb.ResultHeader(**kw)).SerializeToString()  # type: ignore[arg-type]


def _chunk(data: bytes) -> bytes:
    return pb.ResultMessage(chunk=data).SerializeToString()


def _fit(client_id: int, rnd: int, **config: object) -> FitTask:
    return FitTask(client_id=client_id, round=rnd, model_version=rnd - 1, config=config)  # type: ignore[arg-type]


def _infos(**sizes: int) -> list[pb.VectorInfo]:
    return [pb.VectorInfo(name=n, size=s) for n, s in sizes.items()]


def _pull_header(stub: _Stub, sid: str) -> tuple[pb.TaskHeader, list[bytes]]:
    """The next task for session ``sid`` (long polls that come back idle are repeated)."""
    while True:
        msgs = list(stub.pull(pb.PullRequest(session_id=sid).SerializeToString()))
        header = pb.TaskMessage.FromString(msgs[0]).header
        if header.kind != pb.TASK_IDLE:
            return header, msgs


class _Ledger:
    """Sends hostile messages one at a time; each must be refused under its own reason.

    Checks every message: the server's rejection counter grows by exactly one, under
    the reason the message was built to trigger (not merely "each reason occurred").
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.sent = 0
        self.by_reason: Counter[str] = Counter()

    def expect(self, reason: str, send: Callable[[], object]) -> None:
        before = Counter(self.registry.rejections)
        try:
            answer = send()
        except grpc.RpcError:
            answer = None
        assert getattr(answer, "accepted", False) is False
        assert getattr(answer, "known", False) is False
        delta = Counter(self.registry.rejections)
        delta.subtract(before)
        assert +delta == Counter({reason: 1}), (reason, +delta, answer)
        self.sent += 1
        self.by_reason[reason] += 1


def _release_on(event: threading.Event) -> Iterator[bytes]:
    """A request stream that sends nothing until ``event`` is set."""
    event.wait()
    yield from ()


def test_two_thousand_hostile_messages_then_normal_rounds(tmp_path: Path) -> None:
    """Anonymous, forged and authenticated-but-malicious messages: each refused or bounded
    and counted under its own reason, the server stays up, honest clients train."""
    # Central DP: the client's clip codec computes the pre-clip norm, which must stay there.
    dp = ["strategy=dp-fedavg", "privacy.noise_multiplier=1.0"]
    cfg = load_config(None, ["data.num_clients=3", "client.epochs=1", *dp])
    size = num_parameters(cfg)
    path = tmp_path / "tokens.txt"
    tokens = {n: add_token(path, n) for n in ("hospital-a", "hospital-b", "mallory")}
    # The sessions driven by hand send no heartbeats and no stream may be cut short by a
    # busy machine: long timeouts, except while idle streams are tested (below).
    # A session counts as stale (--replace-stale may take it over) after three silent
    # heartbeat intervals: mallory's must not look stale however slow the machine is.
    options = DeployOptions(
        round_timeout_s=3600,  # the first task stays open through every hostile message
        heartbeat_timeout_s=3600,
        heartbeat_interval_s=600,
        poll_timeout_s=1,
        chunk_bytes=4096,
        max_streams_per_client=4,
        idle_stream_timeout_s=3600,
    )
    registry = Registry(3, size, cfg.model_dump_json(), options=options)
    servicer = FederationServicer(registry, options, TokenStore(path))
    server, port = start_grpc_server(servicer, "127.0.0.1:0", None, max_workers=16)
    executor = GrpcExecutor(registry, options)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
    a, m, anon, forged = (
        _Stub(channels[0], tokens["hospital-a"]),
        _Stub(channels[1], tokens["mallory"]),
        _Stub(channels[2]),
        _Stub(channels[3], "fl_not-a-token"),
    )
    rng = np.random.default_rng(0)
    release = threading.Event()
    try:
        v = PROTOCOL_VERSION
        reply = _register(port, tokens["hospital-a"], protocol_version=v, partition=0)
        assert reply.accepted and reply.client_id == 0
        a.session = sid = reply.session_id
        mreply = _register(port, tokens["mallory"], protocol_version=v, partition=-1)
        assert mreply.accepted and mreply.client_id == 1  # the lowest id no identity holds
        m.session = msid = mreply.session_id
        w0 = np.zeros(size, np.float32)
        outcome: list[object] = []
        fit = threading.Thread(
            target=lambda: outcome.extend(executor.fit([_fit(0, 1, lr_scale=0.5)], {GLOBAL: w0}))
        )
        fit.start()
        header, msgs = _pull_header(a, sid)
        assert header.kind == pb.TASK_FIT and len(msgs) > 2  # chunked: 4 KiB chunks
        assert [(v.name, v.size) for v in header.vectors] == [(GLOBAL, size)]
        assert json.loads(header.config_json) == {"lr_scale": 0.5} and header.model_version == 0
        task_id = header.task_id
        good = {
            "session_id": sid,
            "task_id": task_id,
            "round": 1,
            "num_examples": 10,
            "vectors": _infos(delta=size),
            "metrics_json": "{}",
        }
        delta = rng.normal(size=size).astype("<f4")
        payload = delta.tobytes()

        def random_bytes() -> bytes:  # never parses: 0xff is a tag with wire type 7
            return b"\xff" + rng.bytes(int(rng.integers(0, 200)))

        def register(stub: _Stub, body: bytes) -> pb.RegisterReply:
            return pb.RegisterReply.FromString(stub.register(body))

        def hb(stub: _Stub, body: bytes) -> pb.HeartbeatReply:
            return pb.HeartbeatReply.FromString(stub.heartbeat(body))

        def pull(stub: _Stub, body: bytes) -> None:
            list(stub.pull(body))

        def push(stub: _Stub, messages: list[bytes]) -> pb.PushReply:
            return pb.PushReply.FromString(stub.push(iter(messages)))

        def reg_body(**kw: object) -> bytes:
            fields = {"protocol_version": v, **kw}
            return pb.RegisterRequest(**fields).SerializeToString()  # type: ignore[arg-type]

        ledger = _Ledger(registry)
        e = ledger.expect
        # Registrations: garbage, no or a forged token, identity theft.
        for _ in range(100):
            e("malformed", lambda: register(a, random_bytes()))
            e("bad_token", lambda: register(anon, reg_body(partition=2)))
            e("bad_token", lambda: register(forged, reg_body(partition=2)))
            e("protocol_version", lambda: register(m, reg_body(protocol_version=v + 1)))
            # a second process of a live identity (hospital-a), and mallory asking for
            # hospital-a's client id, or a role this run does not have
            e("identity_in_use", lambda: register(a, reg_body(partition=0)))
            e("identity_in_use", lambda: register(m, reg_body(partition=0)))
            e("identity_in_use", lambda: register(m, reg_body(partition=-1, replace_stale=True)))
            e("bad_role", lambda: register(m, reg_body(role="key-holder")))
        # Heartbeats and polls: garbage, no credentials, another identity's session.
        sid_body = pb.HeartbeatRequest(session_id=sid).SerializeToString()
        pull_a = pb.PullRequest(session_id=sid).SerializeToString()
        stolen = _Stub(channels[1], tokens["mallory"])
        stolen.session = sid  # mallory's token with hospital-a's session id
        for _ in range(100):
            e("malformed", lambda: hb(a, random_bytes()))
            e("unauthenticated", lambda: hb(anon, sid_body))
            e("wrong_session", lambda: hb(stolen, sid_body))
            e("wrong_session", lambda: hb(m, sid_body))  # own session, a's in the body
            e("malformed", lambda: pull(a, random_bytes()))
            e("unauthenticated", lambda: pull(anon, pull_a))
            e("wrong_session", lambda: pull(m, pull_a))
        # Results: malformed streams from hospital-a's own session ...
        hostile: list[tuple[str, list[bytes]]] = []
        hostile += [("malformed", [random_bytes()]) for _ in range(60)]
        hostile += [("malformed", [_chunk(payload[:64]), _header(**good)]) for _ in range(40)]
        hostile += [
            (
                "wrong_shape",
                [_header(**{**good, "vectors": _infos(delta=size + 1)}), _chunk(payload)],
            )
            for _ in range(40)
        ]
        hostile += [
            (
                "unknown_vector",
                [_header(**{**good, "vectors": _infos(control=size)}), _chunk(payload)],
            )
            for _ in range(30)
        ]
        hostile += [
            (
                "malformed",
                [_header(**{**good, "vectors": _infos(delta=size) * 2}), _chunk(payload * 2)],
            )
            for _ in range(20)
        ]
        hostile += [
            ("unexpected_held", [_header(**{**good, "vectors": [], "held": True})])
            for _ in range(30)
        ]
        hostile += [
            ("truncated", [_header(**good), _chunk(payload[: len(payload) // 2])])
            for _ in range(40)
        ]
        hostile += [
            ("oversized", [_header(**good), _chunk(payload), _chunk(b"\0" * 8)]) for _ in range(40)
        ]
        hostile += [
            ("stale_round", [_header(**{**good, "round": 0}), _chunk(payload)]) for _ in range(40)
        ]
        hostile += [
            ("task_not_open", [_header(**{**good, "task_id": "f" * 32}), _chunk(payload)])
            for _ in range(40)
        ]
        hostile += [
            ("unknown_session", [_header(**{**good, "session_id": "0" * 32}), _chunk(payload)])
            for _ in range(40)
        ]
        hostile += [
            ("malformed", [_header(**{**good, "metrics_json": "{not json"}), _chunk(payload)])
            for _ in range(40)
        ]
        hostile += [("malformed", [_header(**good), _header(**good)]) for _ in range(40)]
        hostile += [("missing_vector", [_header(**{**good, "vectors": []})]) for _ in range(40)]
        hostile += [
            ("bad_value", [_header(**{**good, "num_examples": -5}), _chunk(payload)])
            for _ in range(40)
        ]
        for reason, messages in hostile:
            e(reason, lambda messages=messages: push(a, messages))
        # ... and from mallory, authenticated: hospital-a's task under its own session,
        # hospital-a's session in the header, and no credentials at all.
        for _ in range(100):
            theft = {**good, "session_id": msid}
            e("wrong_session", lambda theft=theft: push(m, [_header(**theft), _chunk(payload)]))
            e("wrong_session", lambda: push(m, [_header(**good), _chunk(payload)]))
            e("unauthenticated", lambda: push(anon, [_header(**good), _chunk(payload)]))
        # A stream flood: 300 result streams that never send a byte, without credentials,
        # are refused before a worker reads them ...
        flood = [anon._push.future(_release_on(release)) for _ in range(300)]
        for call in flood:
            with pytest.raises(grpc.RpcError) as err:
                call.result(timeout=300)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        ledger.sent += len(flood)
        ledger.by_reason["unauthenticated"] += len(flood)
        assert registry.rejections["unauthenticated"] == ledger.by_reason["unauthenticated"]
        # ... and an authenticated one is capped per identity, idle streams cancelled.
        idle = [m._push.future(_release_on(release), metadata=m.metadata()) for _ in range(4)]
        mallory = registry.live(msid)
        assert mallory is not None
        deadline = time.monotonic() + 600
        while mallory.streams < 4:  # until the server holds all four open
            assert time.monotonic() < deadline, mallory.streams
            time.sleep(0.01)
        for _ in range(20):
            e("too_many_streams", lambda: m.push(iter([_header(**good), _chunk(payload)])))
        servicer.idle_stream_s = 1.0  # nothing else streams meanwhile
        for call in idle:  # each cancelled once silent for idle_stream_timeout_s
            with pytest.raises(grpc.RpcError):
                call.result(timeout=300)
        ledger.sent += len(idle)
        ledger.by_reason["idle_stream"] += len(idle)
        registry_idle = registry.rejections["idle_stream"]
        assert registry_idle == len(idle), registry_idle
        servicer.idle_stream_s = 3600.0
        # The honest result still gets through; replays of it are refused.
        assert push(a, [_header(**good), _chunk(payload[:5000]), _chunk(payload[5000:])]).accepted
        fit.join(30)  # the round collected the task: a replay finds it closed
        for _ in range(50):  # replays of the accepted result
            e("task_not_open", lambda: push(a, [_header(**good), _chunk(payload)]))
        assert len(outcome) == 1 and isinstance(outcome[0], FitResult)
        np.testing.assert_array_equal(outcome[0].delta, delta)
        assert outcome[0].model_version == 0 and set(outcome[0].vectors) == {"delta"}
        assert ledger.sent >= 2000, ledger.sent
        assert registry.rejections == ledger.by_reason
        assert json.dumps(executor.round_metrics())  # reported with the round

        # A diverged update (NaN, Inf) is answered at once and refused by the strategy, as
        # in simulation: a recorded failure of that client, not a stall until the deadline.
        plain = load_config(None, ["data.num_clients=3"])
        spec = build_learner(plain, build_federated_dataset(plain.data, plain.seed)).binding.spec
        strategy = build_strategy(plain, num_clients=3, spec=spec, roles_in_process=False)
        for rnd, bad in ((3, np.nan), (4, np.inf)):
            later: list[object] = []
            waiting = threading.Thread(
                target=lambda rnd=rnd, later=later: later.extend(
                    executor.fit([_fit(1, rnd)], {GLOBAL: w0})
                )
            )
            waiting.start()
            head, _ = _pull_header(m, msid)
            poisoned = delta.copy()
            poisoned[7] = bad
            answer = {**good, "session_id": msid, "task_id": head.task_id, "round": rnd}
            assert push(m, [_header(**answer), _chunk(poisoned.tobytes())]).accepted
            waiting.join(30)
            (result,) = later
            assert isinstance(result, FitResult) and not np.all(np.isfinite(result.delta))
            outcome_ = strategy.process_fit(rnd, [result], w0, executor.exchange)
            assert not outcome_.updates and "NaN or Inf" in outcome_.failures[0].error

        # A huge finite update (3e38 everywhere) claiming 10^15 examples is well formed,
        # so the wire takes it; the deployment's guard rails then reject it beside two
        # honest updates, and the round's aggregate stays theirs (finite, small).
        guarded = build_strategy(
            plain, num_clients=3, spec=spec, roles_in_process=False, deployment=True
        )
        later = []
        waiting = threading.Thread(
            target=lambda: later.extend(executor.fit([_fit(1, 5)], {GLOBAL: w0}))
        )
        waiting.start()
        head, _ = _pull_header(m, msid)
        huge = np.full(size, 3e38, dtype="<f4")
        answer = {
            **good,
            "session_id": msid,
            "task_id": head.task_id,
            "round": 5,
            "num_examples": 10**15,
        }
        assert push(m, [_header(**answer), _chunk(huge.tobytes())]).accepted
        waiting.join(30)
        (hostile_result,) = later
        assert isinstance(hostile_result, FitResult) and hostile_result.num_examples == 10**15
        honest = [
            FitResult(client_id=c, round=5, model_version=4, num_examples=10, vectors={"delta": d})
            for c, d in ((0, delta), (2, -0.5 * delta))
        ]
        screened = guarded.process_fit(5, [hostile_result, *honest], w0, executor.exchange)
        assert [u.client_id for u in screened.updates] == [0, 2]
        assert [f.client_id for f in screened.failures] == [1]
        assert "guard rails" in screened.failures[0].error

        # A normal client still completes a round afterwards.
        stop = threading.Event()
        done: list[int] = []
        client = threading.Thread(
            target=lambda: done.append(
                run_client(
                    f"127.0.0.1:{port}",
                    BuiltinApp,
                    Credentials(token=tokens["hospital-b"], insecure=True),
                    chunk_bytes=4096,
                    stop=stop,
                )
            )
        )
        client.start()
        executor.wait_for_clients(3)
        assert registry.book.id_of("hospital-b") == 2
        results = executor.fit([_fit(2, 2)], {GLOBAL: w0})
        assert isinstance(results[0], FitResult) and results[0].delta is not None
        assert np.all(np.isfinite(results[0].delta))
        assert "below_clip" in results[0].metrics  # the clip codec ran on the client ...
        assert "update_norm" not in results[0].metrics  # ... and its private metric stayed
        executor.close()
        client.join(30)
        assert done == [1]
    finally:
        release.set()
        executor.close()
        for channel in channels:
            channel.close()
        server.stop(0).wait(5)


class _EchoApp:
    """Answers every protocol stage with its payload repeated ``stage`` times."""

    def fit(self, task: FitTask, broadcast: dict[str, np.ndarray]) -> FitResult:
        raise RuntimeError("not used")

    def evaluate(self, task: EvalTask, broadcast: dict[str, np.ndarray]) -> object:
        raise RuntimeError("not used")

    def respond(self, request: ExchangeRequest, participant_id: int, payload: bytes) -> bytes:
        return f"{request.protocol}/{participant_id}:".encode() + payload * request.stage


def test_exchange_is_generic_and_bounds_replies(tmp_path: Path) -> None:
    """An exchange is a task per participant; a reply over the limit is a counted dropout."""
    cfg = load_config(None, ["data.num_clients=3"])
    registry = Registry(3, 4, cfg.model_dump_json())
    options = DeployOptions(round_timeout_s=60, poll_timeout_s=1)
    executor = GrpcExecutor(registry, options)
    stops = [threading.Event() for _ in range(2)]
    with serving(registry, options) as port:
        threads = [
            threading.Thread(
                target=run_client,
                args=(f"127.0.0.1:{port}", lambda cfg, cid: _EchoApp(), Credentials(insecure=True)),
                kwargs={"partition": i, "stop": stops[i]},
            )
            for i in range(2)
        ]
        for t in threads:
            t.start()
        try:
            executor.wait_for_clients(2)
            request = ExchangeRequest(protocol="echo", round=3, stage=2, reply_limit=64)
            replies = executor.exchange(request, {0: b"ab", 1: b"cd", 2: b"ef"})
            assert replies == {0: b"echo/0:abab", 1: b"echo/1:cdcd"}  # 2 is not connected
            # A reply over the limit is refused, counted, and that participant's dropout
            # at once (not at the 60 s deadline: the call returns without waiting for it).
            small = ExchangeRequest(protocol="echo", round=3, stage=2, reply_limit=8)
            started = time.monotonic()
            assert executor.exchange(small, {0: b"ab", 1: b"long-payload"}) == {}
            assert registry.rejections["oversized"] == 2
            assert time.monotonic() - started < options.round_timeout_s
        finally:
            executor.close()
            for stop, t in zip(stops, threads, strict=True):
                stop.set()
                t.join(30)


def test_client_side_checks_of_what_the_server_sends() -> None:
    """A task's config and broadcast layout are refused unless well-formed and bounded."""
    assert decode_config('{"clip_norm": 1.5, "hold": "secagg", "drop": true, "n": 3}') == {
        "clip_norm": 1.5,
        "hold": "secagg",
        "drop": True,
        "n": 3,
    }
    for bad, reason in [
        ("[1]", "malformed"),
        ('{"a": [1]}', "malformed"),
        ('{"a": {"b": 1}}', "malformed"),
        ('{"a": null}', "malformed"),
        ('{"a": NaN}', "malformed"),
        ('{"a": 1e999}', "bad_value"),
        ("{not json", "malformed"),
        ('{"a": "' + "x" * 5000 + '"}', "oversized"),
        (json.dumps({f"k{i}": i for i in range(300)}), "oversized"),
        ('{"a": "' + "x" * (70 << 10) + '"}', "oversized"),
    ]:
        with pytest.raises(WireError) as err:
            decode_config(bad)
        assert err.value.reason == reason, bad[:40]
    assert check_infos(_infos(**{GLOBAL: 10, "control": 10}), max_total=20) == [
        (GLOBAL, 10),
        ("control", 10),
    ]
    for infos, reason in [
        (_infos(**{GLOBAL: 10, "control": 11}), "oversized"),
        (_infos(**{GLOBAL: -1}), "malformed"),
        (_infos(**{GLOBAL: 1}) * 2, "malformed"),
        (_infos(**{"": 1}), "malformed"),
        ([pb.VectorInfo(name=f"v{i}", size=0) for i in range(65)], "malformed"),
    ]:
        with pytest.raises(WireError) as err:
            check_infos(infos, max_total=20)
        assert err.value.reason == reason


def test_protocol_version_mismatch_is_refused(tmp_path: Path) -> None:
    registry = Registry(1, 4, "{}")
    with serving(registry) as port:
        reply = _register(port, protocol_version=PROTOCOL_VERSION + 1)
    assert not reply.accepted and "protocol version" in reply.reason
    assert registry.rejections["protocol_version"] == 1


def test_roles_are_checked_at_registration(tmp_path: Path) -> None:
    """A role exists only when the strategy needs it, is taken only under its authorized
    name, registers as the role's participant id and is never sampled; the wait for
    clients also waits for it."""
    tokens = tmp_path / "tokens.txt"
    names = {n: add_token(tokens, n) for n in ("hospital-a", "kh-operator")}
    holder = Role(name="key-holder", participant_id=-1)
    plain = Registry(2, 4, "{}")
    ckks = Registry(2, 4, "{}", roles=[holder], authorized={"key-holder": "kh-operator"})
    executor = GrpcExecutor(ckks, DeployOptions(wait_for_clients_s=0.3))
    try:
        with pytest.raises(TimeoutError, match="no key-holder connected"):
            executor.wait_for_clients(0)
        for registry, role, who, accepted, reason in [
            (plain, "key-holder", "kh-operator", False, "has no role 'key-holder'"),
            (ckks, "key-holder", "hospital-a", False, "is not this run's key-holder"),
            (ckks, "captain", "hospital-a", False, "has no role 'captain'"),
            (ckks, "key-holder", "kh-operator", True, ""),
        ]:
            with serving(registry, tokens=TokenStore(tokens)) as port:
                reply = _register(port, names[who], protocol_version=PROTOCOL_VERSION, role=role)
            assert reply.accepted == accepted and reason in reply.reason, reply.reason
            if accepted:
                assert reply.client_id == -1
        assert ckks.missing_roles() == [] and ckks.alive_clients() == []  # never sampled
        executor.wait_for_clients(0)
    finally:
        executor.close()
    assert plain.rejections["bad_role"] == 1 and ckks.rejections["bad_role"] == 2


def test_a_client_without_tenseal_refuses_a_ckks_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    cfg = load_config(None, ["data.num_clients=2"])
    cfg.privacy.secure_aggregation = "ckks"
    registry = Registry(2, 4, cfg.model_dump_json())
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tenseal" else real(name, *a)
    )
    # The client validates the experiment's config before building anything.
    with (
        serving(registry) as port,
        pytest.raises(ConfigError, match=r"pip install 'fedloom\[he\]'"),
    ):
        run_client(f"127.0.0.1:{port}", BuiltinApp, Credentials(insecure=True), partition=0)


def test_idle_unauthenticated_streams_do_not_stop_rounds(tmp_path: Path) -> None:
    """600 result streams that never send a byte (no credentials, a forged token, or a
    made-up session) against a server with 16 workers: each is refused before a worker
    reads it and counted once, in a few rate-limited log lines; then the registrations
    and every round complete (their senders never end the streams themselves)."""
    tokens = tmp_path / "tokens.txt"
    names = [add_token(tokens, f"site-{i}") for i in range(2)]
    sets = [
        "rounds=2",
        "data.num_clients=2",
        "server.min_fit_clients=2",
        "client.epochs=1",
        "deploy.heartbeat_interval_s=0.5",
        "deploy.poll_timeout_s=1",
        "deploy.wait_for_clients_s=300",
        "deploy.max_workers=16",  # fewer workers than idle streams: none may hold one
    ]
    server = Proc(
        fedloom(
            "server",
            "--address",
            "127.0.0.1:0",
            "--tokens",
            str(tokens),
            "--out",
            str(tmp_path / "run"),
            *[a for s in sets for a in ("--set", s)],
        )
    )
    release = threading.Event()
    clients: list[Proc] = []
    channels: list[grpc.Channel] = []
    try:
        port = int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        flood = []
        for i in range(600):
            channel = grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            channels.append(channel)
            stub = _Stub(channel, "" if i % 2 else "fl_forged")
            stub.session = "" if i % 3 else "0" * 32
            flood.append(stub._push.future(_release_on(release), metadata=stub.metadata()))
        for call in flood:
            with pytest.raises(grpc.RpcError):
                call.result(timeout=120)
        clients = [
            Proc(
                fedloom(
                    "client",
                    "--server",
                    f"127.0.0.1:{port}",
                    "--insecure",
                    "--partition",
                    str(i),
                    "--token",
                    names[i],
                )
            )
            for i in range(2)
        ]
        assert server.wait(600) == 0, server.output
        for c in clients:
            assert c.wait(60) == 0, c.output
    finally:
        release.set()
        for p in [server, *clients]:
            p.kill()
        for channel in channels:
            channel.close()
    history = json.loads((tmp_path / "run" / "summary.json").read_text())["history"]
    assert [r["round"] for r in history] == [1, 2]
    assert all(r["clients_succeeded"] == 2 for r in history)
    # Counted once each (reported with the first round, the flood came before it).
    assert history[0]["rejected_by_reason"].get("unauthenticated") == 600, history[0]
    assert sum(r["rejected_by_reason"].get("unauthenticated", 0) for r in history) == 600
    refused = [line for line in server.lines if "rejected (" in line]
    assert len(refused) < 20, "\n".join(refused)  # rate-limited, with counts
    assert any("1 of 2 rounds, ETA" in line for line in server.lines), server.output
