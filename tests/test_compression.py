"""Compression codecs: each compressor against a hand-computed case, error feedback's
residual, compact payloads and bytes in the round record, secure aggregation with
random-k, downlink codecs, and exact resume with error-feedback state."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.client_store import ClientState
from fedloom.codecs.compression import (
    RESIDUAL,
    QSGDCodec,
    RandomKCodec,
    SignCodec,
    TopKCodec,
    pack_codes,
    unpack_codes,
)
from fedloom.codecs.downlink import Float16Broadcast, Int8Broadcast
from fedloom.config import ConfigError, RunConfig, load_config
from fedloom.data import build_federated_dataset
from fedloom.engine.deploy import ServerSecurity, run_server
from fedloom.engine.grpc.client import BuiltinApp, Credentials, run_client
from fedloom.engine.simulation import run_simulation
from fedloom.messages import DELTA, FitResult
from fedloom.store import RunStore
from tests.deploy_helpers import federate_in_threads

from .helpers import client_runtime, final_weights, fit_once, interrupt_after

SMALL = ["data.num_clients=6", "client.epochs=1", "checkpoint_every=1"]
N_PARAMS = 64 * 64 + 64 + 64 * 10 + 10  # the default MLP on digits


def _encode(codec: object, delta: np.ndarray, state: ClientState, *, rnd: int = 1, cid: int = 0):
    return codec.encode(  # type: ignore[attr-defined]
        {DELTA: np.asarray(delta, np.float32)},
        {},
        config={},
        state=state,
        client_id=cid,
        round=rnd,
    )


def _result(vectors: dict[str, np.ndarray], *, rnd: int = 1) -> FitResult:
    return FitResult(client_id=0, round=rnd, model_version=rnd - 1, num_examples=1, vectors=vectors)


# ------------------------------------------------------------------- top-k


def test_topk_sends_the_k_largest_magnitudes_and_keeps_the_rest() -> None:
    codec = TopKCodec(dimension=5, seed=0, error_feedback=True, ratio=0.4)
    state = ClientState()
    out = _encode(codec, [0.1, -3.0, 2.0, 0.5, -0.2], state)
    assert out["delta.idx"].dtype == np.int32 and out["delta.val"].dtype == np.float32
    np.testing.assert_array_equal(out["delta.idx"], [1, 2])
    np.testing.assert_array_equal(out["delta.val"], np.float32([-3.0, 2.0]))
    np.testing.assert_allclose(state.tensors[RESIDUAL], [0.1, 0, 0, 0.5, -0.2])
    decoded = codec.decode(_result(out)).vectors[DELTA]
    np.testing.assert_array_equal(decoded, np.float32([0, -3.0, 2.0, 0, 0]))
    # Next round: p = Δ + e = [1.1, 0, 0, 0.5, -0.2]; the residual's 0.5 now wins a slot.
    out = _encode(codec, [1.0, 0, 0, 0, 0], state, rnd=2)
    np.testing.assert_array_equal(out["delta.idx"], [0, 3])
    np.testing.assert_allclose(out["delta.val"], [1.1, 0.5], rtol=1e-6)
    np.testing.assert_allclose(state.tensors[RESIDUAL], [0, 0, 0, 0, -0.2], atol=1e-7)


@pytest.mark.parametrize("kind", ["topk", "randk", "qsgd", "sign"])
def test_error_feedback_residual_is_exactly_what_was_not_sent(kind: str) -> None:
    d = 1000
    codecs = {
        "topk": TopKCodec(dimension=d, seed=3, error_feedback=True, ratio=0.05),
        "randk": RandomKCodec(dimension=d, seed=3, error_feedback=True, ratio=0.05),
        "qsgd": QSGDCodec(
            dimension=d, seed=3, error_feedback=True, bits=4, bucket_size=64, norm="l2"
        ),
        "sign": SignCodec(dimension=d, seed=3, error_feedback=True),
    }
    codec = codecs[kind]
    rng = np.random.default_rng(0)
    state = ClientState()
    for rnd in range(1, 5):
        e = state.tensors.get(RESIDUAL, np.zeros(d, np.float32)).copy()
        delta = rng.normal(size=d).astype(np.float32)
        out = _encode(codec, delta, state, rnd=rnd, cid=7)
        sent = codec.decode(_result(out, rnd=rnd)).vectors[DELTA]
        # e + Δ − sent == e' (up to float32 rounding of the sum)
        np.testing.assert_allclose(e + delta - sent, state.tensors[RESIDUAL], atol=1e-6)
        assert np.abs(state.tensors[RESIDUAL]).sum() > 0


def test_without_error_feedback_no_state_is_kept() -> None:
    codec = TopKCodec(dimension=4, seed=0, error_feedback=False, ratio=0.5)
    state = ClientState()
    _encode(codec, [1, 2, 3, 4], state)
    assert state.is_empty()


# ------------------------------------------------------------------ random-k


def test_randk_shares_its_indices_within_a_round_and_sums_linearly() -> None:
    d = 200
    client_side = RandomKCodec(dimension=d, seed=5, error_feedback=False, ratio=0.1)
    server_side = RandomKCodec(dimension=d, seed=5, error_feedback=False, ratio=0.1)
    rng = np.random.default_rng(1)
    deltas = [rng.normal(size=d).astype(np.float32) for _ in range(3)]
    outs = [_encode(client_side, v, ClientState(), rnd=4, cid=c) for c, v in enumerate(deltas)]
    assert all(set(o) == {DELTA} and o[DELTA].shape == (20,) for o in outs)  # values only
    idx = server_side.indices(4)
    assert len(np.unique(idx)) == 20 and not np.array_equal(idx, server_side.indices(5))
    for v, o in zip(deltas, outs, strict=True):
        np.testing.assert_array_equal(o[DELTA], v[idx])
    decoded = [server_side.decode(_result(o, rnd=4)).vectors[DELTA] for o in outs]
    summed = server_side.decode_sum({DELTA: sum(o[DELTA] for o in outs)}, rnd=4)[DELTA]
    np.testing.assert_allclose(summed, np.sum(decoded, axis=0), atol=1e-6)


# -------------------------------------------------------------------- QSGD


def test_qsgd_levels_by_hand() -> None:
    # One bucket [3, -4, 0, 0], ‖v‖ = 5, 4 bits → s = 7 levels: |v_i|·s/‖v‖ = 4.2, 5.6,
    # so 3 becomes 4/7·5 or 5/7·5 and −4 becomes −5/7·5 or −6/7·5; zeros stay zero.
    codec = QSGDCodec(dimension=4, seed=0, error_feedback=False, bits=4, bucket_size=4, norm="l2")
    seen: set[tuple[float, ...]] = set()
    for rnd in range(1, 60):
        out = _encode(codec, [3.0, -4.0, 0.0, 0.0], ClientState(), rnd=rnd)
        assert out["delta.q"].dtype == np.uint8 and out["delta.q"].shape == (2,)
        np.testing.assert_array_equal(out["delta.scale"], np.float32([5.0]))
        v = codec.decode(_result(out, rnd=rnd)).vectors[DELTA]
        assert np.isclose(v[0] * 7 / 5, 4.0) or np.isclose(v[0] * 7 / 5, 5.0)
        assert np.isclose(v[1] * 7 / 5, -5.0) or np.isclose(v[1] * 7 / 5, -6.0)
        assert v[2] == 0 and v[3] == 0
        seen.add(tuple(np.round(v * 7 / 5).tolist()))
    assert len(seen) > 1  # the rounding is stochastic
    # A coordinate equal to the bucket's norm is exactly the top level, deterministically.
    out = _encode(codec, [0.0, 5.0, 0.0, 0.0], ClientState(), rnd=1)
    np.testing.assert_array_equal(codec.decode(_result(out)).vectors[DELTA], [0, 5, 0, 0])


@pytest.mark.parametrize(("bits", "norm"), [(8, "l2"), (4, "l2"), (4, "max"), (2, "l2")])
def test_qsgd_is_unbiased_in_expectation_over_seeds(bits: int, norm: str) -> None:
    d, trials = 40, 3000
    v = np.random.default_rng(2).normal(size=d).astype(np.float32)
    codec = QSGDCodec(
        dimension=d, seed=11, error_feedback=False, bits=bits, bucket_size=16, norm=norm
    )
    total = np.zeros(d)
    for rnd in range(trials):
        out = _encode(codec, v, ClientState(), rnd=rnd)
        total += codec.decode(_result(out, rnd=rnd)).vectors[DELTA]
    mean = total / trials
    # Per coordinate, one sample's spread is at most scale/s/2; the mean of 3000 is
    # within 5 standard errors of v.
    scale = np.abs(v).max() if norm == "max" else np.linalg.norm(v[:16])
    bound = 5 * scale / ((1 << (bits - 1)) - 1) / 2 / np.sqrt(trials)
    np.testing.assert_allclose(mean, v, atol=max(bound, 1e-4))


def test_qsgd_8bit_payload_is_int8_codes_and_a_scale_per_bucket() -> None:
    codec = QSGDCodec(
        dimension=1000, seed=0, error_feedback=False, bits=8, bucket_size=512, norm="l2"
    )
    assert codec.delta_layout() == {"delta.q": (1000, "int8"), "delta.scale": (2, "float32")}
    out = _encode(codec, np.linspace(-1, 1, 1000), ClientState())
    assert out["delta.q"].dtype == np.int8 and np.abs(out["delta.q"]).max() <= 127


def test_four_bit_packing_round_trip_and_layout() -> None:
    # Two codes a byte, the first in the low nibble; the odd tail is padded with 0.
    np.testing.assert_array_equal(pack_codes(np.uint8([1, 2, 15]), 4), np.uint8([0x21, 0x0F]))
    codes = np.random.default_rng(0).integers(0, 16, size=1001).astype(np.uint8)
    packed = pack_codes(codes, 4)
    assert packed.shape == (501,)
    np.testing.assert_array_equal(unpack_codes(packed, 4, 1001), codes)
    two = np.random.default_rng(1).integers(0, 4, size=9).astype(np.uint8)
    np.testing.assert_array_equal(unpack_codes(pack_codes(two, 2), 2, 9), two)


def test_qsgd_decode_refuses_codes_outside_its_levels() -> None:
    from fedloom.codecs.base import RejectedUpdateError

    codec = QSGDCodec(dimension=2, seed=0, error_feedback=False, bits=4, bucket_size=2, norm="l2")
    bad = {"delta.q": pack_codes(np.uint8([0, 8]), 4), "delta.scale": np.float32([1.0])}
    with pytest.raises(RejectedUpdateError, match="outside"):
        codec.decode(_result(bad))


# -------------------------------------------------------------------- sign


def test_scaled_sign_by_hand() -> None:
    codec = SignCodec(dimension=4, seed=0, error_feedback=True)
    state = ClientState()
    out = _encode(codec, [1.0, -2.0, 3.0, 0.0], state)
    # ‖p‖₁/d = 6/4 = 1.5; signs + − + (+ for zero) → bits 1,0,1,1 → 0b1101 little-endian.
    np.testing.assert_array_equal(out["delta.scale"], np.float32([1.5]))
    np.testing.assert_array_equal(out["delta.sign"], np.uint8([0b1101]))
    np.testing.assert_array_equal(codec.decode(_result(out)).vectors[DELTA], [1.5, -1.5, 1.5, 1.5])
    np.testing.assert_array_equal(state.tensors[RESIDUAL], [-0.5, -0.5, 1.5, -1.5])


# ----------------------------------------------------------------- downlink


def test_downlink_codecs_round_trip_within_their_precision() -> None:
    w = np.random.default_rng(0).normal(size=1500).astype(np.float32)
    half = Float16Broadcast().encode({"global": w})
    assert half["global"].dtype == np.float16
    np.testing.assert_allclose(Float16Broadcast().decode(half)["global"], w, rtol=1e-3)
    codec = Int8Broadcast(bucket_size=512)
    down = codec.encode({"global": w})
    assert down["global.q8"].dtype == np.int8 and down["global.scale8"].shape == (3,)
    back = codec.decode(down)["global"]
    step = np.repeat(down["global.scale8"], 512)[:1500] / 127
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)


# -------------------------------------------------------------- end to end


def test_round_record_counts_the_encoded_bytes(tmp_path: Path) -> None:
    runs = {
        "topk": ["compression.kind=topk", "compression.ratio=0.01"],
        "int8": ["compression.kind=int8", "compression.downlink=int8"],
        "sign": ["compression.kind=sign", "compression.downlink=float16"],
    }
    k = round(0.01 * N_PARAMS)
    expected_up = {
        "topk": 6 * k * 8,  # int32 index + float32 value each
        "int8": 6 * (N_PARAMS + 4 * -(-N_PARAMS // 512)),
        "sign": 6 * (-(-N_PARAMS // 8) + 4),
    }
    expected_down = {
        "topk": 6 * 4 * N_PARAMS,
        "int8": 6 * (N_PARAMS + 4 * -(-N_PARAMS // 512)),
        "sign": 6 * 2 * N_PARAMS,
    }
    for name, extra in runs.items():
        summary = run_simulation(load_config(None, [*SMALL, "rounds=1", *extra]), tmp_path / name)
        for rec in summary["history"]:
            assert rec["clients_succeeded"] == 6
            assert rec["bytes_up"] == expected_up[name], name
            assert rec["bytes_down"] == expected_down[name], name


def test_resume_is_exact_with_error_feedback_state(tmp_path: Path) -> None:
    overrides = [*SMALL, "rounds=4", "compression.kind=topk", "compression.ratio=0.05"]
    run_simulation(load_config(None, overrides), tmp_path / "whole")
    interrupt_after(load_config(None, overrides), tmp_path / "cut", 2)
    summary = run_simulation(load_config(None), tmp_path / "cut", resume=True)
    assert [r["round"] for r in summary["history"]] == [1, 2, 3, 4]
    np.testing.assert_array_equal(
        final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole")
    )
    # The residuals really are in the client state store (and not empty).
    with RunStore.open(tmp_path / "whole") as store:
        assert store.latest_checkpoint() is not None
    states = list((tmp_path / "whole").rglob("client_state/*/r*.safetensors"))
    assert states


@pytest.mark.slow
def test_pool_engine_carries_compact_payloads_and_residuals(tmp_path: Path) -> None:
    base = [*SMALL, "rounds=2", "compression.kind=qsgd", "compression.bits=4"]
    base += ["compression.error_feedback=true", "compression.downlink=int8"]
    inproc = run_simulation(load_config(None, base), tmp_path / "inproc")
    pool = run_simulation(
        load_config(None, [*base, "engine.name=pool", "engine.workers=2"]), tmp_path / "pool"
    )
    np.testing.assert_array_equal(
        final_weights(tmp_path / "pool"), final_weights(tmp_path / "inproc")
    )
    assert [r["bytes_up"] for r in pool["history"]] == [r["bytes_up"] for r in inproc["history"]]


def test_randk_composes_with_secure_aggregation(tmp_path: Path) -> None:
    overrides = [
        *SMALL,
        "rounds=1",
        "compression.kind=randk",
        "compression.ratio=0.1",
        "privacy.secure_aggregation=secagg+",
        "privacy.secagg_clip_range=4.0",
    ]
    cfg = load_config(None, overrides)
    summary = run_simulation(cfg, tmp_path / "run")
    record = summary["history"][0]
    assert record["secagg_contributors"] == 6
    runtime = client_runtime(cfg, build_federated_dataset(cfg.data, cfg.seed))
    w0 = runtime.initial_vector()
    codec = runtime.codecs[0]
    assert isinstance(codec, RandomKCodec)
    idx = codec.indices(1)
    dense = []
    for c in range(6):
        sent = fit_once(runtime, w0, client=c, round=1).vectors[DELTA]
        assert sent.shape == (len(idx),)  # the client holds k values, not d
        full = np.zeros_like(w0)
        full[idx] = sent
        dense.append(full)
    step = 4.0 / (2**15 - 1)
    expected = w0 + np.mean(dense, axis=0)
    np.testing.assert_allclose(final_weights(tmp_path / "run"), expected, atol=step)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.secure_aggregation=secagg+", "compression.kind=topk"], "randk"),
        (
            ["strategy=dp-fedavg", "privacy.noise_multiplier=1.0", "compression.kind=qsgd"],
            "central DP",
        ),
        (["compression.error_feedback=true"], "compression.kind is 'none'"),
    ],
)
def test_impossible_combinations_are_refused_with_one_line(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = load_config(None, [*SMALL, "rounds=1", *overrides])
    with pytest.raises(ConfigError, match=message) as err:
        run_simulation(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)


def test_config_names_from_the_issue() -> None:
    cfg = load_config(
        None,
        [
            "compression.kind=qsgd",
            "compression.bits=4",
            "compression.ratio=0.05",
            "compression.error_feedback=false",
        ],
    )
    assert json.loads(json.dumps(cfg.to_dict()))["compression"]["bits"] == 4
    with pytest.raises(ConfigError, match=r"compression\.bits"):
        load_config(None, ["compression.bits=3"])


def _deploy(cfg: RunConfig, run_dir: Path, state_dir: Path, clients: int) -> dict[str, Any]:
    def client(i: int) -> Callable[[str], int]:
        return lambda address: run_client(
            address,
            BuiltinApp,
            Credentials(insecure=True),
            partition=i,
            max_wait_s=120,
            state_dir=state_dir,
        )

    summary, _ = federate_in_threads(
        lambda on_listening: run_server(
            cfg, run_dir, "127.0.0.1:0", ServerSecurity(), on_listening=on_listening
        ),
        [client(i) for i in range(clients)],
    )
    return summary


def test_deployment_sends_compact_payloads_and_matches_simulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over gRPC the uploads and broadcasts travel in their compact dtypes: the bytes the
    server reads from result streams and writes into task streams drop as the record
    says, and the model (with clients' error-feedback residuals on their own disks)
    equals the simulated one."""
    import fedloom.engine.grpc.server as grpc_server

    wire = {"up": 0, "down": 0}
    real_read, real_encode = grpc_server.read_chunks, grpc_server.encode_buffers

    def counting_read(raws: Any, size: int, *args: Any) -> bytearray:
        def counted() -> Any:
            for raw in raws:
                wire["up"] += len(raw)
                yield raw

        return real_read(counted(), size, *args)

    def counting_encode(buffers: Any, chunk_bytes: int) -> Any:
        for chunk in real_encode(buffers, chunk_bytes):
            wire["down"] += len(chunk)
            yield chunk

    monkeypatch.setattr(grpc_server, "read_chunks", counting_read)
    monkeypatch.setattr(grpc_server, "encode_buffers", counting_encode)
    base = ["rounds=2", "data.num_clients=3", "server.min_fit_clients=3", "client.epochs=1"]
    base += ["eval.max_examples=100"]
    measured = {}
    for name, extra in {
        "dense": [],
        "topk": ["compression.kind=topk", "compression.ratio=0.01", "compression.downlink=int8"],
    }.items():
        wire.update(up=0, down=0)
        cfg = load_config(None, [*base, *extra])
        summary = _deploy(cfg, tmp_path / name, tmp_path / f"state-{name}", 3)
        history = summary["history"]
        assert all(r["clients_succeeded"] == 3 for r in history)
        # The chunk messages the server read and wrote are the bytes the round record
        # counts plus each chunk message's few bytes of protobuf framing.
        for direction in ("up", "down"):
            recorded = sum(r[f"bytes_{direction}"] for r in history)
            assert recorded <= wire[direction] <= recorded * 1.01 + 64, direction
        measured[name] = dict(wire)
        if name == "topk":
            run_simulation(cfg, tmp_path / "sim")
            np.testing.assert_allclose(
                final_weights(tmp_path / name), final_weights(tmp_path / "sim"), atol=1e-5
            )
    print(f"bytes on the wire, 2 rounds x 3 clients: {measured}")
    k = round(0.01 * N_PARAMS)
    assert 2 * 3 * k * 8 <= measured["topk"]["up"] <= 2 * 3 * (k * 8 + 8)
    assert measured["dense"]["up"] / measured["topk"]["up"] >= 30
    assert measured["dense"]["down"] / measured["topk"]["down"] >= 3.9
