"""Mask expansion: a 256-bit seed becomes a pseudorandom vector over Z_{2^k}.

The PRG of Bonawitz et al. 2017 (its cryptographic primitives) is instantiated as
the AES-256-CTR keystream under the seed, with an all-zero initial counter block. Each
seed is single-purpose (derived by HKDF with a label and the round id, see
:mod:`.crypto`), so the fixed counter never repeats a keystream across purposes or
rounds. Truncating uniform 32- or 64-bit words to their low k bits keeps them uniform
over Z_{2^k} because 2^k divides 2^32 or 2^64.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedloom.privacy.secagg import ring

SEED_BYTES = 32
_ZERO_COUNTER = bytes(16)


def expand(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """``length`` pseudorandom elements of Z_{2^k} (uint64) determined by ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    width = ring.element_bytes(modulus_bits)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_COUNTER)).encryptor()
    stream = encryptor.update(bytes(length * width)) + encryptor.finalize()
    words = np.frombuffer(stream, dtype="<u4" if width == 4 else "<u8").astype(np.uint64)
    return words & ring.ring_mask(modulus_bits)
