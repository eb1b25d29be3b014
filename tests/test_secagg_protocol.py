"""SecAgg+ end to end: exact sums under dropouts, aborts, tampering, replay, uniformity."""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from fedloom.privacy.secagg import (
    STAGES,
    KeyBroadcast,
    MaskedInput,
    Message,
    ProtocolViolationError,
    QuantizationOverflowError,
    RoundAbortedError,
    RoundSetup,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    ShareAuthenticationError,
    ShareBundle,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
    ring,
    run_secagg_round,
)
from fedloom.privacy.secagg import quantize as q

Entropy = Callable[[int], bytes]


def seeded_entropy(seed: int) -> Entropy:
    """A reproducible AES-CTR byte stream standing in for os.urandom (tests only)."""
    key = hashlib.sha256(b"fedloom-secagg-test" + seed.to_bytes(8, "big")).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return lambda n: encryptor.update(bytes(n))


def make_updates(n: int, d: int, seed: int = 0, scale: float = 0.7) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Ids are not 0..n-1 on purpose, and some coordinates exceed the clip range.
    return {3 * i + 1: rng.normal(0.0, scale, d).astype(np.float32) for i in range(n)}


def expected_integer_sum(
    updates: Mapping[int, np.ndarray], contributors: typing.Iterable[int], config: SecAggConfig
) -> np.ndarray:
    """The plain sum of the SAME deterministic quantization the clients apply."""
    ints = [
        q.quantize(updates[c], config.clip_range, config.quantization_bits) for c in contributors
    ]
    return np.asarray(np.sum(ints, axis=0, dtype=np.int64))


def assert_exact(
    result_sum: np.ndarray, quantized_sum: np.ndarray, expected: np.ndarray, config: SecAggConfig
) -> None:
    np.testing.assert_array_equal(quantized_sum, expected)
    dequantized = q.dequantize(expected, config.clip_range, config.quantization_bits)
    np.testing.assert_array_equal(result_sum, dequantized)
    assert result_sum.dtype == np.float32


# -- exact sums under dropouts ------------------------------------------------------------

# n = 24 and 30% dropouts: 7 clients drop. With k = 16 and t = 9, even 7 dropouts inside
# one neighbourhood leave 9 >= t survivors, so every random draw must succeed; the
# complete graph (k = 23, t = 12) likewise keeps 16 >= 12.
GRAPHS = {"sparse-k16": 16, "complete-k23": 23}


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_unmasked_sum_is_exact_with_dropouts_at_each_stage(
    graph: str, stage: Stage, rate: float
) -> None:
    n, d = 24, 40
    updates = make_updates(n, d, seed=7)
    ids = sorted(updates)
    rng = np.random.default_rng([GRAPHS[graph], STAGES.index(stage), round(rate * 100)])
    dropped = [int(c) for c in rng.choice(ids, size=round(rate * n), replace=False)]
    config = SecAggConfig(clip_range=1.0, degree=GRAPHS[graph])

    result = run_secagg_round(updates, config, dropouts={stage: dropped})

    expected_contributors = ids if stage is Stage.UNMASKING else sorted(set(ids) - set(dropped))
    agg = result.aggregate
    assert agg.contributors == tuple(expected_contributors)
    assert result.num_contributors == len(expected_contributors)
    assert agg.dropped_at[stage] == tuple(sorted(dropped))
    expected = expected_integer_sum(updates, expected_contributors, config)
    assert_exact(result.sum, agg.quantized_sum, expected, config)
    # And close to the float sum of the clipped inputs: half a step per client.
    clipped = sum(np.clip(updates[c], -1.0, 1.0).astype(np.float64) for c in expected_contributors)
    step = config.clip_range / q.max_level(config.quantization_bits)
    assert np.max(np.abs(result.sum - clipped)) <= len(expected_contributors) * step / 2 + 1e-5


def test_log_degree_graph_survives_dropouts_at_every_stage_at_once() -> None:
    # n = 30: default k = 2*ceil(log2 30) = 10, t = 6. One dropout per stage (4 in all)
    # can remove at most 4 = k - t of any neighbourhood, so the round must succeed.
    updates = make_updates(30, 25, seed=3)
    ids = sorted(updates)
    drops = {Stage.ADVERTISE_KEYS: [ids[0]], Stage.SHARE_KEYS: [ids[5]],
             Stage.MASKED_INPUT: [ids[11]], Stage.UNMASKING: [ids[17]]}  # fmt: skip
    config = SecAggConfig()
    result = run_secagg_round(updates, config, dropouts=drops)
    contributors = sorted(set(ids) - {ids[0], ids[5], ids[11]})
    assert result.aggregate.contributors == tuple(contributors)
    assert {s: list(v) for s, v in result.aggregate.dropped_at.items()} == drops
    expected = expected_integer_sum(updates, contributors, config)
    assert_exact(result.sum, result.aggregate.quantized_sum, expected, config)
    # Cost is logarithmic: a client talks to its 10 neighbours, not to 29 peers.
    assert max(result.bytes_received[c][Stage.ADVERTISE_KEYS] for c in ids) < 2000


def test_hundred_thousand_parameter_vector() -> None:
    updates = make_updates(16, 100_000, seed=11, scale=0.05)
    ids = sorted(updates)
    config = SecAggConfig(clip_range=0.5)
    result = run_secagg_round(updates, config, dropouts={Stage.MASKED_INPUT: ids[:2]})
    expected = expected_integer_sum(updates, ids[2:], config)
    assert_exact(result.sum, result.aggregate.quantized_sum, expected, config)
    # The masked vector dominates upload: 4 bytes per coordinate for a 32-bit modulus.
    assert result.bytes_sent[ids[5]][Stage.MASKED_INPUT] == 100_000 * 4 + 34


def test_stochastic_rounding_round_is_within_one_step_per_client() -> None:
    updates = make_updates(12, 500, seed=5, scale=0.3)
    config = SecAggConfig(clip_range=1.0, quantization_bits=8, rounding="stochastic")
    result = run_secagg_round(updates, config)
    plain = sum(np.clip(v, -1, 1).astype(np.float64) for v in updates.values())
    step = 1.0 / q.max_level(8)
    error = np.abs(result.sum - plain)
    assert np.max(error) < 12 * step
    # Unbiased: the mean error over coordinates is far below one step.
    assert abs(float(np.mean(result.sum - plain))) < 0.5 * step


# -- aborts -------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
def test_too_many_dropouts_in_a_neighbourhood_abort_naming_the_cause(stage: Stage) -> None:
    # Complete graph on 12 clients: k = 11, t = 6. Six dropouts leave each survivor
    # 5 live neighbours, one short of the threshold.
    updates = make_updates(12, 8)
    ids = sorted(updates)
    config = SecAggConfig(degree=11, min_clients=2)
    with pytest.raises(RoundAbortedError) as info:
        run_secagg_round(updates, config, dropouts={stage: ids[:6]})
    err = info.value
    assert (err.stage, err.survived, err.required) == (stage, 5, 6)
    assert err.client in ids
    assert f"aborted at stage {stage.value}" in str(err)
    assert "5 of client" in str(err) and "threshold 6" in str(err)


@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
def test_fewer_clients_than_the_minimum_abort(stage: Stage) -> None:
    updates = make_updates(24, 8)
    config = SecAggConfig(degree=16, min_clients=20)
    with pytest.raises(
        RoundAbortedError, match=rf"stage {stage.value}: 19 of 24 clients survived, minimum 20"
    ):
        run_secagg_round(updates, config, dropouts={stage: sorted(updates)[:5]})


def test_sparse_neighbourhood_losing_its_threshold_aborts() -> None:
    updates = make_updates(20, 8)
    ids = sorted(updates)
    config = SecAggConfig(degree=6, min_clients=2)  # t = 4
    server = SecAggServer(ids, 8, config)
    victim = ids[4]
    lost = sorted(server.neighbours(victim))[:3]  # victim keeps 3 < 4 live neighbours
    with pytest.raises(RoundAbortedError) as info:
        run_secagg_round(
            updates,
            config,
            dropouts={Stage.MASKED_INPUT: lost},
            server_factory=lambda *args, **kwargs: server,
        )
    err = info.value
    assert err.stage is Stage.MASKED_INPUT and err.required == 4
    assert err.client is not None
    assert err.survived == len(server.neighbours(err.client) - set(lost)) < 4


# -- tampering and replay -----------------------------------------------------------------


def _flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize("where", [0, 20, -1], ids=["nonce", "body", "tag"])
def test_tampered_share_is_detected(where: int) -> None:
    updates = make_updates(10, 4)
    target = sorted(updates)[3]

    def tamper(message: Message) -> Message:
        if isinstance(message, ShareBundle) and message.recipient == target:
            first = message.shares[0]
            bad = dataclasses.replace(first, ciphertext=_flip_bit(first.ciphertext, where))
            return dataclasses.replace(message, shares=(bad, *message.shares[1:]))
        return message

    with pytest.raises(
        ShareAuthenticationError, match=rf"to client {target} failed authentication"
    ):
        run_secagg_round(updates, intercept=tamper)


def test_share_replayed_from_a_previous_round_is_detected() -> None:
    updates = make_updates(10, 4)
    old: dict[tuple[int, int], bytes] = {}

    def record(message: Message) -> Message:
        if isinstance(message, ShareBundle):
            old.update({(e.sender, e.receiver): e.ciphertext for e in message.shares})
        return message

    run_secagg_round(updates, intercept=record)
    target = sorted(updates)[2]

    def replay(message: Message) -> Message:
        if isinstance(message, ShareBundle) and message.recipient == target:
            entries = tuple(
                dataclasses.replace(e, ciphertext=old[(e.sender, e.receiver)])
                if (e.sender, e.receiver) in old
                else e
                for e in message.shares
            )
            return dataclasses.replace(message, shares=entries)
        return message

    with pytest.raises(ShareAuthenticationError, match=rf"to client {target} failed"):
        run_secagg_round(updates, intercept=replay)


def test_share_redirected_to_another_recipient_is_detected() -> None:
    updates = make_updates(8, 4)  # default degree for 8 clients is 6 < 7
    sent: dict[tuple[int, int], bytes] = {}
    ids = sorted(updates)

    def redirect(message: Message) -> Message:
        if isinstance(message, ShareKeys):
            sent.update({(e.sender, e.receiver): e.ciphertext for e in message.shares})
        if isinstance(message, ShareBundle) and message.recipient == ids[0]:
            entry = message.shares[0]
            # The same sender's ciphertext for a different receiver, relabelled.
            other = next(r for (s, r) in sent if s == entry.sender and r != ids[0])
            forged = dataclasses.replace(entry, ciphertext=sent[(entry.sender, other)])
            return dataclasses.replace(message, shares=(forged, *message.shares[1:]))
        return message

    with pytest.raises(ShareAuthenticationError, match=rf"to client {ids[0]} failed"):
        run_secagg_round(updates, intercept=redirect)


# -- what the server sees -----------------------------------------------------------------


def _top_byte_chi2_pvalue(vector: np.ndarray, modulus_bits: int) -> float:
    top = (vector >> np.uint64(modulus_bits - 8)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    return float(stats.chisquare(counts).pvalue)


def test_masked_vectors_are_indistinguishable_from_uniform() -> None:
    """Chi-square goodness of fit of the top byte over 256 buckets, alpha = 0.001.

    Inputs are highly non-uniform (all zeros, and small Gaussians that quantize to
    values near 0, whose top byte is 0x00 or 0xff). With a seeded entropy source the
    statistic is a fixed number, so the test cannot flake; it also checks that the
    same test rejects the unmasked inputs, so it has power. A KS test of the values
    scaled to [0, 1) against U(0, 1) backs it up.
    """
    d, bits, alpha = 1 << 16, 32, 1e-3
    zeros = {c: np.zeros(d, np.float32) for c in range(6)}
    gauss = {c + 6: v for c, v in enumerate(make_updates(6, d, seed=2, scale=0.01).values())}
    updates = zeros | gauss
    seen: dict[int, np.ndarray] = {}

    def capture(message: Message) -> Message:
        if isinstance(message, MaskedInput):
            seen[message.sender] = ring.decode(message.vector, d, bits)
        return message

    config = SecAggConfig(modulus_bits=bits)
    run_secagg_round(updates, config, entropy=seeded_entropy(1), intercept=capture)
    assert sorted(seen) == sorted(updates)
    for c, masked in seen.items():
        assert _top_byte_chi2_pvalue(masked, bits) > alpha, c
        assert stats.kstest(masked / 2.0**bits, "uniform").pvalue > alpha, c
        plain = ring.reduce(q.quantize(updates[c], 1.0, 16), bits)
        assert _top_byte_chi2_pvalue(plain, bits) < alpha  # the test has power


class RecordingServer(SecAggServer):
    """A server that keeps a copy of every vector it is sent (the tests' wiretap)."""

    received: list[np.ndarray]

    def receive_masked_input(self, message: MaskedInput) -> None:
        self.__dict__.setdefault("received", []).append(
            ring.decode(message.vector, self.setup.vector_length, self.setup.modulus_bits)
        )
        super().receive_masked_input(message)


def test_server_never_holds_an_unmasked_update() -> None:
    updates = make_updates(14, 300, seed=9)
    ids = sorted(updates)
    config = SecAggConfig()
    servers: list[RecordingServer] = []

    def factory(*args: typing.Any, **kwargs: typing.Any) -> SecAggServer:
        servers.append(RecordingServer(*args, **kwargs))
        return servers[-1]

    result = run_secagg_round(
        updates, config, dropouts={Stage.MASKED_INPUT: ids[:3]}, server_factory=factory
    )
    server = servers[0]
    assert len(server.received) == result.num_contributors == 11
    quantized = [ring.reduce(q.quantize(v, 1.0, 16), 32) for v in updates.values()]
    for vector in server.received:
        for plain in quantized:
            assert not np.array_equal(vector, plain)
            assert np.mean(vector == plain) < 0.01
    # The only array state the server keeps is the running masked sum (emptied at the end).
    assert [k for k, v in vars(server).items() if isinstance(v, np.ndarray)] == ["_masked_sum"]


def test_server_has_no_entry_point_for_raw_vectors() -> None:
    for name, method in vars(SecAggServer).items():
        if name.startswith("_") or not callable(method):
            continue
        hints = typing.get_type_hints(method)
        hints.pop("return", None)
        for param, hint in hints.items():
            assert hint is not np.ndarray, (name, param)
            if name.startswith("receive_"):
                assert isinstance(hint, type) and issubclass(hint, Message), (name, param)
    for field in dataclasses.fields(MaskedInput):
        assert field.type in ("bytes", "int"), field


# -- stepping the state machines by hand, as an engine does -------------------------------


class Walk:
    """A round stepped manually up to the unmasking stage, holding back one client."""

    def __init__(self, n: int = 10, d: int = 16, late: int | None = None) -> None:
        self.updates = make_updates(n, d, seed=4)
        self.ids = sorted(self.updates)
        self.config = SecAggConfig()
        self.server = SecAggServer(self.ids, d, self.config)
        self.clients = {c: SecAggClient(c) for c in self.ids}
        for c in self.ids:
            self.server.receive_advertise_keys(self.clients[c].advertise_keys(self.server.setup))
        broadcasts = self.server.broadcast_keys()
        for c in self.ids:
            self.server.receive_share_keys(self.clients[c].share_keys(broadcasts[c]))
        bundles = self.server.route_shares()
        self.held_back: MaskedInput | None = None
        for c in self.ids:
            masked = self.clients[c].masked_input(bundles[c], self.updates[c])
            if c == late:
                self.held_back = masked
            else:
                self.server.receive_masked_input(masked)
        self.requests = self.server.unmask_requests()

    def finish(self) -> np.ndarray:
        for c, request in self.requests.items():
            self.server.receive_unmask_response(self.clients[c].unmask(request))
        return self.server.finalize().quantized_sum


def test_server_refuses_a_masked_input_after_unmasking_began() -> None:
    walk = Walk(late=4)
    assert walk.held_back is not None
    with pytest.raises(ProtocolViolationError, match="after unmasking began"):
        walk.server.receive_masked_input(walk.held_back)
    contributors = [c for c in walk.ids if c != 4]
    np.testing.assert_array_equal(
        walk.finish(), expected_integer_sum(walk.updates, contributors, walk.config)
    )


def test_client_never_reveals_both_shares_of_a_neighbour() -> None:
    walk = Walk(late=7)
    c = next(c for c, r in walk.requests.items() if 7 in r.dropped)
    request = walk.requests[c]
    client = walk.clients[c]
    first = client.unmask(request)
    assert client.unmask(request) == first  # a retransmitted request: the same answer
    assert 7 in {e.owner for e in first.pairwise_key_shares}
    assert 7 not in {e.owner for e in first.self_mask_shares}
    flipped = UnmaskRequest(request.round_id, c, (*request.survivors, 7), ())
    with pytest.raises(ProtocolViolationError, match="client 7"):
        client.unmask(flipped)
    # A fresh client refuses a request that names a neighbour as both.
    other = next(x for x in walk.requests if x != c and walk.requests[x].survivors)
    r = walk.requests[other]
    both = UnmaskRequest(r.round_id, other, r.survivors, (*r.dropped, r.survivors[0]))
    with pytest.raises(ProtocolViolationError, match="both as surviving and as dropped"):
        walk.clients[other].unmask(both)


def test_client_refuses_to_unmask_with_too_few_surviving_neighbours() -> None:
    walk = Walk()
    c, request = next(iter(walk.requests.items()))
    t = walk.server.setup.threshold
    starved = UnmaskRequest(
        request.round_id,
        c,
        request.survivors[: t - 1],
        request.dropped + request.survivors[t - 1 :],
    )
    with pytest.raises(RoundAbortedError, match="stage unmasking"):
        walk.clients[c].unmask(starved)


def test_server_refuses_a_response_with_unrequested_shares() -> None:
    walk = Walk(late=1)
    c = next(c for c, r in walk.requests.items() if 1 in r.dropped)
    honest = walk.clients[c].unmask(walk.requests[c])
    # Swap kinds: a self-mask share for the dropped client 1 must be refused.
    forged = UnmaskResponse(
        honest.round_id,
        c,
        honest.self_mask_shares + honest.pairwise_key_shares,
        (),
    )
    with pytest.raises(ProtocolViolationError, match="not exactly those requested"):
        walk.server.receive_unmask_response(forged)


def test_state_machines_enforce_order_and_round() -> None:
    walk = Walk()
    round_id = walk.server.round_id
    fresh = SecAggClient(walk.ids[0])
    with pytest.raises(ProtocolViolationError, match="cannot take a KeyBroadcast in phase new"):
        fresh.share_keys(KeyBroadcast(round_id, walk.ids[0], ()))
    with pytest.raises(ProtocolViolationError, match="server cannot take the end of round 0"):
        walk.server.broadcast_keys()
    other = SecAggServer(walk.ids, 16, walk.config)
    advert = SecAggClient(walk.ids[0]).advertise_keys(walk.server.setup)
    with pytest.raises(ProtocolViolationError, match="another round"):
        other.receive_advertise_keys(advert)
    other.receive_advertise_keys(SecAggClient(walk.ids[0]).advertise_keys(other.setup))
    with pytest.raises(ProtocolViolationError, match="already sent"):
        other.receive_advertise_keys(SecAggClient(walk.ids[0]).advertise_keys(other.setup))
    with pytest.raises(ProtocolViolationError, match="not part of this round"):
        SecAggClient(999).advertise_keys(other.setup)
    # Clients derive the graph themselves and refuse keys from a non-neighbour.
    c = walk.ids[0]
    (stranger,) = set(walk.ids) - walk.server.neighbours(c) - {c}  # n = 10, k = 8
    client = SecAggClient(c)
    advert = client.advertise_keys(walk.server.setup)
    forged = KeyBroadcast(round_id, c, (dataclasses.replace(advert.keys, client_id=stranger),))
    with pytest.raises(ProtocolViolationError, match=f"from client {stranger}, which is not"):
        client.share_keys(forged)


# -- overflow guard and freshness ---------------------------------------------------------


def test_overflow_guard_refuses_and_the_boundary_is_exact() -> None:
    # modulus 2^12, M = 127: 16 clients give at most 2032 < 2048; 17 could give 2159.
    config = SecAggConfig(modulus_bits=12, quantization_bits=8, clip_range=1.0)
    with pytest.raises(QuantizationOverflowError, match=r"17 clients .* could overflow"):
        SecAggServer(list(range(17)), 4, config)
    for sign in (1.0, -1.0):
        updates = {c: np.full(4, 5.0 * sign, np.float32) for c in range(16)}  # clipped to ±1
        result = run_secagg_round(updates, config)
        np.testing.assert_array_equal(result.aggregate.quantized_sum, np.full(4, sign * 2032))
        np.testing.assert_array_equal(result.sum, np.full(4, sign * 16.0, np.float32))
    # The tightest case: M = 1 and 127 clients at +r sum to 127 = 2^7 - 1 in Z_2^8.
    tight = SecAggConfig(modulus_bits=8, quantization_bits=2, degree=8)
    with pytest.raises(QuantizationOverflowError, match="128 clients"):
        SecAggServer(list(range(128)), 2, tight)
    for sign in (1.0, -1.0):
        updates = {c: np.full(2, sign, np.float32) for c in range(127)}
        result = run_secagg_round(updates, tight)
        np.testing.assert_array_equal(result.aggregate.quantized_sum, [sign * 127] * 2)


def test_seeds_and_masks_are_fresh_every_round() -> None:
    updates = make_updates(10, 64, seed=8)
    rounds: list[tuple[bytes, bytes, dict[int, bytes], np.ndarray]] = []
    for _ in range(2):
        masked: dict[int, bytes] = {}
        setups: list[bytes] = []

        def capture(
            message: Message, masked: dict[int, bytes] = masked, setups: list[bytes] = setups
        ) -> Message:
            if isinstance(message, MaskedInput):
                masked[message.sender] = message.vector
            if isinstance(message, RoundSetup):
                setups.append(message.round_id + message.graph_seed)
            return message

        result = run_secagg_round(updates, intercept=capture)
        rounds.append((setups[0][:16], setups[0][16:], masked, result.aggregate.quantized_sum))
    (id_a, seed_a, masked_a, sum_a), (id_b, seed_b, masked_b, sum_b) = rounds
    assert id_a != id_b and seed_a != seed_b
    for c in updates:
        assert masked_a[c] != masked_b[c]  # same input, different masks
    assert len(set(masked_a.values())) == len(updates)
    np.testing.assert_array_equal(sum_a, sum_b)
