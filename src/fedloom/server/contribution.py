"""Who contributed: per-client contribution scores of each round's updates.

An update monitor (:mod:`fedloom.server.monitors`): it sees the round's individual
updates Δ_i (with example counts n_i) and the model w_t they were trained from, before
the aggregator runs, and scores each client on a validation slice of the server's own
examples (reserved from :class:`~fedloom.data.server.ServerData`, so they leave central
evaluation). It never changes the aggregate or who is sampled.

The game. A coalition S of the round's clients gets the model the FedAvg step would
have made from their updates alone, reconstructed from the updates rather than
retrained (Liu et al. 2022, "GTG-Shapley: Efficient and Accurate Participant
Contribution Evaluation in Federated Learning", ACM TIST, gradient-based model
reconstruction)::

    w(S) = w_t + Σ_{i∈S} n_i Δ_i / Σ_{i∈S} n_i,      w(∅) = w_t,

and its utility v(S) is −(validation loss) of w(S) (``utility = "neg_loss"``, the
default) or its validation accuracy (``"accuracy"``). Accuracy is coarse on a small
validation set: on IID digits (10 clients, 3 rounds, 200 validation examples) with
accuracy, leave-one-out did not rank the two label-shuffled clients last and
GTG-Shapley separated them by 0.02 from the next honest client; with −loss both ranked
them last with a margin of 0.1 or more (tests/test_contribution.py runs that case).
The reconstruction is the plain FedAvg step (server learning rate 1); with another
server optimizer or algorithm it is the clients' share of the round, not the exact
next model.

Scores:

* ``gtg_shapley``: the Shapley value (Shapley 1953)
  φ_i = Σ_{S ⊆ N∖{i}} |S|! (n − |S| − 1)! / n! · (v(S ∪ {i}) − v(S)),
  estimated by Monte Carlo over permutations π: φ_i is the mean over sampled π of the
  marginal contribution v(P_i^π ∪ {i}) − v(P_i^π), P_i^π the clients before i in π.
  GTG-Shapley's three savings (Liu et al. 2022, Algorithm 1): *guided sampling* — the
  k-th permutation puts client k mod n first and orders the rest at random, so every
  client leads equally often; *within-round truncation* — once |v(N) − v(prefix)| <
  ``tolerance`` the rest of the permutation adds 0 (the remaining clients cannot
  change the utility much); *between-round truncation* — when |v(N) − v(∅)| ≤
  ``round_tolerance`` the round is not worth splitting and every score is 0. Sampling
  stops after ``permutations`` permutations, or earlier once a whole cycle of n
  permutations moved no estimate by more than ``convergence`` × the mean |φ|.
  Utilities are cached per coalition within the round, so a small round costs at most
  its 2^n coalitions.
* ``leave_one_out``: φ_i = v(N) − v(N ∖ {i}), n + 1 evaluations.

Record fields: ``contribution`` (client id → score), ``contribution_evaluations`` (the
models evaluated) and, for GTG-Shapley, ``contribution_permutations``. The summary
adds the scores up over rounds (``metrics.contribution_total``). Secure aggregation
hides the updates, so the stage is refused with it at config time
(:func:`check_contribution`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedloom.algorithms.base import StageContext
from fedloom.client.learner import Learner
from fedloom.config import ConfigError, ContributionConfig, RunConfig
from fedloom.data.base import ArrayDataset
from fedloom.registry import UPDATE_MONITORS
from fedloom.seeding import derive_rng
from fedloom.server.aggregators import AggregationInput

#: Purpose tag of the permutation stream, keyed by (seed, tag, round).
CONTRIBUTION_PERMUTATIONS = 111

Utility = Callable[[frozenset[int]], float]


def exact_shapley(utility: Utility, n: int) -> np.ndarray:
    """φ_i = Σ_{S ⊆ N∖{i}} |S|!(n−|S|−1)!/n! (v(S∪{i}) − v(S)) over all 2^n coalitions."""
    from itertools import combinations
    from math import factorial

    phi = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            weight = factorial(size) * factorial(n - size - 1) / factorial(n)
            for coalition in combinations(others, size):
                s = frozenset(coalition)
                phi[i] += weight * (utility(s | {i}) - utility(s))
    return phi


def leave_one_out(utility: Utility, n: int) -> np.ndarray:
    """φ_i = v(N) − v(N ∖ {i})."""
    everyone = frozenset(range(n))
    full = utility(everyone)
    return np.array([full - utility(everyone - {i}) for i in range(n)])


def gtg_shapley(
    utility: Utility,
    n: int,
    *,
    rng: np.random.Generator,
    permutations: int,
    convergence: float = 0.0,
    tolerance: float = 0.0,
    round_tolerance: float = 0.0,
) -> tuple[np.ndarray, int]:
    """GTG-Shapley estimates (module docstring) and the number of permutations sampled."""
    phi = np.zeros(n)
    if n == 0:
        return phi, 0
    everyone = frozenset(range(n))
    v_empty, v_full = utility(frozenset()), utility(everyone)
    if abs(v_full - v_empty) <= round_tolerance:
        return phi, 0  # between-round truncation
    snapshot = phi.copy()
    k = 0
    while k < permutations:
        first = k % n
        rest = [j for j in range(n) if j != first]
        order = [first, *(rest[j] for j in rng.permutation(len(rest)))]
        k += 1
        prefix: frozenset[int] = frozenset()
        previous = v_empty
        for i in order:
            prefix = prefix | {i}
            if tolerance > 0.0 and abs(v_full - previous) < tolerance:
                current = previous  # within-round truncation
            else:
                current = v_full if len(prefix) == n else utility(prefix)
            phi[i] += (current - previous - phi[i]) / k
            previous = current
        if convergence > 0.0 and k % n == 0 and k >= 2 * n:
            scale = float(np.mean(np.abs(phi)))
            if scale > 0.0 and float(np.max(np.abs(phi - snapshot))) <= convergence * scale:
                break
        if k % n == 0:
            snapshot = phi.copy()
    return phi, k


def coalition_model(
    base: np.ndarray, rows: np.ndarray, weights: np.ndarray, members: Sequence[int]
) -> np.ndarray:
    """w(S) = w_t + Σ_{i∈S} n_i Δ_i / Σ_{i∈S} n_i (equal weights where the counts sum to 0)."""
    if not members:
        return base
    index = np.asarray(sorted(members), dtype=np.int64)
    w = weights[index].astype(np.float64)
    if w.sum() <= 0.0:
        w = np.ones_like(w)
    step = (w / w.sum()) @ rows[index].astype(np.float64)
    return (base.astype(np.float64) + step).astype(np.float32)


class ContributionMonitor:
    """Per-round contribution scores of the round's clients (module docstring)."""

    name = "contribution"
    needs_individual_updates = True

    def __init__(
        self,
        *,
        section: ContributionConfig,
        validation: ArrayDataset,
        learner_factory: Callable[[], Learner],
        seed: int,
    ) -> None:
        self.section = section
        self.validation = validation
        self.learner_factory = learner_factory
        self.seed = seed
        self._learner: Learner | None = None

    def _utility(self, weights: np.ndarray) -> float:
        if self._learner is None:
            self._learner = self.learner_factory()
        metrics = self._learner.evaluate(weights, self.validation)
        if self.section.utility == "neg_loss":
            return -float(metrics["loss"])
        return float(metrics["accuracy"])

    def observe(self, inp: AggregationInput) -> dict[str, Any]:
        if inp.updates is None or inp.global_weights is None:
            raise ValueError("contribution scores need every client's update and the model")
        rows = np.asarray(inp.updates, dtype=np.float32).reshape(-1, inp.dimension)
        k = rows.shape[0]
        ids = [int(c) for c in inp.client_ids] if len(inp.client_ids) == k else list(range(k))
        weights = np.asarray(inp.weights, dtype=np.float64)
        base = np.asarray(inp.global_weights, dtype=np.float32)
        cache: dict[frozenset[int], float] = {}

        def utility(members: frozenset[int]) -> float:
            if members not in cache:
                cache[members] = self._utility(coalition_model(base, rows, weights, list(members)))
            return cache[members]

        fields: dict[str, Any] = {}
        if self.section.method == "leave_one_out":
            scores = leave_one_out(utility, k) if k else np.zeros(0)
        else:
            s = self.section
            scores, used = gtg_shapley(
                utility,
                k,
                rng=derive_rng(self.seed, CONTRIBUTION_PERMUTATIONS, inp.round),
                permutations=s.permutations,
                convergence=s.convergence,
                tolerance=s.tolerance,
                round_tolerance=s.round_tolerance,
            )
            fields["contribution_permutations"] = used
        fields["contribution"] = {
            str(c): round(float(v), 6) for c, v in zip(ids, scores, strict=True)
        }
        fields["contribution_evaluations"] = len(cache)
        return fields

    def eligible(self, rnd: int, pool: np.ndarray) -> np.ndarray:
        return pool

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        return None


def check_contribution(cfg: RunConfig) -> None:
    """Refuse contribution scores where the server cannot see the updates."""
    method = cfg.contribution.method
    if method != "none" and cfg.privacy.secure_aggregation != "none":
        raise ConfigError(
            f"contribution.method = '{method}' scores each client's update on the server, "
            "which secure aggregation hides; set contribution.method = 'none' or "
            "privacy.secure_aggregation = 'none'"
        )


@UPDATE_MONITORS.register("contribution")
def make_contribution(section: ContributionConfig, context: StageContext) -> ContributionMonitor:
    if context.server_data is None or context.learner_factory is None:
        raise ConfigError(
            f"contribution.method = '{section.method}' evaluates updates on the server's own "
            "examples, but this run gives the server no examples or model; set "
            "contribution.method = 'none'"
        )
    if section.utility == "accuracy" and "accuracy" not in context.learner_factory().metrics:
        raise ConfigError(
            "contribution.utility = 'accuracy' needs a model with an accuracy metric; set "
            "contribution.utility = 'neg_loss'"
        )
    validation = context.server_data.reserve(
        section.validation_size, who="contribution.validation_size"
    )
    return ContributionMonitor(
        section=section,
        validation=validation,
        learner_factory=context.learner_factory,
        seed=context.seed,
    )
