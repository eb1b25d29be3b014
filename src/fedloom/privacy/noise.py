"""Gaussian noise for differential privacy: seeded (reproducible) or cryptographically secure.

Two generators draw standard normal vectors for the DP mechanisms in
:mod:`fedloom.privacy.central` (the secure one also feeds local DP-SGD,
:mod:`fedloom.algorithms.dpsgd_opacus`):

* :class:`SeededGaussianNoise` (the default in simulation, ``privacy.secure_noise =
  false``). Each draw comes from ``derive_rng(seed, DP_NOISE, round, stream)``, so a run
  replays exactly and a resumed run draws the same noise the uninterrupted run drew,
  without checkpointing any generator state. Anyone who knows the seed knows the noise,
  so this mode gives **no privacy at all** against whoever holds the config: it is for
  experiments, tests and benchmarks.
* :class:`SecureGaussianNoise` (``privacy.secure_noise = true``). The same role as
  Opacus' ``secure_mode``: uniform bits come from the operating system's CSPRNG
  (``os.urandom``), normals from the Box–Muller transform, and every returned sample is
  the sum of ``2n = 4`` independent normals divided by 2, the defence of Holohan &
  Braghin 2021 ("Secure Random Sampling in Differential Privacy", Section 5.1) against
  floating-point attacks on Gaussian samplers (Jin et al. 2022, "Are We There Yet?
  Timing and Floating-Point Attacks on Differential Privacy Systems"), exactly as
  Opacus' ``_generate_noise`` does. With n = 2 the attack's search space is
  2^(53·(2n-1)) = 2^159 instead of 2^53. Results are not reproducible, by design.

Simulation defaults to the seeded generator because reproducibility is what a
simulation is for. A real deployment (``fedloom server``) protects real people: there
the default is the secure generator, unless the config sets ``secure_noise = false``.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np

from fedloom.seeding import DP_NOISE, derive_rng

#: Independent streams within one round: the noise added to the sum of client updates,
#: and the noise added to the clipped-count of adaptive clipping.
UPDATE_STREAM = 0
COUNT_STREAM = 1

# Holohan & Braghin 2021, Section 5.1: sum 2n standard normals and divide by sqrt(2n).
_SECURE_SUMMANDS = 4


class GaussianNoise(Protocol):
    """Draws standard normal vectors; the caller scales them to the mechanism's σ."""

    #: True when draws come from a CSPRNG (recorded in the privacy ledger).
    secure: bool

    def standard_normal(self, size: int, round: int, stream: int) -> np.ndarray:
        """``size`` independent N(0, 1) samples (float64) for ``stream`` of ``round``."""
        ...


class SeededGaussianNoise:
    """Reproducible noise: a fresh generator per (seed, DP_NOISE, round, stream).

    Deriving the generator from the round (rather than keeping one generator for the
    run) is what lets a resumed run reproduce the uninterrupted one from the checkpointed
    round number alone, like every other random choice in fedloom (see ``seeding.py``).
    """

    secure = False

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def standard_normal(self, size: int, round: int, stream: int) -> np.ndarray:
        return derive_rng(self.seed, DP_NOISE, round, stream).standard_normal(size)


def secure_uniform(size: int) -> np.ndarray:
    """``size`` uniforms on the open interval (0, 1), 53 random bits each, from ``os.urandom``.

    A 64-bit word from the OS CSPRNG keeps its top 53 bits ``k`` and maps to
    ``(k + 0.5) / 2^53``: every value is exactly representable as a float64 and strictly
    inside (0, 1), so the logarithm in Box–Muller never sees 0.
    """
    words = np.frombuffer(os.urandom(8 * size), dtype="<u8")
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def secure_box_muller(size: int) -> np.ndarray:
    """``size`` N(0, 1) samples by the Box–Muller transform of CSPRNG uniforms.

    Box & Muller 1958, "A Note on the Generation of Random Normal Deviates": for
    independent U1, U2 ~ U(0, 1), ``sqrt(-2 ln U1) · (cos 2πU2, sin 2πU2)`` are two
    independent standard normals. Vectorized: one call to ``os.urandom`` for all pairs.
    """
    pairs = (size + 1) // 2
    u = secure_uniform(2 * pairs)
    radius = np.sqrt(-2.0 * np.log(u[:pairs]))
    angle = (2.0 * math.pi) * u[pairs:]
    out = np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))
    return out[:size]


def secure_standard_normal(size: int) -> np.ndarray:
    """``size`` N(0, 1) samples (float64) from the OS CSPRNG, hardened (see module doc).

    Each sample is ``(g1 + g2 + g3 + g4) / 2`` with ``g_i`` independent Box–Muller
    normals, which is again exactly N(0, 1) in distribution (Holohan & Braghin 2021,
    Section 5.1; Opacus ``_generate_noise`` with ``secure_mode=True``). Shared by central
    DP (:class:`SecureGaussianNoise`) and local DP-SGD
    (:class:`fedloom.algorithms.dpsgd_opacus.SecureNoiseDPOptimizer`), so both have one sampler.
    """
    draws = secure_box_muller(_SECURE_SUMMANDS * size).reshape(_SECURE_SUMMANDS, size)
    return draws.sum(axis=0) / math.sqrt(_SECURE_SUMMANDS)


class SecureGaussianNoise:
    """Noise from the OS CSPRNG: :func:`secure_standard_normal`.

    ``round`` and ``stream`` are ignored: nothing about the draw may be predictable.
    """

    secure = True

    def standard_normal(self, size: int, round: int, stream: int) -> np.ndarray:
        return secure_standard_normal(size)


def make_noise(secure: bool, seed: int) -> GaussianNoise:
    """The generator ``privacy.secure_noise`` asks for."""
    return SecureGaussianNoise() if secure else SeededGaussianNoise(seed)
