"""A small explicit binary codec for protocol messages (no pickle, no reflection).

Every message is ``b"FLSA" | version (u8) | type tag (u8) | body``. Body fields are
big-endian: unsigned integers as u64, floats as IEEE-754 f64, fixed-size byte strings
raw, variable-size byte strings and sequences prefixed with a u32 count. Decoding is
strict: wrong magic, version or tag, truncation and trailing bytes are all refused.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from fedloom.privacy.secagg.errors import MessageFormatError

MAGIC = b"FLSA"
VERSION = 1
_HEADER = struct.Struct(">4sBB")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")


class Writer:
    def __init__(self, tag: int) -> None:
        self._parts: list[bytes] = [_HEADER.pack(MAGIC, VERSION, tag)]

    def u64(self, value: int) -> None:
        if not 0 <= value < 2**64:
            raise ValueError(f"{value} does not fit an unsigned 64-bit field")
        self._parts.append(_U64.pack(value))

    def f64(self, value: float) -> None:
        self._parts.append(_F64.pack(value))

    def fixed(self, data: bytes, size: int) -> None:
        if len(data) != size:
            raise ValueError(f"field must be {size} bytes, got {len(data)}")
        self._parts.append(bytes(data))

    def blob(self, data: bytes) -> None:
        self.count(len(data))
        self._parts.append(bytes(data))

    def count(self, n: int) -> None:
        if not 0 <= n < 2**32:
            raise ValueError(f"{n} items do not fit a u32 count")
        self._parts.append(_U32.pack(n))

    def ids(self, values: Iterable[int]) -> None:
        values = list(values)
        self.count(len(values))
        for value in values:
            self.u64(value)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def header(self) -> int:
        magic, version, tag = _HEADER.unpack(self._take(_HEADER.size))
        if magic != MAGIC:
            raise MessageFormatError("not a secure-aggregation message (bad magic)")
        if version != VERSION:
            raise MessageFormatError(f"unsupported secure-aggregation wire version {version}")
        return int(tag)

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def f64(self) -> float:
        return float(_F64.unpack(self._take(8))[0])

    def fixed(self, size: int) -> bytes:
        return self._take(size)

    def blob(self) -> bytes:
        return self._take(self.count())

    def count(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def ids(self) -> tuple[int, ...]:
        return tuple(self.u64() for _ in range(self.count()))

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise MessageFormatError(f"{len(self._data) - self._pos} trailing bytes after message")

    def _take(self, size: int) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise MessageFormatError("message is truncated")
        chunk = bytes(self._data[self._pos : end])
        self._pos = end
        return chunk
