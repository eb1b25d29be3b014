"""SecAgg building blocks: Shamir, the neighbour graph, quantization, ring, PRG, crypto, wire."""

from __future__ import annotations

import itertools
import math
import os
import random

import numpy as np
import pytest
from scipy import stats

from fedloom.privacy.secagg import (
    AdvertiseKeys,
    EncryptedShare,
    KeyBroadcast,
    MaskedInput,
    Message,
    MessageFormatError,
    NeighbourGraph,
    PublicKeys,
    QuantizationOverflowError,
    RevealedShare,
    RoundSetup,
    SecAggConfig,
    ShareAuthenticationError,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    crypto,
    decode_message,
    default_degree,
    default_threshold,
    prg,
    ring,
    shamir,
)
from fedloom.privacy.secagg import quantize as q

# -- Shamir -------------------------------------------------------------------------------


def test_shamir_any_t_shares_reconstruct_and_t_minus_1_do_not() -> None:
    secret = int.from_bytes(os.urandom(32), "little") % shamir.PRIME
    assert secret.bit_length() > 128
    t, xs = 4, [shamir.share_point(i) for i in (0, 3, 5, 8, 13, 21, 34)]
    shares = shamir.split(secret, t, xs, os.urandom)
    for subset in itertools.combinations(xs, t):
        assert shamir.reconstruct({x: shares[x] for x in subset}) == secret
    for subset in itertools.combinations(xs, t - 1):
        assert shamir.reconstruct({x: shares[x] for x in subset}) != secret
    # More than t shares also work (the polynomial is still degree t - 1).
    assert shamir.reconstruct(shares) == secret


def test_shamir_fewer_than_t_shares_look_uniform_whatever_the_secret() -> None:
    # t = 2: the single share f(1) = secret + a_1 with a_1 uniform, so its distribution
    # does not depend on the secret. Top 4 bits of 3000 shares of 0 and of p - 1, seeded.
    entropy = random.Random(0).randbytes
    for secret in (0, shamir.PRIME - 1):
        tops = [shamir.split(secret, 2, [1, 2], entropy)[1] >> 251 for _ in range(3000)]
        assert stats.chisquare(np.bincount(tops, minlength=16)).pvalue > 1e-3


def test_shamir_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(1, 2, [1, 1, 2], os.urandom)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(1, 4, [1, 2, 3], os.urandom)
    with pytest.raises(ValueError, match="field element"):
        shamir.split(shamir.PRIME, 2, [1, 2], os.urandom)
    with pytest.raises(ValueError):
        shamir.decode_share(shamir.PRIME.to_bytes(32, "little"))
    assert shamir.decode_share(shamir.encode_share(42)) == 42


# -- neighbour graph ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 24, 100, 1000, 4096])
def test_graph_is_regular_symmetric_connected_and_logarithmic(n: int) -> None:
    ids = random.Random(n).sample(range(10 * n), n)
    k = default_degree(n)
    assert (k <= 2 * math.log2(n) + 2 and k % 2 == 0) or k == n - 1
    seed = os.urandom(32)
    adjacency = NeighbourGraph.build(ids, k, seed).adjacency()
    assert set(adjacency) == set(ids)
    for u, neighbours in adjacency.items():
        assert len(neighbours) == k
        assert u not in neighbours
        assert all(u in adjacency[v] for v in neighbours)
    # Connected: a breadth-first search from any client reaches all of them.
    seen, frontier = {ids[0]}, {ids[0]}
    while frontier:
        frontier = {v for u in frontier for v in adjacency[u]} - seen
        seen |= frontier
    assert len(seen) == n
    # Every party derives the same graph from the public seed, whatever its id order.
    shuffled = random.Random(1).sample(ids, n)
    assert NeighbourGraph.build(shuffled, k, seed).adjacency() == adjacency
    assert NeighbourGraph.build(ids, k, os.urandom(32)).adjacency() != adjacency


@pytest.mark.parametrize("n", [7, 8])
def test_degree_n_minus_1_is_the_complete_graph(n: int) -> None:
    graph = NeighbourGraph.build(range(n), n - 1, os.urandom(32))
    for u in range(n):
        assert graph.neighbours(u) == set(range(n)) - {u}


def test_graph_rejects_impossible_degrees() -> None:
    with pytest.raises(ValueError, match="n·k must be even"):
        NeighbourGraph.build(range(9), 3, b"s")
    with pytest.raises(ValueError, match="degree"):
        NeighbourGraph.build(range(5), 5, b"s")
    assert NeighbourGraph.build(range(10), 3, b"s").degree == 3  # odd k, even n: fine
    assert default_threshold(14) == 8 and default_threshold(23) == 12


# -- quantization and the ring ------------------------------------------------------------


def test_deterministic_quantization_rounds_half_to_even_and_clips() -> None:
    # r = 1, 4 bits: M = 7, step 1/7; 0.5 * 7 = 3.5 is a tie and goes to the even 4.
    x = np.array([0.0, 0.5, -0.5, 0.2, -3.0, 3.0, -1 / 7], np.float32)
    np.testing.assert_array_equal(q.quantize(x, 1.0, 4), [0, 4, -4, 1, -7, 7, -1])
    # 2 bits: M = 1, so +-0.5 are ties that go to the even 0, not away from zero.
    np.testing.assert_array_equal(q.quantize(np.array([0.5, -0.5, 0.75]), 1.0, 2), [0, 0, 1])
    np.testing.assert_allclose(q.dequantize(np.array([7, -14]), 1.0, 4), [1.0, -2.0])


def test_stochastic_quantization_is_unbiased() -> None:
    x = np.full(200_000, 0.3, np.float32)
    out = q.quantize(x, 1.0, 4, "stochastic", np.random.default_rng(0))
    assert set(np.unique(out)) == {2, 3}  # 0.3 * 7 = 2.1
    assert abs(out.mean() - 2.1) < 0.01


def test_quantization_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        q.quantize(np.array([0.0, np.nan]), 1.0, 8)
    with pytest.raises(ValueError, match="flat vector"):
        q.quantize(np.zeros((2, 2)), 1.0, 8)


def test_overflow_rule_boundary() -> None:
    q.check_sum_fits(16, 8, 12)  # 16 * 127 = 2032 < 2^11
    with pytest.raises(QuantizationOverflowError, match=r"n·M < 2\^11"):
        q.check_sum_fits(17, 8, 12)
    q.check_sum_fits(127, 2, 8)  # M = 1: n·M = 127 = 2^7 - 1, the largest sum that fits
    with pytest.raises(QuantizationOverflowError):
        q.check_sum_fits(128, 2, 8)  # 128 would read back as -128
    q.check_sum_fits(65_538, 16, 32)  # the defaults take up to 65,538 clients
    with pytest.raises(QuantizationOverflowError):
        q.check_sum_fits(65_539, 16, 32)


@pytest.mark.parametrize("bits", [8, 20, 32, 33, 63, 64])
def test_ring_centred_lift_and_wire_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    half = 1 << (bits - 1)
    values = rng.integers(-half, half, 1000, dtype=np.int64, endpoint=False)
    values[:2] = [-half, half - 1]
    reduced = ring.reduce(values, bits)
    assert int(reduced.max()) < 1 << bits
    np.testing.assert_array_equal(ring.centred_lift(reduced, bits), values)
    data = ring.encode(reduced, bits)
    assert len(data) == 1000 * (4 if bits <= 32 else 8)
    np.testing.assert_array_equal(ring.decode(data, 1000, bits), reduced)
    with pytest.raises(MessageFormatError, match="bytes"):
        ring.decode(data[:-1], 1000, bits)


def test_ring_decode_refuses_out_of_range_elements() -> None:
    data = np.array([1 << 20], "<u4").tobytes()
    with pytest.raises(MessageFormatError, match="outside"):
        ring.decode(data, 1, 16)


# -- PRG ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 32, 48, 64])
def test_prg_is_deterministic_seed_dependent_and_uniform(bits: int) -> None:
    seed = os.urandom(32)
    a = prg.expand(seed, 1 << 14, bits)
    np.testing.assert_array_equal(a, prg.expand(seed, 1 << 14, bits))
    assert a.dtype == np.uint64 and a.shape == (1 << 14,)
    assert bits == 64 or int(a.max()) < 1 << bits
    b = prg.expand(os.urandom(32), 1 << 14, bits)
    assert np.mean(a == b) < 0.01
    # A prefix of a longer expansion is the shorter expansion (CTR keystream).
    np.testing.assert_array_equal(prg.expand(seed, 10, bits), a[:10])
    top = (a >> np.uint64(bits - 8)).astype(np.int64)
    assert stats.chisquare(np.bincount(top, minlength=256)).pvalue > 1e-6


# -- key agreement and share encryption ---------------------------------------------------


def test_key_agreement_is_symmetric_and_keys_are_shareable() -> None:
    a, b = crypto.generate_keypair(os.urandom), crypto.generate_keypair(os.urandom)
    round_id = os.urandom(16)
    assert crypto.share_key(a.private, b.public, round_id) == crypto.share_key(
        b.private, a.public, round_id
    )
    assert crypto.pairwise_mask_seed(a.private, b.public, round_id) != crypto.share_key(
        a.private, b.public, round_id
    )
    # The server can rebuild a key pair from the reconstructed secret.
    assert crypto.keypair_from_secret(a.secret).public == a.public
    with pytest.raises(crypto.ProtocolViolationError):
        crypto.agree(a.private, bytes(32))  # a low-order point


def test_associated_data_binds_round_sender_and_receiver() -> None:
    key, round_id = os.urandom(32), os.urandom(16)
    ad = crypto.share_associated_data(round_id, 3, 9)
    blob = crypto.seal(key, b"shares", ad, os.urandom)
    assert crypto.open_sealed(key, blob, ad) == b"shares"
    for wrong in (
        crypto.share_associated_data(os.urandom(16), 3, 9),  # another round
        crypto.share_associated_data(round_id, 9, 3),  # reversed direction
        crypto.share_associated_data(round_id, 3, 10),  # another receiver
    ):
        with pytest.raises(ShareAuthenticationError):
            crypto.open_sealed(key, blob, wrong)
    with pytest.raises(ShareAuthenticationError):
        crypto.open_sealed(os.urandom(32), blob, ad)


# -- wire format --------------------------------------------------------------------------


def _examples() -> list[Message]:
    rid, pk = os.urandom(16), PublicKeys(7, os.urandom(32), os.urandom(32))
    share = EncryptedShare(7, 9, os.urandom(92))
    revealed = RevealedShare(4, os.urandom(31) + b"\x00")
    return [
        RoundSetup(rid, os.urandom(32), (1, 4, 7, 9), 3, 2, 100, 0.25, 16, 32, True),
        AdvertiseKeys(rid, pk),
        KeyBroadcast(rid, 9, (pk, PublicKeys(1, os.urandom(32), os.urandom(32)))),
        ShareKeys(rid, 7, (share,)),
        ShareBundle(rid, 9, (share, share)),
        MaskedInput(rid, 7, os.urandom(400)),
        UnmaskRequest(rid, 9, (1, 7), (4,)),
        UnmaskResponse(rid, 9, (revealed,), ()),
    ]


@pytest.mark.parametrize("message", _examples(), ids=lambda m: type(m).__name__)
def test_messages_round_trip_and_reject_malformed_bytes(message: Message) -> None:
    data = message.to_bytes()
    assert type(message).from_bytes(data) == message
    assert decode_message(data) == message
    with pytest.raises(MessageFormatError, match="truncated"):
        decode_message(data[:-1])
    with pytest.raises(MessageFormatError, match="trailing"):
        decode_message(data + b"\x00")
    with pytest.raises(MessageFormatError, match="version"):
        decode_message(data[:4] + b"\x02" + data[5:])
    other = MaskedInput if not isinstance(message, MaskedInput) else AdvertiseKeys
    with pytest.raises(MessageFormatError, match="expected a"):
        other.from_bytes(data)


def test_config_validation_is_one_clear_line() -> None:
    with pytest.raises(ValueError, match="quantization_bits must be in"):
        SecAggConfig(quantization_bits=40, modulus_bits=32)
    with pytest.raises(ValueError, match="clip_range"):
        SecAggConfig(clip_range=0.0)
