"""The CKKS protocol as engines run it: key holder, clients and server exchanging bytes."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="CKKS needs the 'he' extra (TenSEAL)")

from fedloom.privacy.he import CiphertextFormatError, CKKSParams
from fedloom.privacy.he_protocol import (
    KEY_HOLDER,
    DecryptedSum,
    EncryptRequest,
    HEExchange,
    HEKeyHolderParticipant,
    HERoundAbortedError,
    HEStage,
    KeyRequest,
    encrypt_for_round,
    exchange_he_in_process,
    reply_limit,
    serve_he_round,
)

LENGTH = 5000  # two ciphertexts of 4096 slots


def _updates(n: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.normal(size=LENGTH).astype(np.float32) for c in range(n)}


def _plain_sum(updates: Mapping[int, np.ndarray], ids: list[int]) -> np.ndarray:
    return np.sum([updates[c].astype(np.float64) for c in ids], axis=0)


def _recording(exchange: HEExchange, log: list[tuple[HEStage, int, int]]) -> HEExchange:
    def wrapped(stage: HEStage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        replies = exchange(stage, outgoing)
        log.extend((stage, who, len(data)) for who, data in replies.items())
        return replies

    return wrapped


def test_round_sum_equals_the_plain_sum_and_replies_fit_their_limits() -> None:
    updates = _updates(6)
    holder = HEKeyHolderParticipant(min_contributors=2)
    seen: list[tuple[HEStage, int, int]] = []
    result = serve_he_round(
        3, list(updates), LENGTH, _recording(exchange_he_in_process(holder, updates), seen)
    )
    want = _plain_sum(updates, list(updates))
    assert result.contributors == tuple(range(6))
    assert np.linalg.norm(result.sum - want) / np.linalg.norm(want) < 1e-6
    assert holder.decryptions == 1
    public = next(n for s, w, n in seen if s is HEStage.KEYGEN)
    assert public < reply_limit(HEStage.KEYGEN, LENGTH)
    assert result.bytes_up == sum(n for _, _, n in seen)
    # Every encrypt reply is within the limit a transport enforces, and not far below it.
    holder2 = HEKeyHolderParticipant()
    context = holder2.respond(HEStage.KEYGEN, KeyRequest(1, LENGTH).to_bytes())
    limit = reply_limit(HEStage.ENCRYPT, LENGTH, context)
    sizes = [n for s, _, n in seen if s is HEStage.ENCRYPT]
    assert all(limit // 2 < n <= limit for n in sizes), (sizes, limit)
    assert [n for s, _, n in seen if s is HEStage.DECRYPT] == [reply_limit(HEStage.DECRYPT, LENGTH)]


def test_clients_that_do_not_answer_are_left_out() -> None:
    updates = _updates(5)
    inner = exchange_he_in_process(HEKeyHolderParticipant(), updates)

    def lossy(stage: HEStage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        replies = inner(stage, outgoing)
        if stage is HEStage.ENCRYPT:
            replies.pop(1)
            replies[3] = replies[3][:-10]  # truncated: rejected, not added
        return replies

    result = serve_he_round(1, list(updates), LENGTH, lossy)
    assert result.contributors == (0, 2, 4)
    want = _plain_sum(updates, [0, 2, 4])
    assert np.linalg.norm(result.sum - want) / np.linalg.norm(want) < 1e-6


def test_key_holder_decrypts_each_key_once() -> None:
    updates = _updates(3)
    holder = HEKeyHolderParticipant()
    captured: dict[str, bytes] = {}
    inner = exchange_he_in_process(holder, updates)

    def spy(stage: HEStage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        if stage is HEStage.DECRYPT:
            captured["aggregate"] = outgoing[KEY_HOLDER]
        return inner(stage, outgoing)

    serve_he_round(1, list(updates), LENGTH, spy)
    with pytest.raises(CiphertextFormatError, match="already used"):
        holder.respond(HEStage.DECRYPT, captured["aggregate"])


def test_key_holder_refuses_a_sum_of_too_few_contributions() -> None:
    updates = _updates(3)
    holder = HEKeyHolderParticipant(min_contributors=3)
    inner = exchange_he_in_process(holder, updates)

    def two_only(stage: HEStage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        replies = inner(stage, outgoing)
        if stage is HEStage.ENCRYPT:
            replies.pop(0)
        return replies

    with pytest.raises(HERoundAbortedError, match="did not decrypt") as aborted:
        serve_he_round(1, list(updates), LENGTH, two_only)
    assert holder.decryptions == 0
    assert aborted.value.bytes_up > 0 and aborted.value.bytes_down > 0  # what was sent


def test_a_silent_key_holder_aborts_the_round_naming_it() -> None:
    def silent(stage: HEStage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        return {}

    with pytest.raises(HERoundAbortedError, match="key holder did not answer"):
        serve_he_round(1, [0, 1], LENGTH, silent)


def test_nobody_contributing_aborts_the_round() -> None:
    inner = exchange_he_in_process(HEKeyHolderParticipant(), _updates(2))

    def no_clients(stage: HEStage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        return {} if stage is HEStage.ENCRYPT else inner(stage, outgoing)

    with pytest.raises(HERoundAbortedError, match="no client"):
        serve_he_round(1, [0, 1], LENGTH, no_clients)


def test_clients_refuse_a_sum_that_could_overflow_the_capacity() -> None:
    holder = HEKeyHolderParticipant()
    context = holder.respond(HEStage.KEYGEN, KeyRequest(1, 4).to_bytes())
    cap = CKKSParams().max_abs
    update = np.array([0.0, 1.0, -2.0, 3.0], dtype=np.float32)
    assert encrypt_for_round(update, EncryptRequest(1, int(cap / 3), context).to_bytes())
    with pytest.raises(ValueError, match="CKKS capacity"):
        encrypt_for_round(update, EncryptRequest(1, int(cap / 3) + 1, context).to_bytes())


def test_messages_round_trip_and_malformed_ones_are_refused() -> None:
    assert KeyRequest.from_bytes(KeyRequest(7, 9).to_bytes()) == KeyRequest(7, 9)
    request = EncryptRequest(2, 3, b"context")
    assert EncryptRequest.from_bytes(request.to_bytes()) == request
    decrypted = DecryptedSum(b"k" * 16, np.arange(3.0), 2.0)
    back = DecryptedSum.from_bytes(decrypted.to_bytes(), 3)
    assert back.key_id == b"k" * 16 and back.weight_total == 2.0
    np.testing.assert_array_equal(back.sum, np.arange(3.0))
    for bad in (b"", b"FLHP" + b"\0" * 14, KeyRequest(1, 1).to_bytes()[:-1]):
        with pytest.raises(CiphertextFormatError):
            KeyRequest.from_bytes(bad)
    with pytest.raises(CiphertextFormatError):
        EncryptRequest.from_bytes(KeyRequest(1, 1).to_bytes() + b"x")  # wrong kind
    with pytest.raises(CiphertextFormatError):
        DecryptedSum.from_bytes(decrypted.to_bytes(), 4)  # wrong length
    nan = DecryptedSum(b"k" * 16, np.array([np.nan]), 1.0).to_bytes()
    with pytest.raises(CiphertextFormatError, match="non-finite"):
        DecryptedSum.from_bytes(nan, 1)
    holder = HEKeyHolderParticipant()
    with pytest.raises(CiphertextFormatError):
        holder.respond(HEStage.ENCRYPT, b"")
    with pytest.raises(CiphertextFormatError):
        holder.respond(HEStage.DECRYPT, b"garbage")
