"""Homomorphic aggregation with CKKS (through TenSEAL): an alternative to SecAgg+.

Clients encrypt their updates under a public key; the aggregation server adds the
ciphertexts without being able to read them; a separate key holder decrypts only the
sum. CKKS (Cheon, Kim, Kim, Song 2017, "Homomorphic Encryption for Arithmetic of
Approximate Numbers", ASIACRYPT) encrypts vectors of real numbers and supports
addition of ciphertexts; TenSEAL (Benaissa, Retiat, Cebere, Belfedhal 2021, "TenSEAL: A
Library for Encrypted Tensor Operations Using Homomorphic Encryption", ICLR workshop on
distributed and private ML) wraps Microsoft SEAL's implementation of it.

Roles are engine-neutral and exchange bytes only, like :mod:`fedloom.privacy.secagg`:

- :class:`KeyHolder` creates the key pair, publishes :attr:`KeyHolder.public_context`
  (parameters and public key, never the secret key) and decrypts aggregates with
  :meth:`KeyHolder.decrypt_aggregate` / :meth:`KeyHolder.decrypt_weighted`;
- :class:`HEClient` encrypts one flat update (optionally multiplied by its weight) into
  an update message;
- :class:`HEAggregator` is the server: it is built from the public-context bytes only,
  checks and adds update messages, and emits the aggregate message.

:func:`run_he_round` drives one round in process and counts bytes and seconds per role
(tests and benchmarks); engines run the protocol of :mod:`fedloom.privacy.he_protocol`.

Threat model
------------

- **Who holds the key.** A key holder distinct from the aggregation server: a trusted
  third party, or a designated client (then that client must not see the others'
  ciphertexts; see below). Clients and the server get only the public context. The
  server process never holds a secret key: :class:`HEAggregator` refuses any context
  that contains one, and the tests check that it cannot decrypt.
- **Honest-but-curious server.** It sees only ciphertexts, which are IND-CPA secure
  under the ring-LWE assumption, so it learns nothing about an individual update
  beyond its length and who sent it; it learns the aggregate when the key holder
  returns it (the intended output). Dropouts need no recovery step: whatever arrived is
  summed, unlike SecAgg+'s unmasking round.
- **What collusion breaks it.** Server + key holder colluding (or the secret key
  leaking to the server) exposes every individual update: the trust is in one party,
  where SecAgg+ needs t colluders in a neighbourhood. A client holding the secret key
  can decrypt any other client's ciphertext it intercepts; TLS between clients and
  server prevents the interception, and the server must not forward individual
  ciphertexts. The key holder cannot tell an aggregate from a single client's
  ciphertext (or one padded with encryptions of zero, which the server can make with
  the public key), so this design does not hold against a malicious server; that needs
  threshold decryption (Mouchet, Troncoso-Pastoriza, Bossuat, Hubaux 2021, "Multiparty
  Homomorphic Encryption from Ring-Learning-with-Errors", PoPETs) or proofs, not
  provided.
- **Decryptions can leak the key.** Li & Micciancio 2021 ("On the Security of
  Homomorphic Encryption on Approximate Numbers", EUROCRYPT) show that CKKS decryption
  results reveal the encryption noise and thus, passively, the secret key. Mitigations
  here: a fresh key pair per round (the protocol's key holder and :func:`run_he_round`
  make one every round), so a recovered key opens only that round, and the key holder
  rounds its output to a grid of ``2^-output_precision_bits`` before releasing it. The
  default 2^-24 ≈ 6e-8 is 50x the measured noise standard deviation of one ciphertext
  (1.2e-9) but only 3x that of a sum of 200 (1.8e-8), so it hides less as n grows.
  Rounding is a heuristic; the provable countermeasure (noise flooding) is not
  implemented.
- **Integrity.** CKKS has none: a tampered ciphertext is either rejected when SEAL
  parses it (:class:`CiphertextFormatError`) or decrypts to a wrong aggregate, and a
  substituted valid ciphertext is indistinguishable from the real one. Integrity and
  authentication come from the transport (TLS, client tokens). A client can also poison
  the sum with any in-range vector: there is no range proof, and robust aggregation
  (median, Krum) cannot run on ciphertexts.
- **Precision.** CKKS is approximate. With scale 2^40 the raw decryption error per
  value is about 1e-9 for one ciphertext and grows like sqrt(n) over a sum (encoding
  rounding plus fresh encryption noise per client); after the 2^-24 output rounding
  the relative L2 error of a sum of 20 unit-variance vectors is about 4e-9, far below
  the 1e-4 the tests demand and below float32's resolution. The grid is absolute, so
  it matters for tiny aggregates: coordinates of about 1e-3 get up to 3e-5 relative
  error from it. Every slot of the aggregate must stay below
  :attr:`CKKSParams.max_abs` (2^18 by default); beyond it the decryption wraps around
  silently, so callers bound n · max|w·x| (e.g. by clipping); clients refuse a single
  value beyond it and :func:`run_he_round` checks the bound.
- **Cost.** A ciphertext holds N/2 = 4096 values in two polynomials of N = 8192
  coefficients, one 64-bit word per coefficient and data prime: 131 KB per 4096
  float32 values (16 KB), an expansion of about 8x on the upload. The public context
  (public key over both primes) is 262 KB per key, downloaded by every client. The
  benchmark (``benchmarks/privacy.py --sections he``) measures seconds per role.

Parameters (:class:`CKKSParams`). N = 8192 gives 4096 slots and 128-bit security up to a
218-bit total modulus (Albrecht et al. 2018, Homomorphic Encryption Security Standard;
SEAL enforces it). Aggregation only adds, so it needs no multiplicative depth and no
rescaling primes: the chain is one 60-bit data prime plus the 60-bit special prime
(120 bits). The scale 2^40 leaves 20 bits of the data prime for the integer part, sign
and headroom. TenSEAL's tutorial chain [60, 40, 40, 60] (depth 2) makes every
ciphertext 2.5x larger and encryption about 2x slower for nothing aggregation uses
(the benchmark prints one row with it).
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi  # registers the SEAL types that _params_of reads

from fedloom.privacy.secagg.driver import common_length

__all__ = [
    "CKKSParams",
    "CiphertextFormatError",
    "HEAggregator",
    "HEClient",
    "HERoundResult",
    "KeyHolder",
    "SecretKeyError",
    "aggregate_key_id",
    "public_key_id",
    "run_he_round",
    "update_message_limit",
]

_MAGIC = b"FLHE"
_VERSION = 1
_KIND_UPDATE = 1
_KIND_AGGREGATE = 2
# magic, version, kind, key id (16 bytes), vector length, contributions, chunks
_HEADER = struct.Struct("<4sBB16sIII")
_CHUNK_LEN = struct.Struct("<I")
#: Upper bound on one serialized ciphertext: N = 32768 with the full 881-bit chain is
#: about 8 MB; anything larger is refused before TenSEAL parses it.
_MAX_CHUNK_BYTES = 16 * 1024 * 1024


class CiphertextFormatError(ValueError):
    """An HE message is malformed, for another key or length, or fails to parse."""


class SecretKeyError(ValueError):
    """A party that must only hold public material was given a secret key."""


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters for aggregation (see the module docstring for the choice).

    ``coeff_mod_bit_sizes`` lists the primes of the modulus chain; the last one is the
    special (key-switching) prime, the others carry data. ``scale_bits`` is log2 of the
    fixed-point scale Δ.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n not in (4096, 8192, 16384, 32768):
            raise ValueError(f"poly_modulus_degree must be 4096..32768 (a power of 2), got {n}")
        if len(self.coeff_mod_bit_sizes) < 2:
            raise ValueError("coeff_mod_bit_sizes needs a data prime and the special prime")
        if not all(20 <= b <= 60 for b in self.coeff_mod_bit_sizes):
            raise ValueError(f"primes must have 20..60 bits, got {self.coeff_mod_bit_sizes}")
        if not 20 <= self.scale_bits < self.data_modulus_bits - 2:
            raise ValueError(
                f"scale_bits must be at least 20 and leave headroom below the "
                f"{self.data_modulus_bits}-bit data modulus, got {self.scale_bits}"
            )

    @property
    def slots(self) -> int:
        """Values per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def max_abs(self) -> float:
        """Largest |value| any slot of the aggregate may reach and still decrypt correctly.

        A decrypted coefficient must stay below q/2; slot values map to coefficients
        of up to about twice their magnitude, hence two bits of headroom. Capped at
        2^50 because the result is read back as float64.
        """
        return float(2.0 ** min(self.data_modulus_bits - self.scale_bits - 2, 50))

    def num_chunks(self, length: int) -> int:
        """Ciphertexts per message for a vector of ``length`` values plus the weight slot."""
        return -(-(length + 1) // self.slots)


def public_key_id(public_context: bytes) -> bytes:
    """A 16-byte name for a key: SHA-256 of the public context, which every party has.

    Messages carry it so that a ciphertext made under another (e.g. last round's) key
    is refused instead of decrypting to garbage.
    """
    return hashlib.sha256(public_context).digest()[:16]


def aggregate_key_id(data: bytes) -> bytes:
    """The key id an aggregate message names, read from its header without parsing the rest.

    The key holder uses it to pick the (one-time) key before decrypting.
    """
    return _read_header(memoryview(data), _KIND_AGGREGATE)[0]


def update_message_limit(public_context: bytes, length: int) -> int:
    """The most bytes an honest client's update message can take under this context.

    A fresh ciphertext is two polynomials of N coefficients, one 64-bit word per
    coefficient and data prime; SEAL's optional compression only shrinks that, and a
    small allowance covers its headers. A transport refuses larger replies unread.
    """
    params = _params_of(_load_public_context(public_context, "update_message_limit"))
    primes = len(params.coeff_mod_bit_sizes) - 1
    per_ciphertext = 2 * params.poly_modulus_degree * primes * 8 + 4096
    return _HEADER.size + params.num_chunks(length) * (_CHUNK_LEN.size + per_ciphertext)


def _load_public_context(public_context: bytes, who: str) -> Any:
    """Deserialize a context and refuse it if it holds a secret key."""
    if not isinstance(public_context, bytes | bytearray | memoryview):
        kind = type(public_context).__name__
        raise TypeError(f"{who} takes the serialized public context (bytes), got {kind}")
    try:
        context = ts.context_from(bytes(public_context), n_threads=1)
    except Exception as exc:
        raise CiphertextFormatError(f"{who}: cannot parse the public context: {exc}") from exc
    if context.has_secret_key() or context.is_private():
        del context
        raise SecretKeyError(
            f"{who} must only hold a public context; these bytes contain a secret key"
        )
    if not context.has_public_key():
        raise CiphertextFormatError(f"{who}: the context has no public key to encrypt with")
    return context


@dataclass(frozen=True)
class _Message:
    key_id: bytes
    length: int
    count: int
    chunks: list[bytes]


def _pack(kind: int, key_id: bytes, length: int, count: int, chunks: Iterable[bytes]) -> bytes:
    chunks = list(chunks)
    parts = [_HEADER.pack(_MAGIC, _VERSION, kind, key_id, length, count, len(chunks))]
    for chunk in chunks:
        parts += [_CHUNK_LEN.pack(len(chunk)), chunk]
    return b"".join(parts)


def _read_header(view: memoryview, kind: int) -> tuple[bytes, int, int, int]:
    """(key id, vector length, contributions, chunks) from the header of a ``kind`` message."""
    if len(view) < _HEADER.size:
        raise CiphertextFormatError(f"HE message truncated: {len(view)} bytes, no header")
    magic, version, got_kind, key_id, length, count, chunks = _HEADER.unpack_from(view)
    if magic != _MAGIC or version != _VERSION:
        raise CiphertextFormatError("not an HE message of this version (bad magic/version)")
    if got_kind != kind:
        names = {_KIND_UPDATE: "update", _KIND_AGGREGATE: "aggregate"}
        raise CiphertextFormatError(
            f"expected an {names[kind]} message, got kind {names.get(got_kind, got_kind)}"
        )
    return bytes(key_id), length, count, chunks


def _unpack(data: bytes, kind: int) -> _Message:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"HE messages are bytes, got {type(data).__name__}")
    view = memoryview(data)
    key_id, length, count, chunks = _read_header(view, kind)
    offset, out = _HEADER.size, []
    for i in range(chunks):
        if offset + _CHUNK_LEN.size > len(view):
            raise CiphertextFormatError(f"HE message truncated before ciphertext {i}")
        (size,) = _CHUNK_LEN.unpack_from(view, offset)
        offset += _CHUNK_LEN.size
        if size > _MAX_CHUNK_BYTES or offset + size > len(view):
            raise CiphertextFormatError(f"HE message truncated or oversized in ciphertext {i}")
        out.append(bytes(view[offset : offset + size]))
        offset += size
    if offset != len(view):
        raise CiphertextFormatError(f"HE message has {len(view) - offset} trailing bytes")
    return _Message(key_id, length, count, out)


def _chunk_sizes(length: int, slots: int) -> list[int]:
    total = length + 1
    return [min(slots, total - start) for start in range(0, total, slots)]


def _load_vectors(context: Any, message: _Message, params: CKKSParams) -> list[Any]:
    """Parse every ciphertext of ``message`` and check it holds the expected slot count."""
    sizes = _chunk_sizes(message.length, params.slots)
    if len(message.chunks) != len(sizes):
        raise CiphertextFormatError(
            f"a vector of length {message.length} takes {len(sizes)} ciphertexts, "
            f"got {len(message.chunks)}"
        )
    vectors = []
    for i, (chunk, size) in enumerate(zip(message.chunks, sizes, strict=True)):
        try:
            vector = ts.ckks_vector_from(context, chunk)
        except Exception as exc:
            raise CiphertextFormatError(f"ciphertext {i} does not parse: {exc}") from exc
        if vector.size() != size:
            raise CiphertextFormatError(
                f"ciphertext {i} holds {vector.size()} values, expected {size}"
            )
        _check_fresh(context, vector, i)
        vectors.append(vector)
    return vectors


def _check_fresh(context: Any, vector: Any, index: int) -> None:
    """Refuse a ciphertext that is not shaped like a fresh encryption under ``context``.

    SEAL's parser checks that the coefficients are reduced; this adds what it cannot
    know: one ciphertext of two polynomials, at the data level, in NTT form, at the
    global scale. Sums of such ciphertexts keep all four properties.
    """
    seal = vector.data.ciphertext()
    ok = len(seal) == 1
    if ok:
        ct = seal[0]
        ok = (
            ct.size() == 2
            and ct.is_ntt_form()
            and not ct.is_transparent()
            and ct.scale == context.global_scale
            and list(ct.parms_id()) == list(context.seal_context().data.first_parms_id())
        )
    if not ok:
        raise CiphertextFormatError(
            f"ciphertext {index} is not a fresh CKKS encryption at this context's level and scale"
        )


class KeyHolder:
    """Owns the CKKS secret key; publishes the public context; decrypts aggregates only.

    Create one per round (or per key epoch) in a process other than the aggregation
    server's. ``output_precision_bits`` rounds decrypted values to a grid of
    2^-bits before they leave the key holder (Li & Micciancio 2021 countermeasure; see
    the module docstring); ``None`` releases the raw decryption.
    """

    def __init__(
        self, params: CKKSParams | None = None, *, output_precision_bits: int | None = 24
    ) -> None:
        self.params = params or CKKSParams()
        if output_precision_bits is not None and not 8 <= output_precision_bits < 40:
            raise ValueError(
                f"output_precision_bits must be in [8, 40), got {output_precision_bits}"
            )
        self.output_precision_bits = output_precision_bits
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=self.params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(self.params.coeff_mod_bit_sizes),
            n_threads=1,
        )
        context.global_scale = 2.0**self.params.scale_bits
        self._context = context
        # Addition needs neither relinearization nor rotation keys: ship the public key only.
        self._public = context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        self.key_id = public_key_id(self._public)

    @property
    def public_context(self) -> bytes:
        """Parameters and public key, without the secret key: what clients and server get."""
        return self._public

    def decrypt_weighted(self, data: bytes, length: int) -> tuple[np.ndarray, float]:
        """Decrypt an aggregate message: (Σ w_i x_i as float64 of ``length``, Σ w_i).

        The weight total comes from the extra slot every client encrypts, so the server
        never sees individual weights; with unit weights it counts the contributions.
        """
        message = _unpack(data, _KIND_AGGREGATE)
        if message.key_id != self.key_id:
            raise CiphertextFormatError("the aggregate was encrypted under another key")
        if message.length != length:
            raise CiphertextFormatError(
                f"the aggregate has length {message.length}, expected {length}"
            )
        vectors = _load_vectors(self._context, message, self.params)
        try:
            flat = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors])
        except Exception as exc:
            raise CiphertextFormatError(f"the aggregate does not decrypt: {exc}") from exc
        if self.output_precision_bits is not None:
            grid = 2.0**self.output_precision_bits
            flat = np.round(flat * grid) / grid
        return flat[:length], float(flat[length])

    def decrypt_aggregate(self, data: bytes, length: int) -> np.ndarray:
        """Decrypt an aggregate message to Σ w_i x_i (float64, ``length`` values)."""
        return self.decrypt_weighted(data, length)[0]


class HEClient:
    """Encrypts one client's update under the key holder's public key."""

    def __init__(self, public_context: bytes) -> None:
        self._context = _load_public_context(public_context, "HEClient")
        self.key_id = public_key_id(bytes(public_context))
        self.params = _params_of(self._context)

    def encrypt(self, update: np.ndarray, weight: float = 1.0) -> bytes:
        """Encrypt ``weight · update`` plus ``weight`` in one extra slot; return the message.

        The vector is split into ceil((d + 1) / slots) ciphertexts. Refuses non-flat or
        non-finite input, a non-positive weight, and values beyond
        :attr:`CKKSParams.max_abs`.
        """
        vector = np.asarray(update)
        if vector.ndim != 1 or vector.size == 0:
            raise ValueError(f"an update must be a non-empty flat vector, got shape {vector.shape}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"the weight must be a positive number, got {weight}")
        values = np.empty(vector.size + 1, dtype=np.float64)
        np.multiply(vector, weight, out=values[:-1], dtype=np.float64)
        values[-1] = weight
        if not np.all(np.isfinite(values)):
            raise ValueError("the update has non-finite values")
        peak = float(np.max(np.abs(values)))
        if peak > self.params.max_abs:
            raise ValueError(
                f"|weight · update| reaches {peak:g}, beyond the CKKS capacity "
                f"{self.params.max_abs:g}; clip the update or lower the weight"
            )
        slots = self.params.slots
        chunks = [
            ts.ckks_vector(self._context, values[start : start + slots]).serialize()
            for start in range(0, values.size, slots)
        ]
        return _pack(_KIND_UPDATE, self.key_id, vector.size, 1, chunks)


class HEAggregator:
    """The aggregation server: sums update ciphertexts, never able to decrypt them.

    Built from the public-context bytes only; a context object, or bytes that contain a
    secret key, are refused. Messages are checked whole before anything is added, so a
    malformed one leaves the running sum unchanged.
    """

    def __init__(self, public_context: bytes, length: int) -> None:
        self._context = _load_public_context(public_context, "HEAggregator")
        if length < 1:
            raise ValueError(f"the vector length must be positive, got {length}")
        self.key_id = public_key_id(bytes(public_context))
        self.params = _params_of(self._context)
        self.length = length
        self._sum: list[Any] | None = None
        self._contributors: set[int] = set()

    @property
    def context(self) -> Any:
        """The server's TenSEAL context (public: exposed so tests can inspect it)."""
        return self._context

    @property
    def contributors(self) -> frozenset[int]:
        return frozenset(self._contributors)

    def add(self, client_id: int, data: bytes) -> None:
        """Check one client's update message and add it to the encrypted sum."""
        if client_id in self._contributors:
            raise CiphertextFormatError(f"client {client_id} already contributed this round")
        message = _unpack(data, _KIND_UPDATE)
        if message.key_id != self.key_id:
            raise CiphertextFormatError(
                f"client {client_id} encrypted under another key (stale or foreign context)"
            )
        if message.length != self.length:
            raise CiphertextFormatError(
                f"client {client_id} sent a vector of length {message.length}, "
                f"expected {self.length}"
            )
        if message.count != 1:
            raise CiphertextFormatError(f"an update counts one contribution, got {message.count}")
        vectors = _load_vectors(self._context, message, self.params)
        if self._sum is None:
            self._sum = vectors
        else:
            try:
                total = [acc + v for acc, v in zip(self._sum, vectors, strict=True)]
            except Exception as exc:  # scale or level mismatch inside SEAL
                raise CiphertextFormatError(
                    f"client {client_id}'s ciphertexts cannot be added: {exc}"
                ) from exc
            self._sum = total
        self._contributors.add(client_id)

    def aggregate(self) -> bytes:
        """The encrypted sum so far, as a message for the key holder."""
        if self._sum is None:
            raise ValueError("no update has been added yet")
        return _pack(
            _KIND_AGGREGATE,
            self.key_id,
            self.length,
            len(self._contributors),
            (v.serialize() for v in self._sum),
        )


def _params_of(context: Any) -> CKKSParams:
    """Read the CKKS parameters back from a deserialized context."""
    try:
        parms = context.seal_context().data.key_context_data().parms()
        bits = tuple(int(m.bit_count()) for m in parms.coeff_modulus())
        scale_bits = round(math.log2(context.global_scale))
        return CKKSParams(int(parms.poly_modulus_degree()), bits, scale_bits)
    except Exception as exc:  # not CKKS, no global scale, or parameters we refuse
        raise CiphertextFormatError(f"unusable public context: {exc}") from exc


@dataclass(frozen=True)
class HERoundResult:
    """The decrypted aggregate and what the round cost.

    ``sum`` is Σ w_i x_i over the contributors (float64) and ``weight_total`` Σ w_i.
    Bytes: ``bytes_sent[c]`` the update message client c uploaded; ``bytes_received[c]``
    the public context it downloaded (once per key; a fresh key per round means every
    round); ``bytes_to_key_holder`` the aggregate message; ``bytes_from_key_holder`` the
    decrypted float64 aggregate sent back. Seconds are wall-clock compute per role:
    ``client_seconds[c]`` (loading the context and encrypting), ``server_seconds``
    (checking and adding), ``key_holder_seconds`` (key generation and decryption).
    """

    sum: np.ndarray
    weight_total: float
    contributors: frozenset[int]
    bytes_sent: dict[int, int]
    bytes_received: dict[int, int]
    bytes_to_key_holder: int
    bytes_from_key_holder: int
    client_seconds: dict[int, float]
    server_seconds: float
    key_holder_seconds: float

    @property
    def mean(self) -> np.ndarray:
        """The weighted mean Σ w_i x_i / Σ w_i."""
        return self.sum / self.weight_total

    @property
    def num_contributors(self) -> int:
        return len(self.contributors)


def run_he_round(
    updates: Mapping[int, np.ndarray],
    weights: Mapping[int, float] | None = None,
    *,
    params: CKKSParams | None = None,
    dropouts: Iterable[int] = (),
) -> HERoundResult:
    """Aggregate ``updates`` (client id → flat vector) under CKKS in one round, in process.

    A fresh :class:`KeyHolder` with ``params`` (default :class:`CKKSParams`) makes the
    key. Clients in ``dropouts`` download the context but never upload; the rest are
    summed. Raises ValueError if the vectors differ in length, if nobody contributes, or
    if n · max|w·x| could exceed the CKKS capacity (a bound every party can check from
    the clipping norm; here it is checked on the actual inputs, before a key is made).
    """
    ids = sorted(updates)
    if not ids:
        raise ValueError("HE aggregation needs at least one update")
    length = common_length(updates)
    w = {c: 1.0 for c in ids} if weights is None else {c: float(weights[c]) for c in ids}
    silent = set(dropouts)
    if not silent <= set(ids):
        raise ValueError(f"dropout clients {sorted(silent - set(ids))} have no update")
    senders = [c for c in ids if c not in silent]
    if not senders:
        raise ValueError("every client dropped out: nothing to aggregate")
    params = params or CKKSParams()
    capacity = max(
        sum(w[c] * float(np.max(np.abs(updates[c]))) for c in senders),
        sum(w[c] for c in senders),
    )
    if capacity > params.max_abs:
        raise ValueError(
            f"the aggregate could reach {capacity:g}, beyond the CKKS capacity "
            f"{params.max_abs:g}: clip the updates or use fewer clients per round"
        )

    started = time.perf_counter()
    holder = KeyHolder(params)
    key_seconds = time.perf_counter() - started
    public = holder.public_context

    client_seconds = dict.fromkeys(ids, 0.0)
    sent = dict.fromkeys(ids, 0)
    received = {c: len(public) for c in ids}
    started = time.perf_counter()
    server = HEAggregator(public, length)
    server_seconds = time.perf_counter() - started
    for c in senders:
        started = time.perf_counter()
        message = HEClient(public).encrypt(updates[c], w[c])
        client_seconds[c] = time.perf_counter() - started
        sent[c] = len(message)
        started = time.perf_counter()
        server.add(c, message)
        server_seconds += time.perf_counter() - started
    started = time.perf_counter()
    aggregate = server.aggregate()
    server_seconds += time.perf_counter() - started

    started = time.perf_counter()
    total, weight_total = holder.decrypt_weighted(aggregate, length)
    key_seconds += time.perf_counter() - started
    return HERoundResult(
        sum=total,
        weight_total=weight_total,
        contributors=server.contributors,
        bytes_sent=sent,
        bytes_received=received,
        bytes_to_key_holder=len(aggregate),
        bytes_from_key_holder=8 * (length + 1),
        client_seconds=client_seconds,
        server_seconds=server_seconds,
        key_holder_seconds=key_seconds,
    )
