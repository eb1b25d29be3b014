"""FLAME: clustering, clipping and noise against backdoors.

Nguyen et al. 2022, "FLAME: Taming backdoors in federated learning" (USENIX Security),
Algorithm 1:

1. Filtering. The pairwise cosine distances c_ij = 1 − cos(Δ_i, Δ_j) of the round's k
   updates are clustered by HDBSCAN with minimum cluster size k/2 + 1 (floor(k/2) + 1);
   only the updates in the largest cluster are admitted (so a majority must agree), the
   others, HDBSCAN's outliers included, are excluded.
2. Adaptive clipping. The clipping bound is the median S_t of the L2 norms ‖Δ_i‖ of all
   k updates (e_i = ‖W_i − G_{t−1}‖ in the paper); each admitted update is scaled by
   min(1, S_t / ‖Δ_i‖) and the admitted, clipped updates are averaged (each client once).
3. Adaptive noise. Gaussian noise N(0, (λ·S_t)²) is added to every coordinate of the
   aggregate; λ = 0.001 is the paper's value for image classification (option
   ``noise_lambda``; 0 turns the noise off). The noise is added to the aggregate update;
   with the FedAvg server step (server SGD, lr 1) that is the paper's noise on the model.

The paper clusters the local models W_i = G + Δ_i by cosine distance; fedloom clusters the
updates Δ_i, whose directions differ between clients while the models' are dominated by
the shared G. A round of fewer than 3 updates cannot be clustered: all are admitted
(``robust_fallback`` says so). As long as more than half of the updates are honest, S_t
is at most the largest honest norm, so no admitted update, and not the aggregate before
noise, is longer than that.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedloom.algorithms.base import StageContext
from fedloom.config import ConfigError
from fedloom.registry import AGGREGATORS
from fedloom.seeding import FLAME_NOISE, derive_rng
from fedloom.server.aggregators import AggregationInput
from fedloom.server.robust_coordinate import (
    StatelessRobust,
    check_option_keys,
    int_option,
    rows_of,
)

#: The paper's λ for image classification (Nguyen et al. 2022, Section 5).
DEFAULT_NOISE_LAMBDA = 0.001


def cosine_distances(rows: np.ndarray) -> np.ndarray:
    """1 − cos(Δ_i, Δ_j) for all pairs (float64; a zero update is at distance 1 from all)."""
    norms = np.linalg.norm(rows, axis=1)
    unit = rows / np.where(norms > 0.0, norms, 1.0)[:, None]
    dist = 1.0 - unit @ unit.T
    np.clip(dist, 0.0, 2.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return np.asarray(dist, dtype=np.float64)


def majority_cluster(dist: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """Indices of the largest HDBSCAN cluster of a precomputed distance matrix (sorted;
    ties go to the cluster HDBSCAN numbers first); empty when every point is noise."""
    from sklearn.cluster import HDBSCAN

    labels = HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=1,
        metric="precomputed",
        allow_single_cluster=True,
        copy=True,
    ).fit_predict(dist)
    clusters = [c for c in np.unique(labels) if c >= 0]
    if not clusters:
        return np.zeros(0, dtype=np.int64)
    sizes = [int(np.sum(labels == c)) for c in clusters]
    best = clusters[int(np.argmax(sizes))]
    return np.flatnonzero(labels == best)


class Flame(StatelessRobust):
    """FLAME (Nguyen et al. 2022, Algorithm 1); see the module docstring.

    Record fields: ``excluded_clients`` (not in the majority cluster), ``flame_admitted``,
    ``flame_clip_norm`` (S_t), ``flame_clipped`` (admitted updates scaled down) and
    ``flame_noise_sigma`` (λ·S_t).
    """

    def __init__(self, *, noise_lambda: float, min_cluster_size: int | None, seed: int) -> None:
        self.noise_lambda = noise_lambda
        self.min_cluster_size = min_cluster_size
        self.seed = seed

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        rows = rows_of(inp)
        k = rows.shape[0]
        if k == 0:
            return np.zeros(inp.dimension, dtype=np.float32), {"excluded_clients": []}
        ids = [int(c) for c in inp.client_ids] if len(inp.client_ids) == k else list(range(k))
        fields: dict[str, Any] = {}
        if k < 3:
            admitted = np.arange(k)
            fields["robust_fallback"] = f"flame needs at least 3 updates to cluster, got {k}"
        else:
            size = self.min_cluster_size if self.min_cluster_size is not None else k // 2 + 1
            admitted = majority_cluster(cosine_distances(rows), min(max(size, 2), k))
            if len(admitted) == 0:
                admitted = np.arange(k)
                fields["robust_fallback"] = "flame: HDBSCAN found no cluster; all updates kept"
        norms = np.linalg.norm(rows, axis=1)
        clip = float(np.median(norms))
        kept = rows[admitted]
        kept_norms = norms[admitted]
        factors = np.minimum(1.0, clip / np.where(kept_norms > 0.0, kept_norms, 1.0))
        aggregate = (kept * factors[:, None]).mean(axis=0)
        sigma = self.noise_lambda * clip
        if sigma > 0.0:
            aggregate = aggregate + derive_rng(self.seed, FLAME_NOISE, inp.round).normal(
                0.0, sigma, size=aggregate.shape
            )
        chosen = {ids[i] for i in admitted}
        fields.update(
            {
                "excluded_clients": [c for c in ids if c not in chosen],
                "flame_admitted": len(admitted),
                "flame_clip_norm": clip,
                "flame_clipped": int(np.sum(factors < 1.0)),
                "flame_noise_sigma": sigma,
            }
        )
        return aggregate.astype(np.float32), fields


@AGGREGATORS.register("flame")
def make_flame(options: dict[str, Any], context: StageContext) -> Flame:
    check_option_keys("flame", options, ("noise_lambda", "min_cluster_size"))
    lam = options.get("noise_lambda", DEFAULT_NOISE_LAMBDA)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0.0:
        raise ConfigError(
            "server.aggregator_options.noise_lambda must be a number >= 0 (noise σ = λ · median "
            f"norm; the paper uses 0.001); got {lam!r}"
        )
    size = int_option(options, "min_cluster_size", minimum=2, what="HDBSCAN's minimum cluster size")
    return Flame(noise_lambda=float(lam), min_cluster_size=size, seed=context.seed)
