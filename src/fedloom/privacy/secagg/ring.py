"""Vectors over the ring Z_{2^k}: reduction, centred lift, and wire bytes.

Elements are held as ``uint64`` arrays. Because 2^k divides 2^64, NumPy's wrapping
uint64 addition and subtraction followed by one ``& (2^k - 1)`` is exact arithmetic
modulo 2^k. On the wire an element takes 4 bytes when k <= 32 and 8 bytes otherwise.
"""

from __future__ import annotations

import numpy as np

from fedloom.privacy.secagg.errors import MessageFormatError


def ring_mask(modulus_bits: int) -> np.uint64:
    return np.uint64((1 << modulus_bits) - 1)


def element_bytes(modulus_bits: int) -> int:
    return 4 if modulus_bits <= 32 else 8


def reduce(values: np.ndarray, modulus_bits: int) -> np.ndarray:
    """``values mod 2^k`` as uint64, for int64 (two's complement wraps) or uint64 input."""
    return values.astype(np.uint64) & ring_mask(modulus_bits)


def centred_lift(values: np.ndarray, modulus_bits: int) -> np.ndarray:
    """The representative in [-2^(k-1), 2^(k-1)) of each element, as int64."""
    values = values.astype(np.uint64) & ring_mask(modulus_bits)
    if modulus_bits == 64:
        return values.view(np.int64)
    half = np.uint64(1 << (modulus_bits - 1))
    shifted = ((values + half) & ring_mask(modulus_bits)).astype(np.int64)
    return shifted - np.int64(1 << (modulus_bits - 1))


def encode(values: np.ndarray, modulus_bits: int) -> bytes:
    """Little-endian fixed-width bytes of a reduced vector."""
    dtype = "<u4" if element_bytes(modulus_bits) == 4 else "<u8"
    return np.ascontiguousarray(values, dtype=np.uint64).astype(dtype).tobytes()


def decode(data: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """The uint64 vector in ``data``; refuses a wrong length or an element >= 2^k."""
    width = element_bytes(modulus_bits)
    if len(data) != length * width:
        raise MessageFormatError(
            f"masked vector has {len(data)} bytes, expected {length} elements of {width} bytes"
        )
    values = np.frombuffer(data, dtype="<u4" if width == 4 else "<u8").astype(np.uint64)
    if modulus_bits < 64 and length and int(values.max()) >> modulus_bits:
        raise MessageFormatError(f"masked vector has an element outside Z_2^{modulus_bits}")
    return values
