"""Fixed-point encoding of float vectors for aggregation over Z_{2^k}, and its overflow rule.

A coordinate x is clipped to [-r, r] and scaled to an integer q in [-M, M] with
M = 2^(b-1) - 1, i.e. a step of r / M. Rounding is either deterministic (round half
to even, ``numpy.rint``; error at most half a step) or stochastic (up with probability
equal to the fractional part; unbiased, error under one step). Integers are summed in
Z_{2^k} and read back by the centred lift, which is exact as long as the true integer
sum lies in [-(2^(k-1) - 1), 2^(k-1) - 1].

Overflow rule: with n contributors the sum lies in [-n·M, n·M], so a round is refused
unless ``n · M < 2^(k-1)``. The server checks it at setup with n = every sampled
client, an upper bound on the survivors, so no later stage can wrap silently.
"""

from __future__ import annotations

import numpy as np

from fedloom.privacy.secagg.config import Rounding
from fedloom.privacy.secagg.errors import QuantizationOverflowError


def max_level(quantization_bits: int) -> int:
    """M, the largest quantized magnitude."""
    return (1 << (quantization_bits - 1)) - 1


def check_sum_fits(num_clients: int, quantization_bits: int, modulus_bits: int) -> None:
    """Refuse when ``num_clients`` inputs of magnitude M could overflow Z_{2^k}."""
    worst = num_clients * max_level(quantization_bits)
    limit = 1 << (modulus_bits - 1)
    if worst >= limit:
        raise QuantizationOverflowError(
            f"secure aggregation refused: {num_clients} clients × max level "
            f"{max_level(quantization_bits)} = {worst} could overflow the modulus 2^{modulus_bits} "
            f"(need n·M < 2^{modulus_bits - 1} = {limit}); raise modulus_bits or lower "
            "quantization_bits"
        )


def quantize(
    vector: np.ndarray,
    clip_range: float,
    quantization_bits: int,
    rounding: Rounding = "deterministic",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Integers in [-M, M] (int64) encoding ``vector`` clipped to [-r, r]."""
    values = np.asarray(vector, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"secure aggregation takes a flat vector, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("secure aggregation input contains NaN or infinity")
    level = max_level(quantization_bits)
    scaled = np.clip(values, -clip_range, clip_range) * (level / clip_range)
    if rounding == "deterministic":
        rounded = np.rint(scaled)
    else:
        if rng is None:
            raise ValueError("stochastic rounding needs a random generator")
        rounded = np.floor(scaled + rng.random(scaled.shape))
    return np.clip(rounded, -level, level).astype(np.int64)


def dequantize(quantized_sum: np.ndarray, clip_range: float, quantization_bits: int) -> np.ndarray:
    """The float32 value of a sum of quantized vectors."""
    step = clip_range / max_level(quantization_bits)
    return (quantized_sum.astype(np.float64) * step).astype(np.float32)
