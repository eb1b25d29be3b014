"""The messages vertical-FL parties exchange, and the checks every received one passes.

A message is ``MAGIC``, a 4-byte big-endian header length, a JSON header
(``{"kind": str, "fields": {...}, "arrays": [[name, dtype, shape], ...]}``) and the
arrays' raw little-endian bytes, in header order. Nothing is pickled. :func:`decode`
refuses, before any array is built, a message over the size limit, a header that is not
such JSON, a dtype outside :data:`DTYPES`, a shape whose bytes do not add up to exactly
what follows the header, and then any float array holding NaN or Inf; :func:`require`
checks a named array's dtype and shape against what the protocol step expects. A
refusal is a :class:`RejectedMessageError` with a short ``reason`` (counted by
:class:`Rejections`) and a one-line ``detail``.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Message format version 1 of fedloom's vertical-FL parties.
MAGIC = b"FLV1"
#: Bytes of a JSON header at most (it holds a kind, a few scalars and array shapes).
MAX_HEADER_BYTES = 64 << 10
#: The dtypes a message may carry: activations/gradients, row indices, group elements.
DTYPES = frozenset({"float32", "int32", "uint8"})
MAX_DIMS = 3

log = logging.getLogger("fedloom.vertical")


class RejectedMessageError(ValueError):
    """A received message broke the format or the protocol step's expectations."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Message:
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def encode(
    kind: str,
    fields: Mapping[str, Any] | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
) -> bytes:
    arrays = dict(arrays or {})
    for name, a in arrays.items():
        if a.dtype.name not in DTYPES:
            raise TypeError(f"array '{name}' has dtype {a.dtype}; send one of {sorted(DTYPES)}")
    header = {
        "kind": kind,
        "fields": dict(fields or {}),
        "arrays": [[name, a.dtype.name, list(a.shape)] for name, a in arrays.items()],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join(
        np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays.values()
    )
    return MAGIC + struct.pack(">I", len(head)) + head + body


def decode(data: bytes, *, limit: int) -> Message:
    """Parse ``data`` (at most ``limit`` bytes), or raise :class:`RejectedMessageError`."""
    if len(data) > limit:
        raise RejectedMessageError("too_large", f"a message of {len(data)} bytes exceeds {limit}")
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise RejectedMessageError("malformed", "a message without the vertical-FL format marker")
    (head_len,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if head_len > MAX_HEADER_BYTES or start + head_len > len(data):
        raise RejectedMessageError("malformed", f"a message header of {head_len} bytes")
    try:
        header = json.loads(data[start : start + head_len])
    except (UnicodeDecodeError, ValueError):
        raise RejectedMessageError("malformed", "a message header that is not JSON") from None
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("kind"), str)
        or not isinstance(header.get("fields"), dict)
        or not isinstance(header.get("arrays"), list)
    ):
        raise RejectedMessageError("malformed", "a message header without kind, fields and arrays")
    offset = start + head_len
    arrays: dict[str, np.ndarray] = {}
    for entry in header["arrays"]:
        name, dtype, shape = _array_entry(entry)
        if name in arrays:
            raise RejectedMessageError("malformed", f"array '{name}' appears twice")
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offset + size > len(data):
            raise RejectedMessageError("malformed", f"array '{name}' runs past the message's end")
        a = np.frombuffer(
            data,
            dtype=np.dtype(dtype).newbyteorder("<"),
            count=size // np.dtype(dtype).itemsize,
            offset=offset,
        )
        arrays[name] = a.astype(dtype).reshape(shape)
        offset += size
    if offset != len(data):
        raise RejectedMessageError("malformed", f"{len(data) - offset} bytes after the last array")
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise RejectedMessageError("non_finite", f"array '{name}' holds NaN or Inf")
    return Message(header["kind"], header["fields"], arrays)


def _array_entry(entry: object) -> tuple[str, str, tuple[int, ...]]:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise RejectedMessageError("malformed", "an array entry is not [name, dtype, shape]")
    name, dtype, shape = entry
    if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list):
        raise RejectedMessageError("malformed", "an array entry is not [name, dtype, shape]")
    if dtype not in DTYPES:
        raise RejectedMessageError("bad_dtype", f"array '{name}' has dtype '{dtype}'")
    if len(shape) > MAX_DIMS or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape
    ):
        raise RejectedMessageError("bad_shape", f"array '{name}' has shape {shape}")
    return name, dtype, tuple(shape)


def require(msg: Message, name: str, dtype: str, shape: Sequence[int | None]) -> np.ndarray:
    """``msg``'s array ``name``, checked: this dtype, and this shape (None: any length)."""
    a = msg.arrays.get(name)
    if a is None:
        raise RejectedMessageError("bad_shape", f"a '{msg.kind}' message without array '{name}'")
    if a.dtype.name != dtype:
        raise RejectedMessageError(
            "bad_dtype", f"'{msg.kind}' array '{name}' is {a.dtype}, not {dtype}"
        )
    if a.ndim != len(shape) or any(
        s is not None and s != d for s, d in zip(shape, a.shape, strict=True)
    ):
        want = tuple("*" if s is None else s for s in shape)
        raise RejectedMessageError(
            "bad_shape", f"'{msg.kind}' array '{name}' has shape {a.shape}, expected {want}"
        )
    return a


def require_indices(msg: Message, name: str, *, below: int, unique: bool = False) -> np.ndarray:
    """A 1-D int32 index array with every entry in [0, below) (and distinct if asked)."""
    a = require(msg, name, "int32", (None,))
    if len(a) and (int(a.min()) < 0 or int(a.max()) >= below):
        raise RejectedMessageError(
            "bad_index", f"'{msg.kind}' array '{name}' indexes outside [0, {below})"
        )
    if unique and len(np.unique(a)) != len(a):
        raise RejectedMessageError("bad_index", f"'{msg.kind}' array '{name}' repeats an index")
    return a.astype(np.int64)


class Rejections:
    """Refused messages, counted by reason and logged (each reason's first few times)."""

    def __init__(self, log_first: int = 5) -> None:
        self.counts: dict[str, int] = {}
        self.log_first = log_first
        self._lock = threading.Lock()

    def add(self, err: RejectedMessageError, source: str) -> None:
        with self._lock:
            n = self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
        if n <= self.log_first:
            log.warning("rejected a message from %s (%s): %s", source, err.reason, err.detail)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())
