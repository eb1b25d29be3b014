"""Vectors in chunks: encode without extra copies, reassemble into one buffer.

Both ``TaskMessage`` and ``ResultMessage`` carry a chunk as field 2 (bytes). Building
that message with protobuf would copy each chunk twice (slice, then serialize), so the
sender writes the field's wire form directly: tag, length, bytes. The receiver (the
server of a result, a client of a task) parses each message with protobuf (untrusted
input) and writes the chunks into one buffer of the announced size, so a large vector
is received with a single copy and never grows past what was announced.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from google.protobuf.message import DecodeError

from fedloom.engine.grpc import fedloom_pb2 as pb

#: Field 2, wire type 2 (length-delimited): the ``chunk`` of TaskMessage and ResultMessage.
CHUNK_TAG = b"\x12"


class ChunkError(ValueError):
    """A chunk stream that is malformed, too long or too short; ``reason`` names which."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_chunks(data: bytes | bytearray | memoryview, chunk_bytes: int) -> Iterator[bytes]:
    """Serialized chunk messages for ``data``, one copy of each chunk."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), chunk_bytes):
        piece = view[start : start + chunk_bytes]
        yield CHUNK_TAG + _varint(len(piece)) + piece


def encode_buffers(
    buffers: Iterable[bytes | bytearray | memoryview], chunk_bytes: int
) -> Iterator[bytes]:
    """Chunk messages for several buffers sent back to back (named vectors, in order).

    Each buffer is chunked on its own, so none is copied into a joint one; the receiver
    reassembles by total size and never sees the boundaries.
    """
    for data in buffers:
        yield from encode_chunks(data, chunk_bytes)


def read_chunks(
    raws: Iterator[bytes],
    size: int,
    message: type[pb.TaskMessage] | type[pb.ResultMessage] = pb.ResultMessage,
) -> bytearray:
    """Reassemble the chunks after a stream's header into exactly ``size`` bytes.

    ``message`` is the stream's type: ``ResultMessage`` (what the server receives) or
    ``TaskMessage`` (what a client receives). Raises :class:`ChunkError` for a message
    that does not parse, a second header, or a payload longer or shorter than ``size``.
    """
    kind = "task" if message is pb.TaskMessage else "result"
    buf = bytearray(size)
    filled = 0
    for raw in raws:
        try:
            msg = message.FromString(raw)
        except DecodeError:
            raise ChunkError("malformed", f"unparseable {kind} chunk") from None
        if msg.WhichOneof("part") != "chunk":
            raise ChunkError("malformed", f"a second header inside a {kind} stream")
        chunk = msg.chunk
        if filled + len(chunk) > size:
            raise ChunkError("oversized", f"payload exceeds {size} bytes")
        buf[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    if filled != size:
        raise ChunkError("truncated", f"payload has {filled} bytes, expected {size}")
    return buf
