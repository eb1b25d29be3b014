"""The seam through which an engine may train many clients' local SGD at once.

A client algorithm's ``fit`` is a black box to an engine: it may call the learner any
number of times with any gradient correction. An algorithm whose fit is *one* run of
plain local SGD (optionally with FedProx's proximal pull toward its start) can say so by
splitting its fit in two: :meth:`VectorizableAlgorithm.local_training` names the
training it wants, :meth:`VectorizableAlgorithm.finish` turns the outcome into its
update. An engine that batches training (``engine.name = "vectorized"``) trains the
requests of many clients together and calls ``finish`` for each; the algorithm's own
``fit`` must equal ``finish(local_training(ctx), learner.train(...))``.

An algorithm without these two methods (SCAFFOLD's control-variate correction, DP-SGD's
per-example clipping and noise, the personalization phases) is not vectorizable; the
vectorized engine refuses it by name instead of silently training one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fedloom.algorithms.base import ClientContext, ClientUpdate
from fedloom.client.learner import TrainOutcome


@dataclass(frozen=True, kw_only=True)
class LocalTraining:
    """One run of the plan's local SGD from ``start``.

    ``proximal_mu`` adds μ(w − start) to every gradient (Li et al. 2020, Eq. 2), after
    weight decay and before momentum, as :func:`fedloom.algorithms.sgd.proximal_correction`.
    """

    start: np.ndarray
    proximal_mu: float = 0.0


@runtime_checkable
class VectorizableAlgorithm(Protocol):
    """A client algorithm whose fit is exactly one :class:`LocalTraining`."""

    def local_training(self, ctx: ClientContext) -> LocalTraining: ...

    def finish(
        self, ctx: ClientContext, training: LocalTraining, outcome: TrainOutcome
    ) -> ClientUpdate: ...
