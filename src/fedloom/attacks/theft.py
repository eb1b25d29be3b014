"""Model theft: what a thief does to a stolen copy of the global model to make it their own.

A client (or anyone who extracts the model from a client device) walks away with the
global model and fine-tunes it on data of their own, hoping to remove the owner's
watermark while keeping the accuracy (the fine-tuning attack WAFFLE is evaluated
against, Tekgul et al. 2021). :func:`fine_tune_stolen` is that thief, so a watermark's
robustness can be measured (``benchmarks/watermark.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedloom.client.learner import Learner, SGDSettings, WorkPlan
from fedloom.data.base import ArrayDataset
from fedloom.seeding import torch_generator


@dataclass(frozen=True, kw_only=True)
class Theft:
    """How the thief fine-tunes: on a random ``fraction`` of ``data`` for ``epochs``."""

    fraction: float = 0.1
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.9
    seed: int = 0


def fine_tune_stolen(
    learner: Learner, weights: np.ndarray, data: ArrayDataset, theft: Theft
) -> np.ndarray:
    """The stolen ``weights`` after the thief's fine-tuning on a random share of ``data``."""
    if not 0.0 < theft.fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {theft.fraction}")
    rng = np.random.default_rng(theft.seed)
    count = max(1, round(theft.fraction * len(data)))
    own = data.subset(np.sort(rng.choice(len(data), count, replace=False)))
    outcome = learner.train(
        start=weights,
        data=own,
        plan=WorkPlan(theft.epochs, None, straggler=False),
        batch_size=theft.batch_size,
        sgd=SGDSettings(lr=theft.lr, momentum=theft.momentum),
        generator=torch_generator(theft.seed),
    )
    return outcome.weights
