"""Protocol stages and the server's configuration of a secure-aggregation round."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Stage(StrEnum):
    """The protocol rounds of Bonawitz et al. 2017 (Fig. 4) that this implementation runs.

    Round 3 (ConsistencyCheck, signatures over the survivor set) only defends against an
    actively malicious server and is omitted: the threat model is honest-but-curious.
    A client that drops "at" a stage sends nothing from that stage on.
    """

    ADVERTISE_KEYS = "advertise_keys"  # round 0: publish two X25519 public keys
    SHARE_KEYS = "share_keys"  # round 1: Shamir-share b_u and s_u, encrypted per neighbour
    MASKED_INPUT = "masked_input"  # round 2: send y_u = x_u + PRG(b_u) ± PRG(s_uv)
    UNMASKING = "unmasking"  # round 4: reveal b-shares of survivors, s-shares of dropouts

    @property
    def round_number(self) -> int:
        return {"advertise_keys": 0, "share_keys": 1, "masked_input": 2, "unmasking": 4}[self.value]


STAGES: tuple[Stage, ...] = tuple(Stage)

Rounding = Literal["deterministic", "stochastic"]


@dataclass(frozen=True)
class SecAggConfig:
    """What the server chooses for a round; clients learn it from :class:`RoundSetup`.

    - ``clip_range`` r: each coordinate is clipped to [-r, r] before quantization (a range
      clip for fixed-point encoding, not the L2 clip that differential privacy needs;
      do that one on the client before secure aggregation).
    - ``quantization_bits`` b: coordinates become integers in [-M, M], M = 2^(b-1) - 1.
    - ``modulus_bits`` k: masked vectors live in Z_{2^k}; sums are read back by the
      centred lift, so they are exact while ``n · M < 2^(k-1)`` (checked at setup).
    - ``degree``: neighbours per client (None: ``2·ceil(log2 n)``, capped at n - 1;
      n - 1 is the complete graph of the original SecAgg).
    - ``threshold`` t: shares needed to reconstruct a secret, per neighbourhood
      (None: ``floor(degree / 2) + 1``, a strict majority of the neighbours).
    - ``min_clients``: fewest survivors allowed at any stage (None: the threshold).
    - ``rounding``: ``"deterministic"`` (round half to even) or ``"stochastic"``
      (unbiased: up with probability equal to the fractional part).
    """

    clip_range: float = 1.0
    quantization_bits: int = 16
    modulus_bits: int = 32
    degree: int | None = None
    threshold: int | None = None
    min_clients: int | None = None
    rounding: Rounding = "deterministic"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a positive number, got {self.clip_range}")
        if not 8 <= self.modulus_bits <= 64:
            raise ValueError(f"modulus_bits must be in [8, 64], got {self.modulus_bits}")
        if not 2 <= self.quantization_bits <= self.modulus_bits:
            raise ValueError(
                f"quantization_bits must be in [2, modulus_bits={self.modulus_bits}], "
                f"got {self.quantization_bits}"
            )
        if self.rounding not in ("deterministic", "stochastic"):
            raise ValueError(f"rounding must be deterministic or stochastic, got {self.rounding}")
        for name in ("degree", "threshold", "min_clients"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")


def secagg_message_limit(vector_length: int) -> int:
    """The largest SecAgg+ stage message either side accepts; larger ones are refused unread.

    A masked vector of up to 64-bit integers, plus framing.
    """
    return 8 * vector_length + (1 << 20)
