"""CKKS aggregation over any transport: the key holder, clients and server as byte responders.

:mod:`fedloom.privacy.he` has the cryptographic roles; this module runs them as a
three-stage protocol that an engine moves over whatever it has, exactly like
:mod:`fedloom.privacy.secagg.transport` does for SecAgg+. The engine supplies
``exchange(stage, {participant: bytes}) -> {participant: reply bytes}``; the key holder
is participant :data:`KEY_HOLDER` (-1), clients are their ids.

1. ``keygen`` (server → key holder): a :class:`KeyRequest`; the key holder makes a
   fresh key pair for this round and answers with the public context.
2. ``encrypt`` (server → each client holding an update): an :class:`EncryptRequest`
   carrying the public context; the client answers with its encrypted update.
3. ``decrypt`` (server → key holder): the encrypted sum; the key holder answers with
   the decrypted sum and contribution count (:class:`DecryptedSum`).

What protects the clients from the server is on the key holder's side and under its
operator's control, not the server's: it decrypts **once per key** (so a curious server
cannot have an individual ciphertext decrypted besides the aggregate), and it refuses
to release a sum of fewer than ``min_contributors`` contributions (counted by the
weight slot every client encrypts; see :mod:`fedloom.privacy.he` on what a malicious
server could still forge). The server never holds a secret key: it builds its
:class:`~fedloom.privacy.he.HEAggregator` from the public context bytes only.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fedloom.messages import KEY_HOLDER_ID
from fedloom.privacy.he import (
    CiphertextFormatError,
    CKKSParams,
    HEAggregator,
    HEClient,
    KeyHolder,
    aggregate_key_id,
    update_message_limit,
)
from fedloom.privacy.secagg.transport import CountingExchange, SecureSum

log = logging.getLogger("fedloom.he")

__all__ = [
    "HE_STAGES",
    "KEY_HOLDER",
    "DecryptedSum",
    "EncryptRequest",
    "HEExchange",
    "HEKeyHolderParticipant",
    "HERoundAbortedError",
    "HEStage",
    "KeyRequest",
    "encrypt_for_round",
    "exchange_he_in_process",
    "reply_limit",
    "serve_he_round",
]

#: The key holder's participant id in an exchange (client ids are non-negative).
KEY_HOLDER = KEY_HOLDER_ID

#: Largest public context accepted from a key holder: N = 32768 with the full 881-bit
#: modulus chain serializes to about 8 MB.
MAX_PUBLIC_CONTEXT_BYTES = 32 * 1024 * 1024


class HERoundAbortedError(ValueError):
    """A CKKS round cannot finish (no key holder, no usable ciphertext); it is abandoned.

    ``bytes_up`` / ``bytes_down`` say what the round had put on the wire by then.
    """

    bytes_up = 0
    bytes_down = 0


class HEStage(StrEnum):
    KEYGEN = "keygen"  # key holder: fresh key pair, publish the public context
    ENCRYPT = "encrypt"  # clients: encrypt the held update under that context
    DECRYPT = "decrypt"  # key holder: decrypt the encrypted sum, once


HE_STAGES: tuple[HEStage, ...] = tuple(HEStage)

HEExchange = Callable[[HEStage, Mapping[int, bytes]], dict[int, bytes]]

_MAGIC = b"FLHP"
_VERSION = 1
_KIND_KEY_REQUEST = 1
_KIND_ENCRYPT_REQUEST = 2
_KIND_DECRYPTED = 3
# magic, version, kind, round, vector length
_KEY_REQUEST = struct.Struct("<4sBBQI")
# magic, version, kind, round, most contributors the sum may have
_ENCRYPT_REQUEST = struct.Struct("<4sBBQI")
# magic, version, kind, key id, vector length
_DECRYPTED = struct.Struct("<4sBB16sI")


def _check_header(magic: bytes, version: int, kind: int, want: int, what: str) -> None:
    if magic != _MAGIC or version != _VERSION or kind != want:
        raise CiphertextFormatError(f"not a {what} message of this protocol version")


@dataclass(frozen=True)
class KeyRequest:
    """Server → key holder: make a key for ``round`` and vectors of ``length`` values."""

    round: int
    length: int

    def to_bytes(self) -> bytes:
        return _KEY_REQUEST.pack(_MAGIC, _VERSION, _KIND_KEY_REQUEST, self.round, self.length)

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyRequest:
        if len(data) != _KEY_REQUEST.size:
            raise CiphertextFormatError(f"a key request is {_KEY_REQUEST.size} bytes")
        magic, version, kind, rnd, length = _KEY_REQUEST.unpack(data)
        _check_header(magic, version, kind, _KIND_KEY_REQUEST, "key request")
        if length < 1:
            raise CiphertextFormatError("a key request for an empty vector")
        return cls(rnd, length)


@dataclass(frozen=True)
class EncryptRequest:
    """Server → client: encrypt this round's update under ``public_context``.

    ``max_contributors`` (the clients asked this round) lets a client check that the sum
    cannot exceed the CKKS capacity however the others' updates look, provided each is
    within the same per-value bound: CKKS would wrap around silently.
    """

    round: int
    max_contributors: int
    public_context: bytes

    def to_bytes(self) -> bytes:
        head = _ENCRYPT_REQUEST.pack(
            _MAGIC, _VERSION, _KIND_ENCRYPT_REQUEST, self.round, self.max_contributors
        )
        return head + self.public_context

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptRequest:
        if len(data) <= _ENCRYPT_REQUEST.size:
            raise CiphertextFormatError("an encrypt request without a public context")
        magic, version, kind, rnd, most = _ENCRYPT_REQUEST.unpack_from(data)
        _check_header(magic, version, kind, _KIND_ENCRYPT_REQUEST, "encrypt request")
        if most < 1:
            raise CiphertextFormatError("an encrypt request for zero contributors")
        return cls(rnd, most, bytes(data[_ENCRYPT_REQUEST.size :]))


@dataclass(frozen=True)
class DecryptedSum:
    """Key holder → server: Σ w_i x_i (float64) and Σ w_i, for the key ``key_id``."""

    key_id: bytes
    sum: np.ndarray
    weight_total: float

    def to_bytes(self) -> bytes:
        head = _DECRYPTED.pack(_MAGIC, _VERSION, _KIND_DECRYPTED, self.key_id, self.sum.size)
        body = np.append(self.sum, self.weight_total).astype("<f8", copy=False)
        return head + body.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, length: int) -> DecryptedSum:
        if len(data) != _DECRYPTED.size + 8 * (length + 1):
            raise CiphertextFormatError(
                f"a decrypted sum of {length} values is {_DECRYPTED.size + 8 * (length + 1)} "
                f"bytes, got {len(data)}"
            )
        magic, version, kind, key_id, got = _DECRYPTED.unpack_from(data)
        _check_header(magic, version, kind, _KIND_DECRYPTED, "decrypted sum")
        if got != length:
            raise CiphertextFormatError(f"a decrypted sum of length {got}, expected {length}")
        values = np.frombuffer(data, dtype="<f8", offset=_DECRYPTED.size).astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise CiphertextFormatError("the decrypted sum has non-finite values")
        return cls(bytes(key_id), values[:length], float(values[length]))


def reply_limit(stage: HEStage, length: int, public_context: bytes | None = None) -> int:
    """The most bytes a legitimate reply at ``stage`` can have: larger ones are refused unread."""
    if stage is HEStage.KEYGEN:
        return MAX_PUBLIC_CONTEXT_BYTES
    if stage is HEStage.DECRYPT:
        return _DECRYPTED.size + 8 * (length + 1)
    if public_context is None:
        raise ValueError("the encrypt-stage limit depends on the public context")
    return update_message_limit(public_context, length)


class HEKeyHolderParticipant:
    """The key holder's side: a fresh key per round, each decrypting exactly one sum.

    ``min_contributors`` is the key holder operator's policy, not the server's: a sum of
    fewer contributions (as counted by the encrypted weight slot) is not released.
    Keys of rounds that never reached decryption are kept for the ``max_pending`` most
    recent rounds only.
    """

    def __init__(
        self,
        min_contributors: int = 2,
        params: CKKSParams | None = None,
        output_precision_bits: int | None = 24,
        max_pending: int = 4,
    ) -> None:
        if min_contributors < 1:
            raise ValueError(f"min_contributors must be at least 1, got {min_contributors}")
        self.min_contributors = min_contributors
        self.params = params
        self.output_precision_bits = output_precision_bits
        self.max_pending = max_pending
        self._keys: dict[bytes, tuple[KeyHolder, int]] = {}  # key id -> (holder, length)
        self.decryptions = 0

    def respond(self, stage: HEStage, payload: bytes) -> bytes:
        """Answer the server's message for ``stage`` (raises on anything it must refuse)."""
        if stage is HEStage.KEYGEN:
            request = KeyRequest.from_bytes(payload)
            holder = KeyHolder(self.params, output_precision_bits=self.output_precision_bits)
            self._keys[holder.key_id] = (holder, request.length)
            while len(self._keys) > self.max_pending:
                self._keys.pop(next(iter(self._keys)))  # oldest first (insertion order)
            return holder.public_context
        if stage is HEStage.DECRYPT:
            key_id = aggregate_key_id(payload)
            entry = self._keys.pop(key_id, None)  # one decryption per key, even if it fails
            if entry is None:
                raise CiphertextFormatError(
                    "no key for this aggregate: unknown, or already used for a decryption"
                )
            holder, length = entry
            total, weight = holder.decrypt_weighted(payload, length)
            if weight < self.min_contributors - 0.5:
                raise CiphertextFormatError(
                    f"the aggregate counts {weight:.0f} contributions; this key holder "
                    f"releases sums of at least {self.min_contributors}"
                )
            self.decryptions += 1
            return DecryptedSum(key_id, total, weight).to_bytes()
        raise CiphertextFormatError(f"the key holder does not answer the {stage} stage")


def encrypt_for_round(update: np.ndarray, payload: bytes) -> bytes:
    """A client's answer to the encrypt stage: its update encrypted with weight 1.

    Refuses when ``max_contributors · max|x|`` could exceed the CKKS capacity, so a
    sum never wraps silently (the clients' analogue of SecAgg+'s overflow guard).
    """
    request = EncryptRequest.from_bytes(payload)
    client = HEClient(request.public_context)
    peak = float(np.max(np.abs(update))) if update.size else 0.0
    bound = request.max_contributors * max(peak, 1.0)  # the weight slot sums to n too
    if bound > client.params.max_abs:
        raise ValueError(
            f"{request.max_contributors} updates of up to {peak:g} per value could sum past "
            f"the CKKS capacity {client.params.max_abs:g}; clip the updates "
            "(privacy.clipping_norm) or sample fewer clients per round"
        )
    return client.encrypt(update)


def serve_he_round(
    rnd: int, client_ids: Sequence[int], vector_length: int, exchange: HEExchange
) -> SecureSum:
    """The server's side of one CKKS round; raises ``HERoundAbortedError`` naming the cause.

    A client whose reply is missing or malformed is left out of the sum (and logged);
    the round aborts if the key holder does not answer, or if nobody contributes.
    """
    counted = CountingExchange(exchange)
    try:
        total, contributors = _he_round(rnd, client_ids, vector_length, counted)
    except HERoundAbortedError as err:  # the bytes were still sent: the round record counts them
        err.bytes_up, err.bytes_down = counted.up, counted.down
        raise
    return SecureSum(total, contributors, counted.up, counted.down)


def _he_round(
    rnd: int, client_ids: Sequence[int], vector_length: int, exchange: HEExchange
) -> tuple[np.ndarray, tuple[int, ...]]:
    """keygen, encrypt, decrypt: the float32 sum and who contributed to it."""
    ids = sorted(client_ids)
    request = KeyRequest(rnd, vector_length).to_bytes()
    public = exchange(HEStage.KEYGEN, {KEY_HOLDER: request}).get(KEY_HOLDER)
    if public is None:
        raise HERoundAbortedError("the CKKS key holder did not answer the key request")
    try:
        aggregator = HEAggregator(public, vector_length)
    except ValueError as err:  # CiphertextFormatError, SecretKeyError
        raise HERoundAbortedError(f"the key holder's public context is unusable: {err}") from err
    encrypt = EncryptRequest(rnd, len(ids), public).to_bytes()
    asked = set(ids)
    for client, data in sorted(exchange(HEStage.ENCRYPT, dict.fromkeys(ids, encrypt)).items()):
        if client not in asked:
            continue
        try:
            aggregator.add(client, data)
        except CiphertextFormatError as err:
            log.warning("ckks: client %d's ciphertext rejected: %s", client, err)
    contributors = tuple(sorted(aggregator.contributors))
    if not contributors:
        raise HERoundAbortedError("no client returned a usable ciphertext")
    reply = exchange(HEStage.DECRYPT, {KEY_HOLDER: aggregator.aggregate()}).get(KEY_HOLDER)
    if reply is None:
        raise HERoundAbortedError(
            "the CKKS key holder did not decrypt the aggregate (it refuses sums of too few "
            "contributions, and each key decrypts once)"
        )
    try:
        decrypted = DecryptedSum.from_bytes(reply, vector_length)
    except CiphertextFormatError as err:
        raise HERoundAbortedError(f"the key holder's reply is unusable: {err}") from err
    if decrypted.key_id != aggregator.key_id or round(decrypted.weight_total) != len(contributors):
        raise HERoundAbortedError(
            f"the key holder decrypted a sum of {decrypted.weight_total:.0f} contributions "
            f"under another key or count; {len(contributors)} were added"
        )
    return decrypted.sum.astype(np.float32), contributors


def exchange_he_in_process(
    key_holder: HEKeyHolderParticipant, updates: Mapping[int, np.ndarray]
) -> HEExchange:
    """An exchange for simulation: every message still goes through its byte encoding."""

    def exchange(stage: HEStage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        replies: dict[int, bytes] = {}
        for who, data in outgoing.items():
            try:
                if who == KEY_HOLDER:
                    replies[who] = key_holder.respond(stage, data)
                else:
                    replies[who] = encrypt_for_round(updates[who], data)
            except ValueError as err:  # CiphertextFormatError included
                log.warning("ckks %s: participant %d did not answer: %s", stage, who, err)
        return replies

    return exchange
