"""The messages of one secure-aggregation round, as plain dataclasses with a wire format.

Server → client: :class:`RoundSetup` (broadcast), :class:`KeyBroadcast`,
:class:`ShareBundle`, :class:`UnmaskRequest` (one per client, covering only its
neighbours). Client → server: :class:`AdvertiseKeys`, :class:`ShareKeys`,
:class:`MaskedInput`, :class:`UnmaskResponse`. Fields are ints, floats, bytes and
tuples of small entry records; ``to_bytes`` / ``from_bytes`` use the explicit codec in
:mod:`.wire`, and :func:`decode_message` reads any of them from its type tag. Every
message carries the 16-byte random round id, which the state machines check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from fedloom.privacy.secagg.crypto import PUBLIC_KEY_BYTES, ROUND_ID_BYTES
from fedloom.privacy.secagg.errors import MessageFormatError
from fedloom.privacy.secagg.shamir import SHARE_BYTES
from fedloom.privacy.secagg.wire import Reader, Writer

GRAPH_SEED_BYTES = 32


class Message:
    """Base of every protocol message: versioned binary encoding keyed by ``TAG``."""

    TAG: ClassVar[int]

    def to_bytes(self) -> bytes:
        writer = Writer(self.TAG)
        self._write(writer)
        return writer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        reader = Reader(data)
        tag = reader.header()
        if tag != cls.TAG:
            raise MessageFormatError(f"expected a {cls.__name__} message, got type tag {tag}")
        message = cls._read(reader)
        reader.finish()
        return message

    def _write(self, writer: Writer) -> None:
        raise NotImplementedError

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        raise NotImplementedError


@dataclass(frozen=True)
class PublicKeys:
    """A client's two round-0 public keys: c (share encryption) and s (pairwise masks)."""

    client_id: int
    c_public: bytes
    s_public: bytes

    def write(self, writer: Writer) -> None:
        writer.u64(self.client_id)
        writer.fixed(self.c_public, PUBLIC_KEY_BYTES)
        writer.fixed(self.s_public, PUBLIC_KEY_BYTES)

    @classmethod
    def read(cls, reader: Reader) -> PublicKeys:
        return cls(reader.u64(), reader.fixed(PUBLIC_KEY_BYTES), reader.fixed(PUBLIC_KEY_BYTES))


@dataclass(frozen=True)
class EncryptedShare:
    """AES-GCM ciphertext of (s-share, b-share) from ``sender`` for ``receiver``."""

    sender: int
    receiver: int
    ciphertext: bytes

    def write(self, writer: Writer) -> None:
        writer.u64(self.sender)
        writer.u64(self.receiver)
        writer.blob(self.ciphertext)

    @classmethod
    def read(cls, reader: Reader) -> EncryptedShare:
        return cls(reader.u64(), reader.u64(), reader.blob())


@dataclass(frozen=True)
class RevealedShare:
    """A share of ``owner``'s secret (b_owner or s_owner), revealed at unmasking."""

    owner: int
    share: bytes

    def write(self, writer: Writer) -> None:
        writer.u64(self.owner)
        writer.fixed(self.share, SHARE_BYTES)

    @classmethod
    def read(cls, reader: Reader) -> RevealedShare:
        return cls(reader.u64(), reader.fixed(SHARE_BYTES))


@dataclass(frozen=True)
class RoundSetup(Message):
    """Broadcast before round 0: everything a client needs to take part in the round."""

    TAG: ClassVar[int] = 1
    round_id: bytes
    graph_seed: bytes
    client_ids: tuple[int, ...]
    degree: int
    threshold: int
    vector_length: int
    clip_range: float
    quantization_bits: int
    modulus_bits: int
    stochastic_rounding: bool

    def _write(self, writer: Writer) -> None:
        writer.fixed(self.round_id, ROUND_ID_BYTES)
        writer.fixed(self.graph_seed, GRAPH_SEED_BYTES)
        writer.ids(self.client_ids)
        for value in (self.degree, self.threshold, self.vector_length):
            writer.u64(value)
        writer.f64(self.clip_range)
        for value in (self.quantization_bits, self.modulus_bits, int(self.stochastic_rounding)):
            writer.u64(value)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(
            round_id=reader.fixed(ROUND_ID_BYTES),
            graph_seed=reader.fixed(GRAPH_SEED_BYTES),
            client_ids=reader.ids(),
            degree=reader.u64(),
            threshold=reader.u64(),
            vector_length=reader.u64(),
            clip_range=reader.f64(),
            quantization_bits=reader.u64(),
            modulus_bits=reader.u64(),
            stochastic_rounding=bool(reader.u64()),
        )


@dataclass(frozen=True)
class AdvertiseKeys(Message):
    """Round 0, client → server: the client's two fresh public keys."""

    TAG: ClassVar[int] = 2
    round_id: bytes
    keys: PublicKeys

    def _write(self, writer: Writer) -> None:
        writer.fixed(self.round_id, ROUND_ID_BYTES)
        self.keys.write(writer)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(reader.fixed(ROUND_ID_BYTES), PublicKeys.read(reader))


@dataclass(frozen=True)
class KeyBroadcast(Message):
    """End of round 0, server → one client: the public keys of its surviving neighbours."""

    TAG: ClassVar[int] = 3
    round_id: bytes
    recipient: int
    keys: tuple[PublicKeys, ...]

    def _write(self, writer: Writer) -> None:
        writer.fixed(self.round_id, ROUND_ID_BYTES)
        writer.u64(self.recipient)
        writer.count(len(self.keys))
        for entry in self.keys:
            entry.write(writer)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        round_id, recipient = reader.fixed(ROUND_ID_BYTES), reader.u64()
        return cls(round_id, recipient, tuple(PublicKeys.read(reader) for _ in _n(reader)))


@dataclass(frozen=True)
class ShareKeys(Message):
    """Round 1, client → server: one encrypted share pair per neighbour."""

    TAG: ClassVar[int] = 4
    round_id: bytes
    sender: int
    shares: tuple[EncryptedShare, ...]

    def _write(self, writer: Writer) -> None:
        _write_shares(writer, self.round_id, self.sender, self.shares)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(*_read_shares(reader))


@dataclass(frozen=True)
class ShareBundle(Message):
    """End of round 1, server → one client: the shares its neighbours encrypted for it."""

    TAG: ClassVar[int] = 5
    round_id: bytes
    recipient: int
    shares: tuple[EncryptedShare, ...]

    def _write(self, writer: Writer) -> None:
        _write_shares(writer, self.round_id, self.recipient, self.shares)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(*_read_shares(reader))


@dataclass(frozen=True)
class MaskedInput(Message):
    """Round 2, client → server: the masked, quantized update as ring-element bytes."""

    TAG: ClassVar[int] = 6
    round_id: bytes
    sender: int
    vector: bytes

    def _write(self, writer: Writer) -> None:
        writer.fixed(self.round_id, ROUND_ID_BYTES)
        writer.u64(self.sender)
        writer.blob(self.vector)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(reader.fixed(ROUND_ID_BYTES), reader.u64(), reader.blob())


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """End of round 2, server → one client: which of its neighbours survived or dropped.

    ``survivors``: neighbours whose masked input arrived (reveal their b-shares);
    ``dropped``: neighbours that shared keys but sent no masked input (reveal s-shares).
    """

    TAG: ClassVar[int] = 7
    round_id: bytes
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def _write(self, writer: Writer) -> None:
        writer.fixed(self.round_id, ROUND_ID_BYTES)
        writer.u64(self.recipient)
        writer.ids(self.survivors)
        writer.ids(self.dropped)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(reader.fixed(ROUND_ID_BYTES), reader.u64(), reader.ids(), reader.ids())


@dataclass(frozen=True)
class UnmaskResponse(Message):
    """Round 4, client → server: b-shares of surviving and s-shares of dropped neighbours."""

    TAG: ClassVar[int] = 8
    round_id: bytes
    sender: int
    self_mask_shares: tuple[RevealedShare, ...]
    pairwise_key_shares: tuple[RevealedShare, ...]

    def _write(self, writer: Writer) -> None:
        writer.fixed(self.round_id, ROUND_ID_BYTES)
        writer.u64(self.sender)
        for group in (self.self_mask_shares, self.pairwise_key_shares):
            writer.count(len(group))
            for entry in group:
                entry.write(writer)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        round_id, sender = reader.fixed(ROUND_ID_BYTES), reader.u64()
        b_shares = tuple(RevealedShare.read(reader) for _ in _n(reader))
        s_shares = tuple(RevealedShare.read(reader) for _ in _n(reader))
        return cls(round_id, sender, b_shares, s_shares)


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TAG: cls
    for cls in (
        RoundSetup,
        AdvertiseKeys,
        KeyBroadcast,
        ShareKeys,
        ShareBundle,
        MaskedInput,
        UnmaskRequest,
        UnmaskResponse,
    )
}


def decode_message(data: bytes) -> Message:
    """Any protocol message, by its type tag (for transports that multiplex them)."""
    tag = Reader(data).header()
    if tag not in MESSAGE_TYPES:
        raise MessageFormatError(f"unknown secure-aggregation message type tag {tag}")
    return MESSAGE_TYPES[tag].from_bytes(data)


def _n(reader: Reader) -> range:
    return range(reader.count())


def _write_shares(
    writer: Writer, round_id: bytes, party: int, shares: tuple[EncryptedShare, ...]
) -> None:
    writer.fixed(round_id, ROUND_ID_BYTES)
    writer.u64(party)
    writer.count(len(shares))
    for entry in shares:
        entry.write(writer)


def _read_shares(reader: Reader) -> tuple[bytes, int, tuple[EncryptedShare, ...]]:
    round_id, party = reader.fixed(ROUND_ID_BYTES), reader.u64()
    return round_id, party, tuple(EncryptedShare.read(reader) for _ in _n(reader))
