"""What a header says about its payload, both directions: named vectors, config, metrics.

A payload of vectors is the vectors concatenated in the header's ``VectorInfo`` order,
little-endian float32, or the compact dtype an entry names (a compression codec's
int8/uint8 codes, int32 indices, float16 values). Everything a peer sends is untrusted,
so every decoder here checks before it allocates: names unique and short, sizes
non-negative, dtypes known, the total bounded (and, for uploads, exactly what the
strategy expects), JSON of the right shape and size. A violation raises
:class:`WireError` with the rejection reason the server counts it under.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedloom.engine.grpc import fedloom_pb2 as pb
from fedloom.messages import Scalar, upload_order
from fedloom.params import COMPACT_DTYPES, WIRE_DTYPE, wire_dtype

#: At most this many named vectors in one payload, names of at most this many characters.
MAX_VECTORS = 64
MAX_NAME_CHARS = 128
#: A task's config JSON: at most this many bytes, keys and characters per string value.
MAX_CONFIG_BYTES = 64 << 10
MAX_CONFIG_KEYS = 256
MAX_CONFIG_STRING = 4096
#: A result's metrics: at most this many entries (metrics_json is inside one message).
MAX_METRICS = 256


#: A payload layout entry: ``(name, size)`` for float32, ``(name, size, dtype)`` otherwise.
LayoutEntry = tuple[str, int] | tuple[str, int, str]


class WireError(ValueError):
    """A header or payload that breaks the protocol; ``reason`` is the counted reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# ----------------------------------------------------------------- vectors


def vector_infos(vectors: Mapping[str, np.ndarray], *, order: Sequence[str]) -> list[pb.VectorInfo]:
    """The header entries for ``vectors`` in ``order`` (element counts, not bytes; the
    dtype only for a compact one, so float32 headers are as they always were)."""
    out = []
    for name in order:
        dtype = wire_dtype(vectors[name]).name
        info = pb.VectorInfo(name=name, size=int(vectors[name].size))
        if dtype != "float32":
            info.dtype = dtype
        out.append(info)
    return out


def vector_buffers(vectors: Mapping[str, np.ndarray], order: Sequence[str]) -> list[memoryview]:
    """Each vector's little-endian bytes in its wire dtype, without a copy when it
    already is one."""
    return [
        np.ascontiguousarray(vectors[name], dtype=wire_dtype(vectors[name])).data.cast("B")
        for name in order
    ]


def broadcast_order(vectors: Mapping[str, np.ndarray]) -> list[str]:
    """Broadcast vectors travel in the strategy's order (the global model first)."""
    return list(vectors)


def result_order(vectors: Mapping[str, np.ndarray]) -> list[str]:
    """Uploads travel in the secure-aggregation order: ``delta`` first, then by name."""
    return upload_order(vectors)


def _entry_dtype(entry: LayoutEntry) -> str:
    return entry[2] if len(entry) == 3 else "float32"


def _expected_size_dtype(value: int | tuple[int, str]) -> tuple[int, str]:
    return (value, "float32") if isinstance(value, int) else (int(value[0]), str(value[1]))


def layout_total(expected: Mapping[str, int | tuple[int, str]]) -> int:
    """The number of values an upload of ``expected`` (name → size or (size, dtype)) has."""
    return sum(_expected_size_dtype(v)[0] for v in expected.values())


def check_infos(
    infos: Iterable[pb.VectorInfo],
    *,
    expected: Mapping[str, int | tuple[int, str]] | None = None,
    max_total: int,
) -> list[LayoutEntry]:
    """``(name, size)`` of each announced float32 vector, ``(name, size, dtype)`` of a
    compact one, after checking the announcement.

    With ``expected`` (the server reading an upload: name → size, or (size, dtype) when
    a codec compresses it) every name must be one of its keys and every size and dtype
    exactly its value, and all of them must be present; otherwise (a client reading a
    broadcast) the dtype must be one fedloom sends and the total must stay within
    ``max_total`` values.
    """
    out: list[LayoutEntry] = []
    seen: set[str] = set()
    total = 0
    for info in infos:
        name, size, dtype = str(info.name), int(info.size), str(info.dtype) or "float32"
        if len(out) >= MAX_VECTORS:
            raise WireError("malformed", f"more than {MAX_VECTORS} vectors")
        if not name or len(name) > MAX_NAME_CHARS or name in seen:
            raise WireError("malformed", f"vector name '{name[:40]}' is empty, long or repeated")
        if expected is not None:
            if name not in expected:
                raise WireError(
                    "unknown_vector", f"vector '{name[:40]}' is not one of {sorted(expected)}"
                )
            want_size, want_dtype = _expected_size_dtype(expected[name])
            if size != want_size:
                raise WireError(
                    "wrong_shape", f"vector '{name}' has {size} values, expected {want_size}"
                )
            if dtype != want_dtype:
                raise WireError(
                    "wrong_dtype", f"vector '{name}' is {dtype[:16]}, expected {want_dtype}"
                )
        elif dtype != "float32" and dtype not in COMPACT_DTYPES:
            raise WireError("malformed", f"vector '{name[:40]}' has unknown dtype {dtype[:16]}")
        if size < 0:
            raise WireError("malformed", f"vector '{name[:40]}' has negative size {size}")
        total += size
        if total > max_total:
            raise WireError("oversized", f"vectors exceed {max_total} values")
        seen.add(name)
        out.append((name, size) if dtype == "float32" else (name, size, dtype))
    if expected is not None and out and seen != set(expected):
        missing = sorted(set(expected) - seen)
        raise WireError("missing_vector", f"the update lacks vectors {missing}")
    return out


def _wire(entry: LayoutEntry) -> np.dtype[Any]:
    dtype = _entry_dtype(entry)
    return WIRE_DTYPE if dtype == "float32" else np.dtype(dtype).newbyteorder("<")


def payload_bytes(layout: Sequence[LayoutEntry]) -> int:
    return sum(entry[1] * _wire(entry).itemsize for entry in layout)


def split_vectors(
    buf: bytearray | np.ndarray, layout: Sequence[LayoutEntry]
) -> dict[str, np.ndarray]:
    """Views of ``buf`` as the named vectors (writable; no copy)."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for entry in layout:
        dtype = _wire(entry)
        out[entry[0]] = np.frombuffer(buf, dtype=dtype, count=entry[1], offset=offset)
        offset += entry[1] * dtype.itemsize
    return out


# ------------------------------------------------------------------- JSON


def encode_config(config: Mapping[str, Scalar]) -> str:
    return json.dumps(dict(config), allow_nan=False, separators=(",", ":"))


def decode_config(text: str) -> dict[str, Scalar]:
    """A task's config: a JSON object of str -> bool | int | float | str, bounded in size.

    Floats must be finite; strings and the document are bounded. A client refuses any
    other config rather than handing it to an algorithm.
    """
    if not text:
        return {}
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise WireError("oversized", f"task config exceeds {MAX_CONFIG_BYTES} bytes")
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError) as err:
        raise WireError("malformed", f"task config is not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise WireError("malformed", "task config is not a JSON object")
    if len(doc) > MAX_CONFIG_KEYS:
        raise WireError("oversized", f"task config has more than {MAX_CONFIG_KEYS} keys")
    for key, value in doc.items():
        if isinstance(value, str):
            if len(value) > MAX_CONFIG_STRING:
                raise WireError("oversized", f"task config '{key[:40]}' is too long")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise WireError("bad_value", f"task config '{key[:40]}' is not finite")
        elif not isinstance(value, bool | int):
            raise WireError(
                "malformed", f"task config '{key[:40]}' is a {type(value).__name__}, not a scalar"
            )
    return doc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def decode_metrics(text: str) -> dict[str, Any]:
    """A result's ``metrics_json``: a JSON object of at most :data:`MAX_METRICS` entries."""
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise WireError("malformed", "metrics_json is not JSON") from None
    if not isinstance(doc, dict):
        raise WireError("malformed", "metrics_json is not an object")
    if len(doc) > MAX_METRICS:
        raise WireError("oversized", f"metrics_json has more than {MAX_METRICS} entries")
    return doc


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers among ``metrics`` (a client's extra fields, such as a traceback, dropped)."""
    return {
        str(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
