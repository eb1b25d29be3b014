"""t-of-n Shamir secret sharing over the prime field GF(2^255 - 19) (Shamir 1979).

Bonawitz et al. 2017 (Fig. 4, round 1) share two secrets per client: the self-mask
seed b_u and the pairwise-mask private key s_u. Both are 255-bit field elements here
(X25519 accepts any 32-byte string as a private key, so the key itself is shared).
A share is the point (x, f(x)) of a random polynomial f of degree t - 1 with
f(0) = secret; party ``i`` gets x = i + 1. Any t shares determine f(0) by Lagrange
interpolation; t - 1 shares are consistent with every secret, so interpolating them
gives an unrelated field element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedloom.privacy.secagg.randomness import Entropy, random_below

PRIME = 2**255 - 19
SHARE_BYTES = 32


def share_point(party_id: int) -> int:
    """The x coordinate of the share held by ``party_id`` (never 0, which is the secret)."""
    if not 0 <= party_id < PRIME - 1:
        raise ValueError(f"party id {party_id} is outside the field")
    return party_id + 1


def split(secret: int, threshold: int, xs: Sequence[int], entropy: Entropy) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` such that any ``threshold`` of them recover it."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be a field element in [0, 2^255 - 19)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}] (number of shares)")
    _check_points(xs)
    coefficients = [secret] + [random_below(PRIME, entropy) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in xs}


def reconstruct(shares: Mapping[int, int]) -> int:
    """f(0) from the given points by Lagrange interpolation (uses every point given)."""
    if not shares:
        raise ValueError("cannot reconstruct a secret from no shares")
    xs = list(shares)
    _check_points(xs)
    secret = 0
    for i, x_i in enumerate(xs):
        numerator, denominator = 1, 1
        for j, x_j in enumerate(xs):
            if i != j:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        secret += shares[x_i] * numerator * pow(denominator, -1, PRIME)
    return secret % PRIME


def encode_share(value: int) -> bytes:
    """A field element as 32 little-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "little")


def decode_share(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "little")
    if value >= PRIME:
        raise ValueError("share is not a field element")
    return value


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """Horner's rule, modulo the prime."""
    result = 0
    for c in reversed(coefficients):
        result = (result * x + c) % PRIME
    return result


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError("share points must be distinct")
    if any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be non-zero field elements")
