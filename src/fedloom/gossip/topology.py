"""Communication graphs and their gossip matrices.

A gossip step replaces each peer's model by a weighted average of its own and its
neighbours' (x_i ← Σ_j W_ij x_j). With Metropolis–Hastings weights (Xiao & Boyd 2004,
Eq. 9; used by D-PSGD, Lian et al. 2017, Section 3), W_ij = 1 / (1 + max(d_i, d_j)) on
every edge and W_ii = 1 − Σ_{j≠i} W_ij: W is symmetric and doubly stochastic for any
undirected graph, so repeated gossip converges to the exact average on a connected one,
at a speed set by W's second-largest eigenvalue magnitude (its spectral gap).
"""

from __future__ import annotations

import math

import numpy as np

from fedloom.seeding import derive_rng

#: Purpose tag of per-round topology draws (time-varying graphs, Erdős–Rényi).
GOSSIP_TOPOLOGY = 105

#: Topology names the config accepts (``gossip.topology``).
TOPOLOGIES = ("ring", "torus", "erdos_renyi", "exponential", "complete")


def adjacency(
    topology: str, n: int, *, rng: np.random.Generator | None = None, p: float = 0.3
) -> np.ndarray:
    """Symmetric boolean adjacency (no self-loops) of an undirected graph on ``n`` peers."""
    if n < 1:
        raise ValueError("a graph needs at least one peer")
    a = np.zeros((n, n), dtype=bool)
    if topology == "complete":
        a[:] = True
    elif topology == "ring":
        for i in range(n):
            a[i, (i + 1) % n] = a[i, (i - 1) % n] = True
    elif topology == "torus":
        rows = _torus_rows(n)
        cols = n // rows
        for i in range(n):
            r, c = divmod(i, cols)
            for nr, nc in ((r, (c + 1) % cols), ((r + 1) % rows, c)):
                j = nr * cols + nc
                a[i, j] = a[j, i] = True
    elif topology == "exponential":
        # Each peer i links to i ± 2^k (Assran et al. 2019 use the directed version;
        # the undirected one keeps Metropolis–Hastings weights symmetric).
        k = 1
        while k < n:
            for i in range(n):
                a[i, (i + k) % n] = a[(i + k) % n, i] = True
            k *= 2
    elif topology == "erdos_renyi":
        if rng is None:
            raise ValueError("an Erdős–Rényi graph needs a random generator")
        for _ in range(1000):
            upper = np.triu(rng.random((n, n)) < p, k=1)
            a = upper | upper.T
            if is_connected(a):
                break
        else:
            raise ValueError(
                f"no connected Erdős–Rényi graph on {n} peers with p = {p} in 1000 draws; "
                "raise gossip.edge_probability"
            )
    else:
        raise ValueError(f"unknown topology '{topology}'; choose one of {', '.join(TOPOLOGIES)}")
    np.fill_diagonal(a, False)
    return a


def _torus_rows(n: int) -> int:
    """The most square factorisation r × c = n (r ≤ c); a prime n gives a ring (1 × n)."""
    best = 1
    for r in range(1, math.isqrt(n) + 1):
        if n % r == 0:
            best = r
    return best


def is_connected(a: np.ndarray) -> bool:
    n = len(a)
    seen = np.zeros(n, dtype=bool)
    stack = [0]
    seen[0] = True
    while stack:
        i = stack.pop()
        for j in np.flatnonzero(a[i] & ~seen):
            seen[j] = True
            stack.append(int(j))
    return bool(seen.all())


def metropolis_hastings(a: np.ndarray) -> np.ndarray:
    """The Metropolis–Hastings gossip matrix of adjacency ``a`` (float64)."""
    degree = a.sum(axis=1)
    n = len(a)
    w = np.zeros((n, n), dtype=np.float64)
    rows, cols = np.nonzero(a)
    w[rows, cols] = 1.0 / (1.0 + np.maximum(degree[rows], degree[cols]))
    w[np.arange(n), np.arange(n)] = 1.0 - w.sum(axis=1)
    return w


def spectral_gap(w: np.ndarray) -> float:
    """1 − |λ₂|: how much one gossip step shrinks the distance to consensus (at least)."""
    eig = np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1]
    return float(1.0 - eig[1]) if len(eig) > 1 else 1.0


def consensus_distance(models: np.ndarray) -> float:
    """(1/n) Σ_i ‖x_i − x̄‖², the disagreement between peers' models."""
    mean = models.mean(axis=0, dtype=np.float64)
    return float(((models.astype(np.float64) - mean) ** 2).sum(axis=1).mean())


def round_graph(
    topology: str,
    n: int,
    *,
    seed: int,
    rnd: int,
    edge_probability: float = 0.3,
    time_varying: bool = False,
) -> np.ndarray:
    """Round ``rnd``'s adjacency: a pure function of the seed, so every peer process
    computes the same graph without asking anyone (the simulation uses it too)."""
    rng = derive_rng(seed, GOSSIP_TOPOLOGY, rnd if time_varying else 0)
    a = adjacency(topology, n, rng=rng, p=edge_probability)
    if time_varying:
        order = rng.permutation(n)
        a = a[np.ix_(order, order)]
    return a


def renormalised_row(w: np.ndarray, i: int, heard: set[int] | frozenset[int]) -> np.ndarray:
    """Peer ``i``'s mixing weights when only the neighbours in ``heard`` answered.

    A neighbour that is dead or silent this round has its weight W_ij moved onto the
    peer's own weight W_ii, so the row still sums to 1 and every weight stays ≥ 0: the
    peer keeps more of its own model instead of averaging with a model it does not have.
    When a link is missing in both directions (a dead peer: none of its neighbours hear
    it, it hears none) the matrix over the surviving peers stays symmetric and doubly
    stochastic, so the survivors still converge to their exact average; a link missing
    in one direction only makes that round's matrix row- but not column-stochastic.
    """
    row = np.asarray(w[i], dtype=np.float64).copy()
    missing = [j for j in np.flatnonzero(row) if j != i and int(j) not in heard]
    row[i] += row[missing].sum()
    row[missing] = 0.0
    return row
