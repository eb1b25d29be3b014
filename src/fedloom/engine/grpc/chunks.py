"""Vectors in chunks: encode without extra copies, reassemble into one buffer.

Both ``TaskMessage`` and ``ResultMessage`` carry a chunk as field 2 (bytes). Building
that message with protobuf would copy each chunk twice (slice, then serialize), so the
sender writes the field's wire form directly: tag, length, bytes (one copy, the one
gRPC needs to own a message). The receiver reads that same form back without
protobuf: a message that is exactly one chunk field is copied once, straight from the
bytes gRPC handed over into one buffer of the announced size; anything else is parsed
by protobuf (untrusted input), so a message protobuf would accept is never refused. A
large vector is thus received with a single copy and never grows past what was
announced.

Receive buffers come from :data:`RECEIVE_BUFFERS`, which hands a buffer out again once
nothing refers to it any more (the round's update was aggregated, the client's task
done): fresh memory costs a page fault and the kernel's zeroing per page, which on a
large model is as much as the copy itself.
"""

from __future__ import annotations

import mmap
import sys
import threading
from collections.abc import Iterable, Iterator

import numpy as np
from google.protobuf.message import DecodeError

from fedloom.engine.grpc import fedloom_pb2 as pb

#: Field 2, wire type 2 (length-delimited): the ``chunk`` of TaskMessage and ResultMessage.
CHUNK_TAG = b"\x12"
_CHUNK_TAG_BYTE = CHUNK_TAG[0]
#: A varint has at most 10 bytes.
_MAX_VARINT = 10


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
    """Serialized chunk messages for ``data``, one copy of each chunk.

    Cheap per chunk (a slice and one concatenation), so it may run on an event loop.
    """
    view = memoryview(data).cast("B")
    total = len(view)
    full = CHUNK_TAG + _varint(chunk_bytes)
    for start in range(0, total, chunk_bytes):
        piece = view[start : start + chunk_bytes]
        prefix = full if len(piece) == chunk_bytes else CHUNK_TAG + _varint(len(piece))
        yield prefix + piece


def encode_buffers(
    buffers: Iterable[bytes | bytearray | memoryview], chunk_bytes: int
) -> Iterator[bytes]:
    """Chunk messages for several buffers sent back to back (named vectors, in order).

    Each buffer is chunked on its own, so none is copied into a joint one; the receiver
    reassembles by total size and never sees the boundaries.
    """
    for data in buffers:
        yield from encode_chunks(data, chunk_bytes)


class BufferPool:
    """Receive buffers, handed out again once only the pool refers to them.

    The pool remembers the last ``keep`` buffers it handed out; :meth:`take` reuses one
    of exactly the size asked for when no array, view or memoryview of it is alive
    (its reference count says so), and otherwise allocates a new one (its old contents
    are never seen: the reader writes every byte before anyone reads it). So a server that
    receives one update per round, or a client that receives one broadcast, writes
    each round into memory that is already mapped; at most ``keep`` idle buffers are
    held between rounds.

    The reference count is the only sign of use, so whoever reads a received vector must
    hold a Python object over it (a NumPy array or view, a memoryview, a tensor made by
    ``torch.from_numpy``: all keep their base alive) for as long as it reads. Code that
    kept only a raw address (``ctypes``, a C extension storing the pointer) would see the
    next round's bytes there; copy first in that case.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._held: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> np.ndarray:
        """A writable uint8 buffer of ``size`` bytes that no one else refers to."""
        with self._lock:
            for i in range(len(self._held)):
                # Referred to by the list and by getrefcount's argument: nothing else.
                if self._held[i].size == size and sys.getrefcount(self._held[i]) == 2:
                    buf = self._held.pop(i)
                    self._held.append(buf)
                    return buf
            if size < _POOLED_FROM:
                return np.empty(size, dtype=np.uint8)
            buf = _fresh(size)
            self._held.append(buf)
            if len(self._held) > self.keep:
                del self._held[: len(self._held) - self.keep]
            return buf

    def clear(self) -> None:
        """Forget every buffer (they live on as long as someone uses them)."""
        with self._lock:
            self._held.clear()


#: Buffers below this size are not worth keeping (allocating them costs little).
_POOLED_FROM = 1 << 20


def _fresh(size: int) -> np.ndarray:
    """``size`` bytes of anonymous memory, mapped on first write and unmapped when the
    last array over it goes.

    Not ``np.empty``: NumPy asks for transparent huge pages on large arrays, and where the
    kernel compacts memory to find them on a page fault (``defrag = madvise``) the first
    round of a 400 MB transfer took the server three times the CPU time it takes with
    ordinary pages (measured on a 2-core VM).
    """
    return np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)


#: The process's receive buffers (servers and clients alike; thread-safe).
RECEIVE_BUFFERS = BufferPool()


def _chunk_view(raw: bytes) -> memoryview | None:
    """The payload of a message that is exactly one chunk field, else None.

    A few byte reads per message: the tag, the length's varint, and that the length
    covers the rest of the message exactly.
    """
    end = len(raw)
    if end < 2 or raw[0] != _CHUNK_TAG_BYTE:
        return None
    length = shift = 0
    pos = 1
    while True:
        if pos >= end or pos > _MAX_VARINT:
            return None
        byte = raw[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    if pos + length != end:
        return None
    return memoryview(raw)[pos:]


def read_chunks(
    raws: Iterator[bytes],
    size: int,
    message: type[pb.TaskMessage] | type[pb.ResultMessage] = pb.ResultMessage,
) -> np.ndarray:
    """Reassemble the chunks after a stream's header into exactly ``size`` bytes.

    ``message`` is the stream's type: ``ResultMessage`` (what the server receives) or
    ``TaskMessage`` (what a client receives). Returns a writable uint8 array from
    :data:`RECEIVE_BUFFERS`. Raises :class:`ChunkError` for a message that does not
    parse, a second header, or a payload longer or shorter than ``size``.
    """
    kind = "task" if message is pb.TaskMessage else "result"
    buf = RECEIVE_BUFFERS.take(size)
    view = buf.data
    filled = 0
    for raw in raws:
        chunk: bytes | memoryview | None = _chunk_view(raw)
        if chunk is None:
            try:
                msg = message.FromString(raw)
            except DecodeError:
                raise ChunkError("malformed", f"unparseable {kind} chunk") from None
            if msg.WhichOneof("part") != "chunk":
                raise ChunkError("malformed", f"a second header inside a {kind} stream")
            chunk = msg.chunk
        end = filled + len(chunk)
        if end > size:
            raise ChunkError("oversized", f"payload exceeds {size} bytes")
        view[filled:end] = chunk
        filled = end
    if filled != size:
        raise ChunkError("truncated", f"payload has {filled} bytes, expected {size}")
    return buf
