"""Li et al. 2022's label-leakage attacks and the AUC they are scored by, on hand cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedloom.vertical.leakage import cosine_attack_auc, defend, norm_attack_auc, roc_auc


def test_auc_hand_cases() -> None:
    # Pairs (pos, neg): (0.35 vs 0.1 ✓, 0.35 vs 0.4 ✗, 0.8 vs both ✓) → 3/4.
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([1.0, 1.0]), np.array([1, 0])) == 0.5  # a tie counts ½
    assert roc_auc(np.array([3.0, 1.0, 2.0]), np.array([0, 1, 1])) == 0.0
    assert np.isnan(roc_auc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_auc_matches_scikit_learn_with_ties() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=200).astype(float)  # many ties
    labels = rng.integers(0, 2, size=200)
    assert roc_auc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores))


def test_norm_and_direction_attacks_on_hand_gradients() -> None:
    grads = np.array([[2.0, 0.0], [0.0, 1.0], [1.9, 0.1], [0.5, 0.5]])
    positive = np.array([1, 0, 1, 0])
    assert norm_attack_auc(grads, positive) == 1.0  # norms 2, 1, ~1.9, ~0.71
    # Reference: row 0. Cosines: row1 0, row2 ≈ 0.999, row3 ≈ 0.707 → the one other
    # positive ranks above both negatives.
    assert cosine_attack_auc(grads, positive) == 1.0
    flipped = np.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, 0.2]])
    assert cosine_attack_auc(flipped, np.array([0, 0, 1, 1])) == 1.0
    assert np.isnan(cosine_attack_auc(grads, np.zeros(4)))


def test_defenses() -> None:
    g = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(defend(g, defense="none", scale=1.0, generator=gen), g)
    noisy = defend(g, defense="noise", scale=1.0, generator=gen)
    assert noisy.shape == g.shape and not torch.equal(noisy, g)
    # max_norm: the largest-norm example gets no noise; the other gets variance (25−1)/3.
    big = torch.tensor([[3.0, 4.0, 0.0]] + [[0.0, 0.0, 1.0]] * 4000)
    out = defend(big, defense="max_norm", scale=1.0, generator=gen)
    assert torch.equal(out[0], big[0])
    assert (out[1:] - big[1:]).var().item() == pytest.approx(24 / 3, rel=0.05)
    with pytest.raises(ValueError, match="defense"):
        defend(g, defense="marvell", scale=1.0, generator=gen)
