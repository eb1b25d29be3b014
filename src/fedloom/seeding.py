"""Randomness derived from (run seed, purpose, round, client), never from shared state.

Every random choice in a run draws from a generator built from a key such as
``(seed, SAMPLING, round)`` or ``(seed, SHUFFLE, round, client_id)``. A client's work is
then identical whichever engine, worker or machine runs it and in whatever order, and a
resumed run needs no generator state beyond the seed and the round number.
"""

from __future__ import annotations

import numpy as np
import torch

# Purpose tags keep streams for different decisions independent.
MODEL_INIT = 1
DATA = 2
SAMPLING = 3
SHUFFLE = 4
STRAGGLER = 5
EVAL_SUBSET = 6
#: Gaussian noise of differential privacy in simulation (``privacy.secure_noise = false``);
#: keyed by (seed, DP_NOISE, round, stream), see ``fedloom.privacy.noise``.
DP_NOISE = 7
#: Bucketing's random permutation of a round's updates (Karimireddy et al. 2022).
BUCKETING = 8
#: The watermark's trigger set and retraining shuffles, keyed by the watermark's own
#: (secret) seed; see ``fedloom.server.watermark``.
WATERMARK = 16
#: Which of the server's examples a stage reserves (FLTrust's root data set), keyed by
#: (seed, SERVER_DATA, stage tag); the shuffles of the server's own training, keyed by
#: (seed, SERVER_TRAIN, round); FLAME's Gaussian noise, keyed by (seed, FLAME_NOISE, round).
SERVER_DATA = 21
SERVER_TRAIN = 22
FLAME_NOISE = 23
#: Compression: random-k's shared index set (seed, COMPRESSION, round) and QSGD's
#: stochastic rounding (seed, COMPRESSION, round, client_id).
COMPRESSION = 17


def derive_seed(*key: int) -> int:
    """A 63-bit seed that depends on every element of ``key``."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def derive_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def torch_generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*key))
