"""The entropy source every secret is drawn from.

Secrets come from an ``Entropy`` callable that returns n fresh random bytes; the
default is :func:`os.urandom`, so every key, seed and nonce is new in every round.
Tests pass a seeded stream instead to make statistical checks reproducible; a
deployment must never do that.
"""

from __future__ import annotations

import os
from collections.abc import Callable

Entropy = Callable[[int], bytes]

#: The default entropy source: the operating system's CSPRNG.
SYSTEM_ENTROPY: Entropy = os.urandom


def random_below(bound: int, entropy: Entropy) -> int:
    """A uniform integer in [0, bound), by rejection sampling (no modulo bias)."""
    if bound < 1:
        raise ValueError(f"bound must be positive, got {bound}")
    bits = (bound - 1).bit_length()
    mask = (1 << bits) - 1
    while True:
        value = int.from_bytes(entropy((bits + 7) // 8), "little") & mask
        if value < bound:
            return value
