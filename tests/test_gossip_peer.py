"""The pieces of a gossip peer process: renormalised mixing, the wire, the inbox, the
service's identity and bound checks (in this process, over real gRPC on loopback)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedloom.engine.grpc.auth import TokenStore, add_token
from fedloom.gossip.topology import adjacency, metropolis_hastings, renormalised_row
from fedloom.gossip.transport import (
    ACCEPTED,
    DUPLICATE,
    EARLY,
    LATE,
    PUSH,
    UNREACHABLE,
    Inbox,
    MessageLedger,
    MessageRejectedError,
    Neighbours,
    PeerService,
    decode_model,
    encode_model,
    max_push_bytes,
    parse_peers,
    start_peer_server,
)

from .deploy_helpers import free_port


def test_missing_neighbours_weight_goes_to_the_peer_itself_by_hand() -> None:
    # Ring of 4: every degree is 2, so W_ij = 1/3 on each edge and W_ii = 1/3.
    w = metropolis_hastings(adjacency("ring", 4))
    np.testing.assert_allclose(renormalised_row(w, 0, {1, 3}), [1 / 3, 1 / 3, 0, 1 / 3])
    np.testing.assert_allclose(renormalised_row(w, 0, {1}), [2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(renormalised_row(w, 0, set()), [1, 0, 0, 0])
    # Complete graph on 5: all weights 1/5; two neighbours missing give 3/5 to itself.
    w5 = metropolis_hastings(adjacency("complete", 5))
    np.testing.assert_allclose(renormalised_row(w5, 2, {0, 4}), [0.2, 0, 0.6, 0, 0.2])
    # Path 0 - 1 - 2 (weights 1/3, see test_gossip): peer 1 hears only peer 2.
    path = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)
    np.testing.assert_allclose(
        renormalised_row(metropolis_hastings(path), 1, {2}), [0, 2 / 3, 1 / 3]
    )


@pytest.mark.parametrize("topology", ["ring", "torus", "exponential", "complete"])
def test_a_dead_peer_leaves_the_survivors_a_symmetric_doubly_stochastic_matrix(
    topology: str,
) -> None:
    n, dead = 16, 5
    a = adjacency(topology, n)
    w = metropolis_hastings(a)
    alive = [i for i in range(n) if i != dead]
    rows = []
    for i in alive:
        heard = {int(j) for j in np.flatnonzero(a[i]) if j != dead}
        rows.append(renormalised_row(w, i, heard)[alive])
    m = np.array(rows)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    np.testing.assert_allclose(m, m.T)
    assert (m >= 0).all()
    # Repeated mixing reaches the survivors' exact average.
    x = np.random.default_rng(1).normal(size=(n - 1, 3))
    target = x.mean(axis=0)
    for _ in range(3000):
        x = m @ x
    np.testing.assert_allclose(x, np.tile(target, (n - 1, 1)), atol=1e-6)


def test_wire_round_trip_and_every_refusal_reason() -> None:
    v = np.arange(6, dtype=np.float32)
    data = encode_model(sender=3, rnd=7, vector=v)
    sender, rnd, back = decode_model(data, dimension=6)
    assert (sender, rnd) == (3, 7) and np.array_equal(back, v)

    def reason(payload: bytes, dimension: int = 6) -> str:
        with pytest.raises(MessageRejectedError) as err:
            decode_model(payload, dimension=dimension)
        return err.value.reason

    assert reason(encode_model(sender=3, rnd=7, vector=np.zeros(5, np.float32))) == "shape"
    assert reason(data, dimension=7) == "shape"
    assert reason(data + b"\0" * 4) == "shape"
    assert reason(b"\0" * (max_push_bytes(6) + 1)) == "oversize"
    assert reason(b"XXXX" + data[4:]) == "malformed"
    assert reason(data[:5]) == "malformed"
    for bad in (np.nan, np.inf, -np.inf):
        assert reason(encode_model(sender=3, rnd=7, vector=np.array([0, 1, bad, 3, 4, 5]))) == (
            "non_finite"
        )
    header = b'{"v": 1, "sender": "3", "round": 7, "size": 6}'
    assert reason(b"FLGP" + len(header).to_bytes(4, "little") + header + v.tobytes()) == (
        "malformed"
    )
    header = b'{"v": 2, "sender": 3, "round": 7, "size": 6}'
    assert reason(b"FLGP" + len(header).to_bytes(4, "little") + header + v.tobytes()) == ("version")


def test_peer_lists_from_a_file_or_inline(tmp_path: Path) -> None:
    f = tmp_path / "peers.txt"
    f.write_text("# the run\n0 10.0.0.1:7000\n1 10.0.0.2:7000 hospital-b  # a comment\n")
    peers = parse_peers(str(f))
    assert peers[0].identity == "peer-0" and peers[1].identity == "hospital-b"
    assert peers[1].address == "10.0.0.2:7000"
    assert parse_peers("0=127.0.0.1:1,1=127.0.0.1:2")[1].address == "127.0.0.1:2"
    for bad, words in [
        ("0=a:1,2=b:2", "0..1"),
        ("0=a:1,0=b:2", "twice"),
        ("0=nohost", "HOST:PORT"),
        ("nothing", "neither a file"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_peers(bad)


def test_inbox_keeps_a_window_of_rounds_and_stops_waiting_for_gone_neighbours() -> None:
    inbox = Inbox(lookahead=2)
    v = np.zeros(3, np.float32)
    assert inbox.put(1, 1, v, 10) == ACCEPTED
    assert inbox.put(1, 1, v, 10) == DUPLICATE
    assert inbox.put(2, 3, v, 10) == ACCEPTED
    assert inbox.put(2, 4, v, 10) == EARLY
    got = inbox.wait(
        1, {1}, accept={1, 2}, deadline=time.monotonic() + 60, still_expected=lambda w: w
    )
    assert set(got) == {1}
    inbox.finish(1)
    assert inbox.put(1, 1, v, 10) == LATE
    # Neighbour 1 never sends round 2; once a probe says it is gone the wait ends long
    # before the deadline, with what did arrive.
    assert inbox.put(3, 2, v, 10) == ACCEPTED
    started = time.monotonic()
    got = inbox.wait(
        2,
        {1, 3},
        accept={1, 3},
        deadline=started + 60,
        still_expected=lambda waiting: waiting - {1},
        poll_s=0.01,
    )
    assert set(got) == {3} and time.monotonic() - started < 30
    # A silent neighbour that the probe keeps "alive" costs the round timeout.
    inbox.finish(2)
    got = inbox.wait(
        3, {1}, accept={1, 2}, deadline=time.monotonic() + 0.2, still_expected=lambda w: w
    )
    assert set(got) == {2}  # round 3 from peer 2 had arrived early; peer 1 never came


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[PeerService, dict[str, str], str]]:
    """Peer 0 of a 4-peer ring (neighbours 1 and 3) with token identities, plaintext on
    loopback; yields the service, each identity's token, and the address."""
    tokens_file = tmp_path / "tokens"
    tokens = {f"peer-{i}": add_token(tokens_file, f"peer-{i}") for i in range(4)}
    tokens["stranger"] = "fl_not-a-token"
    store = TokenStore(tokens_file)
    address = f"127.0.0.1:{free_port()}"
    peers = parse_peers(",".join(f"{i}={address}" for i in range(4)))
    ring = adjacency("ring", 4)

    def identify(context: grpc.ServicerContext) -> str | None:
        bearer = dict(context.invocation_metadata()).get("authorization", "")
        return store.check(str(bearer).removeprefix("Bearer "))

    service = PeerService(
        peer_id=0,
        dimension=6,
        inbox=Inbox(lookahead=2),
        ledger=MessageLedger(),
        peers=peers,
        identify=identify,
        is_neighbour=lambda sender, rnd: bool(ring[0, sender]) and rnd <= 5,
    )
    server, _ = start_peer_server(address, service, None, max_workers=2)
    try:
        yield service, tokens, address
    finally:
        server.stop(0).wait(5)


def _push(address: str, token: str, payload: bytes) -> tuple[str, grpc.StatusCode | None]:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(PUSH)
        try:
            reply = call(payload, timeout=30, metadata=(("authorization", f"Bearer {token}"),))
            return reply.decode(), None
        except grpc.RpcError as err:
            return "", err.code()


def test_service_refuses_impostors_strangers_and_bad_models_and_counts_them(
    served: tuple[PeerService, dict[str, str], str],
) -> None:
    service, tokens, address = served
    good = np.ones(6, np.float32)
    assert _push(address, tokens["peer-1"], encode_model(sender=1, rnd=1, vector=good)) == (
        ACCEPTED,
        None,
    )
    cases = [
        # peer 3 is a neighbour, but claims to be peer 1
        ("peer-3", encode_model(sender=1, rnd=1, vector=good), "impersonation"),
        ("stranger", encode_model(sender=3, rnd=1, vector=good), "unauthenticated"),
        ("peer-2", encode_model(sender=2, rnd=1, vector=good), "not_neighbour"),
        ("peer-3", encode_model(sender=3, rnd=9, vector=good), "not_neighbour"),
        ("peer-3", encode_model(sender=3, rnd=1, vector=good * np.nan), "non_finite"),
        ("peer-3", encode_model(sender=3, rnd=1, vector=np.ones(7, np.float32)), "shape"),
        ("peer-3", encode_model(sender=3, rnd=1, vector=good) + bytes(1100), "oversize"),
    ]
    for name, payload, reason in cases:
        status, code = _push(address, tokens[name], payload)
        assert status == "" and code is not None, reason
        assert service.ledger.snapshot().get(reason, 0) >= 1, reason
    assert _push(address, tokens["peer-3"], encode_model(sender=3, rnd=1, vector=good))[0] == (
        ACCEPTED
    )
    got = service.inbox.wait(
        1, {1, 3}, accept={1, 3}, deadline=time.monotonic() + 30, still_expected=lambda w: w
    )
    assert set(got) == {1, 3}
    counts = service.ledger.snapshot()
    assert sum(counts.values()) == len(cases)


def test_a_push_to_a_peer_that_is_not_there_is_unreachable_at_once() -> None:
    peers = parse_peers(f"0=127.0.0.1:{free_port()},1=127.0.0.1:{free_port()}")
    neighbours = Neighbours(peers, own_id=0, credentials=None, token="x", dimension=6)
    try:
        started = time.monotonic()
        payload = encode_model(sender=0, rnd=1, vector=np.zeros(6, np.float32))
        assert neighbours.push_all([1], payload, timeout=30) == {1: UNREACHABLE}
        assert neighbours.ping(1, timeout=30) == UNREACHABLE
        assert time.monotonic() - started < 20
    finally:
        neighbours.close()
