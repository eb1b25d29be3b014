"""The public k-regular neighbour graph of SecAgg+ (Bell et al. 2020).

Bell et al. replace the complete graph of Bonawitz et al. 2017 with a random
k-regular graph of degree k = O(log n): a client exchanges keys, shares and pairwise
masks only with its k neighbours, so per-client cost is O(log n) and total cost
O(n log n) instead of O(n^2). Their construction is a Harary graph over a random
permutation of the clients, which is what :meth:`NeighbourGraph.build` computes:

1. order the client ids by SHA-256(label || public round seed || id), a permutation
   that every party derives identically from the seed in the server's ``RoundSetup``;
2. connect positions i and i ± 1, ..., i ± floor(k/2) (mod n), and additionally
   i + n/2 when k is odd (which needs n even: n·k must be even for k-regularity).

The graph is symmetric, k-regular and has no self-loops; k = n - 1 gives the complete
graph, i.e. the original SecAgg.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_LABEL = b"fedloom/secagg/v1/graph"


def default_degree(num_clients: int) -> int:
    """k = 2·ceil(log2 n), capped at n - 1 (the complete graph for small n)."""
    if num_clients < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {num_clients}")
    return min(num_clients - 1, 2 * math.ceil(math.log2(num_clients)))


def default_threshold(degree: int) -> int:
    """t = floor(k/2) + 1: a strict majority of a client's neighbours."""
    return degree // 2 + 1


@dataclass(frozen=True)
class NeighbourGraph:
    """A k-regular graph over client ids, determined by a public seed."""

    order: tuple[int, ...]
    degree: int
    _positions: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_positions", {u: i for i, u in enumerate(self.order)})

    @classmethod
    def build(cls, client_ids: Iterable[int], degree: int, seed: bytes) -> NeighbourGraph:
        ids = sorted(set(client_ids))
        n = len(ids)
        if n < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients, got {n}")
        if not 1 <= degree <= n - 1:
            raise ValueError(f"degree must be in [1, {n - 1}] for {n} clients, got {degree}")
        if degree % 2 and n % 2:
            raise ValueError(f"no {degree}-regular graph on {n} clients: n·k must be even")
        order = sorted(ids, key=lambda i: hashlib.sha256(_LABEL + seed + _id_bytes(i)).digest())
        return cls(order=tuple(order), degree=degree)

    def neighbours(self, client_id: int) -> frozenset[int]:
        position = self._positions[client_id]
        n = len(self.order)
        return frozenset(self.order[(position + offset) % n] for offset in self._offsets())

    def adjacency(self) -> dict[int, frozenset[int]]:
        return {u: self.neighbours(u) for u in self.order}

    def _offsets(self) -> Sequence[int]:
        n, half = len(self.order), self.degree // 2
        offsets = [o for d in range(1, half + 1) for o in (d, -d)]
        return [*offsets, n // 2] if self.degree % 2 else offsets


def _id_bytes(client_id: int) -> bytes:
    if not 0 <= client_id < 2**63:
        raise ValueError(f"client ids must be in [0, 2^63), got {client_id}")
    return client_id.to_bytes(8, "big")
