"""CKKS homomorphic aggregation: correctness, the server's lack of a secret key, refusals.

Accuracy metric throughout: relative L2 error ‖ĥ − h‖₂ / ‖h‖₂ of the decrypted aggregate
ĥ against the float64 plain sum h; the requirement is below 1e-4.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tenseal as ts

from fedloom.privacy.he import (
    CiphertextFormatError,
    CKKSParams,
    HEAggregator,
    HEClient,
    KeyHolder,
    SecretKeyError,
    public_key_id,
    run_he_round,
)

TOLERANCE = 1e-4


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def make_updates(n: int, d: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Ids not 0..n-1 on purpose; mixed magnitudes as in real model deltas.
    return {
        5 * i + 2: (rng.standard_normal(d) * 10.0 ** rng.uniform(-3, 0)).astype(np.float32)
        for i in range(n)
    }


def plain_sum(updates: dict[int, np.ndarray], ids: list[int] | None = None) -> np.ndarray:
    ids = sorted(updates) if ids is None else ids
    return np.sum([updates[c].astype(np.float64) for c in ids], axis=0)


@pytest.fixture(scope="module")
def holder() -> KeyHolder:
    return KeyHolder()


# --- correctness --------------------------------------------------------------------


def test_sum_of_20_updates_matches_plain_sum() -> None:
    updates = make_updates(20, 10_000)
    result = run_he_round(updates)
    want = plain_sum(updates)
    assert result.sum.shape == (10_000,)
    assert rel_err(result.sum, want) < TOLERANCE
    # Not just "below 1e-4": CKKS with scale 2^40 is far more precise than that.
    assert rel_err(result.sum, want) < 1e-6
    assert result.weight_total == pytest.approx(20.0, abs=1e-6)
    assert result.contributors == frozenset(updates)
    # Every client downloaded the public context and uploaded ceil(10001/4096) = 3
    # ciphertexts; the sizes are what the cost table reports.
    assert all(250_000 < b < 275_000 for b in result.bytes_received.values())
    assert all(2.5 * 131_000 < b < 3 * 132_000 for b in result.bytes_sent.values())
    assert result.server_seconds > 0 and result.key_holder_seconds > 0
    assert all(s > 0 for s in result.client_seconds.values())


def test_100k_vector_spans_many_ciphertexts() -> None:
    updates = make_updates(3, 100_000, seed=1)
    result = run_he_round(updates)
    assert rel_err(result.sum, plain_sum(updates)) < TOLERANCE
    # 100,001 values in 4096-slot ciphertexts: 25 of them, 131 KB each (expansion ~8x).
    assert 25 * 131_000 < result.bytes_sent[2] < 25 * 132_000


def test_weighted_mean() -> None:
    updates = make_updates(12, 5_000, seed=2)
    weights = {c: float(w) for c, w in zip(updates, range(3, 3 + 12 * 7, 7), strict=True)}
    result = run_he_round(updates, weights)
    want = sum(weights[c] * updates[c].astype(np.float64) for c in updates) / sum(weights.values())
    assert result.weight_total == pytest.approx(sum(weights.values()), rel=1e-9)
    assert rel_err(result.mean, want) < TOLERANCE
    # The weights really are applied (an unweighted mean would be far off).
    assert rel_err(plain_sum(updates) / 12, want) > 1e-2


def test_dropouts_sum_whoever_sent() -> None:
    updates = make_updates(10, 3_000, seed=3)
    gone = sorted(updates)[::3]
    result = run_he_round(updates, dropouts=gone)
    alive = [c for c in sorted(updates) if c not in gone]
    assert result.contributors == frozenset(alive)
    assert result.weight_total == pytest.approx(len(alive), abs=1e-6)
    assert rel_err(result.sum, plain_sum(updates, alive)) < TOLERANCE
    assert all(result.bytes_sent[c] == 0 for c in gone)


def test_roles_by_hand_with_a_reused_key(holder: KeyHolder) -> None:
    updates = make_updates(4, 4095, seed=4)  # 4095 + weight slot = exactly one ciphertext
    server = HEAggregator(holder.public_context, 4095)
    for c, u in updates.items():
        message = HEClient(holder.public_context).encrypt(u)
        assert isinstance(message, bytes)
        server.add(c, message)
    total = holder.decrypt_aggregate(server.aggregate(), 4095)
    assert total.dtype == np.float64
    assert rel_err(total, plain_sum(updates)) < TOLERANCE


def test_key_holder_rounds_its_output(holder: KeyHolder) -> None:
    raw_holder = KeyHolder(output_precision_bits=None)
    update = np.random.default_rng(5).standard_normal(100).astype(np.float32)
    for kh, on_grid in ((holder, True), (raw_holder, False)):
        server = HEAggregator(kh.public_context, 100)
        server.add(0, HEClient(kh.public_context).encrypt(update))
        out = kh.decrypt_aggregate(server.aggregate(), 100)
        scaled = out * 2.0**24
        assert np.array_equal(scaled, np.round(scaled)) == on_grid
        assert rel_err(out, update.astype(np.float64)) < 1e-6


# --- the server never holds a secret key --------------------------------------------


def test_server_context_has_no_secret_key(holder: KeyHolder) -> None:
    server = HEAggregator(holder.public_context, 10)
    assert not server.context.is_private()
    assert not server.context.has_secret_key()
    assert server.context.is_public()
    # The published bytes themselves carry no secret key.
    assert not ts.context_from(holder.public_context).has_secret_key()


def test_server_refuses_a_context_with_a_secret_key(holder: KeyHolder) -> None:
    private = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 60])
    private.global_scale = 2.0**40
    with pytest.raises(SecretKeyError, match="secret key"):
        HEAggregator(private.serialize(save_secret_key=True), 10)
    with pytest.raises(TypeError, match="bytes"):
        HEAggregator(private, 10)  # type: ignore[arg-type]
    with pytest.raises(SecretKeyError):
        HEClient(private.serialize(save_secret_key=True))


def test_server_cannot_decrypt(holder: KeyHolder) -> None:
    update = np.ones(50, dtype=np.float32)
    message = HEClient(holder.public_context).encrypt(update)
    server = HEAggregator(holder.public_context, 50)
    server.add(1, message)
    # The server's own context has no key to decrypt the aggregate, nor an update.
    chunk = _chunks(server.aggregate())[0]
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector_from(server.context, chunk).decrypt()
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector_from(server.context, _chunks(message)[0]).decrypt()


# --- refusals -----------------------------------------------------------------------


def test_wrong_lengths_are_refused(holder: KeyHolder) -> None:
    client = HEClient(holder.public_context)
    with pytest.raises(ValueError, match="flat vector"):
        client.encrypt(np.zeros((10, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="flat vector"):
        client.encrypt(np.zeros(0, dtype=np.float32))
    server = HEAggregator(holder.public_context, 100)
    with pytest.raises(CiphertextFormatError, match="length 99, expected 100"):
        server.add(1, client.encrypt(np.zeros(99, dtype=np.float32)))
    with pytest.raises(ValueError, match="one length"):
        run_he_round({1: np.zeros(10), 2: np.zeros(11)})
    server.add(2, client.encrypt(np.zeros(100, dtype=np.float32)))
    with pytest.raises(CiphertextFormatError, match="length 100, expected 101"):
        holder.decrypt_aggregate(server.aggregate(), 101)


def test_bad_values_and_weights_are_refused(holder: KeyHolder) -> None:
    client = HEClient(holder.public_context)
    with pytest.raises(ValueError, match="non-finite"):
        client.encrypt(np.array([1.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="weight"):
        client.encrypt(np.ones(3, dtype=np.float32), weight=0.0)
    with pytest.raises(ValueError, match="capacity"):
        client.encrypt(np.array([1.0, 2.0**19], dtype=np.float32))
    # Each update is within capacity, but their sum would wrap around: refused up front.
    big = {c: np.full(10, 2.0**17, dtype=np.float32) for c in range(4)}
    with pytest.raises(ValueError, match="capacity"):
        run_he_round(big)
    assert CKKSParams().max_abs == 2.0**18


def test_duplicate_foreign_and_misrouted_messages(holder: KeyHolder) -> None:
    client = HEClient(holder.public_context)
    message = client.encrypt(np.ones(20, dtype=np.float32))
    server = HEAggregator(holder.public_context, 20)
    server.add(7, message)
    with pytest.raises(CiphertextFormatError, match="already contributed"):
        server.add(7, message)
    other = KeyHolder()
    foreign = HEClient(other.public_context).encrypt(np.ones(20, dtype=np.float32))
    with pytest.raises(CiphertextFormatError, match="another key"):
        server.add(8, foreign)
    with pytest.raises(CiphertextFormatError, match="another key"):
        other.decrypt_aggregate(server.aggregate(), 20)
    with pytest.raises(CiphertextFormatError, match="expected an aggregate"):
        holder.decrypt_aggregate(message, 20)
    with pytest.raises(CiphertextFormatError, match="expected an update"):
        server.add(9, server.aggregate())
    with pytest.raises(ValueError, match="no update"):
        HEAggregator(holder.public_context, 20).aggregate()
    assert server.contributors == frozenset({7})
    assert public_key_id(holder.public_context) == holder.key_id != other.key_id


def test_malformed_framing_is_refused_and_leaves_the_sum_intact(holder: KeyHolder) -> None:
    update = np.linspace(-1, 1, 5000).astype(np.float32)
    good = HEClient(holder.public_context).encrypt(update)
    server = HEAggregator(holder.public_context, 5000)
    server.add(1, good)
    broken = {
        "truncated": good[:-100],
        "trailing": good + b"\0",
        "no header": good[:10],
        "bad magic": b"XXXX" + good[4:],
        "chunk count": _with_header_field(good, chunks=1),
        "claimed count": _with_header_field(good, count=5),
        "chunk swapped": _swap_chunks(good),
        "garbage ciphertext": _replace_chunk(good, 0, b"\x00" * 1000),
    }
    for name, data in broken.items():
        with pytest.raises(CiphertextFormatError):
            server.add(100 + len(name), data)
    assert server.contributors == frozenset({1})
    assert rel_err(holder.decrypt_aggregate(server.aggregate(), 5000), update) < TOLERANCE


def test_ckks_has_no_integrity(holder: KeyHolder) -> None:
    """Documented limitation: integrity must come from the transport (TLS).

    A substituted, validly encrypted vector is accepted and silently changes the sum;
    a flipped byte inside a ciphertext is either caught by SEAL's parser (and reported
    as CiphertextFormatError, never another exception) or yields a wrong aggregate.
    """
    rng = np.random.default_rng(6)
    x = rng.standard_normal(4095).astype(np.float32)
    client = HEClient(holder.public_context)
    real = client.encrypt(x)
    forged = client.encrypt(-x)  # e.g. a man in the middle without TLS
    server = HEAggregator(holder.public_context, 4095)
    server.add(1, forged)
    got = holder.decrypt_aggregate(server.aggregate(), 4095)
    assert rel_err(got, x.astype(np.float64)) > 1.0  # accepted, and wrong

    outcomes = []
    for position in (40, 100, 5_000, 60_000, 120_000):
        chunk = bytearray(_chunks(real)[0])
        chunk[position] ^= 0xFF
        server = HEAggregator(holder.public_context, 4095)
        try:
            server.add(1, _replace_chunk(real, 0, bytes(chunk)))
        except CiphertextFormatError:
            outcomes.append("rejected")
            continue
        err = rel_err(holder.decrypt_aggregate(server.aggregate(), 4095), x)
        outcomes.append("accepted, wrong" if err > TOLERANCE else "accepted, harmless")
    assert "rejected" in outcomes  # the header bytes are parsed and checked by SEAL
    assert "accepted, wrong" in outcomes  # but the coefficient data is not protected


# --- helpers: the framing is documented in fedloom.privacy.he ---------------------------

_HEADER = struct.Struct("<4sBB16sIII")


def _chunks(message: bytes) -> list[bytes]:
    *_, n = _HEADER.unpack_from(message)
    offset, out = _HEADER.size, []
    for _ in range(n):
        (size,) = struct.unpack_from("<I", message, offset)
        out.append(message[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return out


def _repack(message: bytes, parts: list[bytes], /, **fields: int) -> bytes:
    magic, version, kind, key_id, length, count, _ = _HEADER.unpack_from(message)
    header = _HEADER.pack(
        magic,
        version,
        kind,
        key_id,
        fields.get("length", length),
        fields.get("count", count),
        fields.get("chunks", len(parts)),
    )
    return header + b"".join(struct.pack("<I", len(c)) + c for c in parts)


def _with_header_field(message: bytes, **fields: int) -> bytes:
    parts = _chunks(message)
    if "chunks" in fields:
        parts = parts[: fields["chunks"]]
    return _repack(message, parts, **fields)


def _swap_chunks(message: bytes) -> bytes:
    chunks = _chunks(message)
    return _repack(message, [chunks[1], chunks[0]])


def _replace_chunk(message: bytes, index: int, data: bytes) -> bytes:
    chunks = _chunks(message)
    chunks[index] = data
    return _repack(message, chunks)
