"""Over a thousand hostile messages at a running server: each rejected and counted."""

from __future__ import annotations

import json
import threading
import time
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

from .deploy_helpers import num_parameters, serving


def _register(port: int, **fields: object) -> pb.RegisterReply:
    """Register with the server on the loopback ``port``, over a channel of its own."""
    request = pb.RegisterRequest(**fields).SerializeToString()  # type: ignore[arg-type]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb.RegisterReply.FromString(_Stub(channel).register(request))


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


def test_thousand_hostile_messages_then_a_normal_round(tmp_path: Path) -> None:
    # Central DP: the client's clip codec computes the pre-clip norm, which must stay there.
    dp = ["strategy=dp-fedavg", "privacy.noise_multiplier=1.0"]
    cfg = load_config(None, ["data.num_clients=2", "client.epochs=1", *dp])
    size = num_parameters(cfg)
    token = add_token(tmp_path / "tokens.txt", "hospital-a")
    options = DeployOptions(
        round_timeout_s=60, heartbeat_timeout_s=30, poll_timeout_s=1, chunk_bytes=4096
    )
    registry = Registry(2, size, cfg.model_dump_json())
    servicer = FederationServicer(registry, options, TokenStore(tmp_path / "tokens.txt"))
    server, port = start_grpc_server(servicer, "127.0.0.1:0", None, max_workers=16)
    executor = GrpcExecutor(registry, options)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = _Stub(channel)
    rng = np.random.default_rng(0)
    try:
        reply = _register(port, protocol_version=PROTOCOL_VERSION, token=token, partition=0)
        assert reply.accepted
        sid = reply.session_id
        w0 = np.zeros(size, np.float32)
        outcome: list[object] = []
        fit = threading.Thread(
            target=lambda: outcome.extend(executor.fit([_fit(0, 1, lr_scale=0.5)], {GLOBAL: w0}))
        )
        fit.start()
        header, msgs = _pull_header(stub, sid)
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

        def push(messages: list[bytes]) -> pb.PushReply:
            return pb.PushReply.FromString(stub.push(iter(messages)))

        def random_bytes() -> bytes:
            return rng.bytes(int(rng.integers(1, 200)))

        sent = 0
        for _ in range(200):
            r = pb.RegisterReply.FromString(stub.register(random_bytes()))
            assert not r.accepted
            sent += 1
        for _ in range(100):
            hb = pb.HeartbeatReply.FromString(stub.heartbeat(random_bytes()))
            assert not hb.known
            sent += 1
        for _ in range(100):
            with pytest.raises(grpc.RpcError):
                list(stub.pull(random_bytes()))
            sent += 1
        hostile: list[list[bytes]] = []
        hostile += [[random_bytes()] for _ in range(100)]
        hostile += [[_chunk(payload[:64]), _header(**good)] for _ in range(50)]  # chunk first
        hostile += [
            [_header(**{**good, "vectors": _infos(delta=size + 1)}), _chunk(payload)]
            for _ in range(50)
        ]  # wrong shape
        hostile += [
            [_header(**{**good, "vectors": _infos(control=size)}), _chunk(payload)]
            for _ in range(30)
        ]  # a vector the strategy does not expect
        hostile += [
            [_header(**{**good, "vectors": _infos(delta=size) * 2}), _chunk(payload * 2)]
            for _ in range(20)
        ]  # the same vector twice
        hostile += [[_header(**{**good, "vectors": [], "held": True})] for _ in range(30)]
        hostile += [[_header(**good), _chunk(payload[: len(payload) // 2])] for _ in range(50)]
        hostile += [[_header(**good), _chunk(payload), _chunk(b"\0" * 8)] for _ in range(50)]
        hostile += [[_header(**{**good, "round": 0}), _chunk(payload)] for _ in range(50)]
        hostile += [[_header(**{**good, "task_id": "f" * 32}), _chunk(payload)] for _ in range(50)]
        hostile += [
            [_header(**{**good, "session_id": "0" * 32}), _chunk(payload)] for _ in range(50)
        ]
        hostile += [
            [_header(**{**good, "metrics_json": "{not json"}), _chunk(payload)] for _ in range(50)
        ]
        hostile += [[_header(**good), _header(**good)] for _ in range(50)]
        hostile += [[_header(**{**good, "vectors": []})] for _ in range(50)]
        hostile += [[_header(**{**good, "num_examples": -5}), _chunk(payload)] for _ in range(50)]
        for messages in hostile:
            assert not push(messages).accepted
            sent += 1
        assert registry.rejections.total() == sent

        assert push([_header(**good), _chunk(payload[:5000]), _chunk(payload[5000:])]).accepted
        for _ in range(50):  # replays of the accepted result
            assert not push([_header(**good), _chunk(payload)]).accepted
            sent += 1
        fit.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], FitResult)
        np.testing.assert_array_equal(outcome[0].delta, delta)
        assert outcome[0].model_version == 0 and set(outcome[0].vectors) == {"delta"}
        assert sent >= 1000
        assert registry.rejections.total() == sent
        counts = registry.rejections
        for reason in (
            "malformed",
            "wrong_shape",
            "truncated",
            "oversized",
            "stale_round",
            "task_not_open",
            "unknown_session",
            "missing_vector",
            "bad_value",
            "unknown_vector",
            "unexpected_held",
        ):
            assert counts[reason] > 0, reason
        assert json.dumps(executor.round_metrics())  # reported with the round

        # A diverged update (NaN, Inf) is answered at once and refused by the strategy, as
        # in simulation: a recorded failure of that client, not a stall until the deadline.
        plain = load_config(None, ["data.num_clients=2"])
        spec = build_learner(plain, build_federated_dataset(plain.data, plain.seed)).binding.spec
        strategy = build_strategy(plain, num_clients=2, spec=spec, roles_in_process=False)
        for rnd, bad in ((3, np.nan), (4, np.inf)):
            later: list[object] = []
            waiting = threading.Thread(
                target=lambda rnd=rnd, later=later: later.extend(
                    executor.fit([_fit(0, rnd)], {GLOBAL: w0})
                )
            )
            waiting.start()
            head, _ = _pull_header(stub, sid)
            poisoned = delta.copy()
            poisoned[7] = bad
            answer = {**good, "task_id": head.task_id, "round": rnd}
            assert push([_header(**answer), _chunk(poisoned.tobytes())]).accepted
            waiting.join(30)
            (result,) = later
            assert isinstance(result, FitResult) and not np.all(np.isfinite(result.delta))
            outcome = strategy.process_fit(rnd, [result], w0, executor.exchange)
            assert not outcome.updates and "NaN or Inf" in outcome.failures[0].error

        # A normal client still completes a round afterwards.
        stop = threading.Event()
        done: list[int] = []
        client = threading.Thread(
            target=lambda: done.append(
                run_client(
                    f"127.0.0.1:{port}",
                    BuiltinApp,
                    Credentials(token=token, insecure=True),
                    partition=1,
                    chunk_bytes=4096,
                    stop=stop,
                )
            )
        )
        client.start()
        executor.wait_for_clients(2)
        results = executor.fit([_fit(1, 2)], {GLOBAL: w0})
        assert isinstance(results[0], FitResult) and results[0].delta is not None
        assert np.all(np.isfinite(results[0].delta))
        assert "below_clip" in results[0].metrics  # the clip codec ran on the client ...
        assert "update_norm" not in results[0].metrics  # ... and its private metric stayed
        executor.close()
        client.join(30)
        assert done == [1]
    finally:
        executor.close()
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
                reply = _register(
                    port, protocol_version=PROTOCOL_VERSION, token=names[who], role=role
                )
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
