"""Label leakage from split learning's gradients, and defenses against it.

Li et al. 2022 ("Label Leakage and Protection in Two-party Split Learning", ICLR),
Section 3: in binary classification the gradient the label party sends for example i,
g_i = ∂L/∂h_i = (p_i − y_i) · ∂logit/∂h_i, reveals y_i. The *norm attack* scores an
example by ‖g_i‖ (the minority class has the larger |p − y| once training has started);
the *direction attack* scores it by the cosine between g_i and the gradient of one
example whose label the attacker knows (same class: positive cosine, other class:
negative). The attack's strength is the AUC of the score against the true labels.

Defenses here perturb the gradients before they leave the label party: ``noise``
(isotropic Gaussian noise, Li et al.'s "iso" baseline, with standard deviation
``scale · max_i ‖g_i‖ / √d`` per coordinate, so the noise norm is about ``scale`` times the
batch's largest gradient) and ``max_norm`` (Li et al.'s heuristic, Section 4.1: example i
gets Gaussian noise with variance (‖g_max‖² − ‖g_i‖²)/d per coordinate, so every
example's expected squared norm equals the batch's largest and the norm stops ranking
the classes). Marvell (their optimized noise) is not implemented.
"""

from __future__ import annotations

import numpy as np
import torch


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties ½.

    The Mann–Whitney U statistic over the positive/negative pairs (Hanley & McNeil 1982),
    computed from average ranks. NaN when one class is absent.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks (1-based) over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def norm_attack_auc(grads: np.ndarray, positive: np.ndarray) -> float:
    """Li et al. 2022's norm attack: score ‖g_i‖; AUC against ``positive``."""
    return roc_auc(np.linalg.norm(grads.reshape(len(grads), -1), axis=1), positive)


def cosine_attack_auc(grads: np.ndarray, positive: np.ndarray) -> float:
    """Li et al. 2022's direction attack, knowing one positive example's label.

    The reference is the first positive example of the batch (the one label the
    attacker is assumed to know); the others are scored by cosine to it. NaN when the
    batch has no positive or nothing else to score.
    """
    flat = grads.reshape(len(grads), -1).astype(np.float64)
    known = np.flatnonzero(positive)
    if len(known) == 0:
        return float("nan")
    ref = flat[known[0]]
    rest = np.delete(np.arange(len(flat)), known[0])
    norms = np.linalg.norm(flat[rest], axis=1) * np.linalg.norm(ref)
    cos = flat[rest] @ ref / np.where(norms > 0, norms, 1.0)
    return roc_auc(cos, np.asarray(positive)[rest])


def defend(
    grads: torch.Tensor, *, defense: str, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """The gradients the label party sends down, perturbed by ``defense`` (see module)."""
    if defense == "none":
        return grads
    flat = grads.reshape(len(grads), -1)
    d = flat.shape[1]
    norms = flat.norm(dim=1)
    noise = torch.randn(flat.shape, generator=generator, dtype=flat.dtype)
    if defense == "noise":
        std = scale * norms.max() / d**0.5
        return (flat + noise * std).reshape(grads.shape)
    if defense == "max_norm":
        std = ((norms.max() ** 2 - norms**2).clamp(min=0.0) / d).sqrt()
        return (flat + noise * std[:, None]).reshape(grads.shape)
    raise ValueError(f"unknown label-leakage defense '{defense}'; use none, noise or max_norm")
