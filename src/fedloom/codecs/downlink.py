"""Downlink compression: the broadcast model in float16 or 8-bit, decoded by every client.

The server keeps its float32 model and applies float32 updates to it; only what travels
down is compressed, once per round for every client. A client trains from the decoded
model and reports Δ against that same decoded model, so the rounding error of the
downlink never enters the server's model (it only perturbs where clients start).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.config import CompressionConfig
from fedloom.registry import BROADCAST_CODECS

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _is_float(v: np.ndarray) -> bool:
    return v.dtype in (np.float32, np.float64)


class Float16Broadcast:
    """Every float vector of the broadcast in IEEE half precision (2 bytes a value)."""

    name = "float16"

    def encode(self, broadcast: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, v in broadcast.items():
            if _is_float(v):
                if v.size and float(np.abs(v).max()) > _FLOAT16_MAX:
                    raise ValueError(
                        f"broadcast vector '{name}' exceeds float16's range; set "
                        "compression.downlink = 'int8' or 'none'"
                    )
                out[name] = v.astype(np.float16)
            else:
                out[name] = v
        return out

    def decode(self, broadcast: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            name: v.astype(np.float32) if v.dtype == np.float16 else v
            for name, v in broadcast.items()
        }


class Int8Broadcast:
    """Every float vector as int8 codes round(127 · v / m_b) with one float32 scale m_b
    (the bucket's largest magnitude) per ``bucket_size`` coordinates: deterministic
    round-to-nearest, since every client must start from the same model."""

    name = "int8"
    CODES = ".q8"
    SCALES = ".scale8"

    def __init__(self, bucket_size: int) -> None:
        self.bucket_size = bucket_size

    def encode(self, broadcast: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, v in broadcast.items():
            if not _is_float(v):
                out[name] = v
                continue
            buckets = math.ceil(v.size / self.bucket_size)
            flat = np.zeros(buckets * self.bucket_size, dtype=np.float64)
            flat[: v.size] = v
            rows = flat.reshape(buckets, self.bucket_size)
            scale = np.abs(rows).max(axis=1).astype(np.float32)
            safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
            codes = np.rint(rows / safe[:, None] * 127.0).reshape(-1)[: v.size]
            out[name + self.CODES] = codes.astype(np.int8)
            out[name + self.SCALES] = scale
        return out

    def decode(self, broadcast: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, v in broadcast.items():
            if name.endswith(self.SCALES):
                continue
            if not name.endswith(self.CODES):
                out[name] = v
                continue
            base = name.removesuffix(self.CODES)
            scale = broadcast.get(base + self.SCALES)
            if scale is None or scale.size != math.ceil(v.size / self.bucket_size):
                raise ValueError(f"the int8 broadcast of '{base}' lacks its bucket scales")
            per_coord = np.repeat(scale.astype(np.float64), self.bucket_size)[: v.size]
            out[base] = (v.astype(np.float64) * per_coord / 127.0).astype(np.float32)
        return out


@BROADCAST_CODECS.register("float16")
def make_float16(section: CompressionConfig, context: Any) -> Float16Broadcast:
    return Float16Broadcast()


@BROADCAST_CODECS.register("int8")
def make_int8_broadcast(section: CompressionConfig, context: Any) -> Int8Broadcast:
    return Int8Broadcast(section.bucket_size)
