"""Client selection: which clients of the pool a fixed-size round asks.

A selector picks ``count`` clients of the available pool and learns from what came back
(each client's training loss, its example count, and, on the virtual clock, how long it
took). ``uniform`` is plain fixed-size sampling without replacement (McMahan et al. 2017)
and the only selector whose sampling the DP accountants model; the others are biased on
purpose and are refused with central DP at config time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from fedloom.messages import FitResult
from fedloom.registry import CLIENT_SELECTORS


class ClientSelector(Protocol):
    #: True only for uniform sampling (what the privacy accountants assume).
    uniform: bool

    def select(
        self, rnd: int, pool: np.ndarray, count: int, rng: np.random.Generator
    ) -> np.ndarray:
        """``count`` distinct ids of ``pool``, sorted."""
        ...

    def observe(
        self, rnd: int, updates: Sequence[FitResult], durations: Mapping[int, float]
    ) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: Mapping[str, Any]) -> None: ...


class UniformSelector:
    """Every ``count``-subset of the pool equally likely."""

    uniform = True

    def select(
        self, rnd: int, pool: np.ndarray, count: int, rng: np.random.Generator
    ) -> np.ndarray:
        index = np.sort(rng.choice(len(pool), size=count, replace=False))
        return pool[index].astype(np.int64)

    def observe(
        self, rnd: int, updates: Sequence[FitResult], durations: Mapping[int, float]
    ) -> None:
        return None

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        return None


class _ClientHistory:
    """What a biased selector remembers per client (JSON-checkpointed, sparse)."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.examples: dict[int, int] = {}
        self.duration: dict[int, float] = {}
        self.last_round: dict[int, int] = {}

    def observe(
        self, rnd: int, updates: Sequence[FitResult], durations: Mapping[int, float]
    ) -> None:
        for u in updates:
            loss = u.metrics.get("train_loss")
            if loss is not None and math.isfinite(float(loss)):
                self.loss[u.client_id] = float(loss)
                self.examples[u.client_id] = int(u.num_examples)
                self.last_round[u.client_id] = rnd
        for c, d in durations.items():
            self.duration[int(c)] = float(d)

    def state(self) -> dict[str, Any]:
        return {
            name: {str(k): v for k, v in getattr(self, name).items()}
            for name in ("loss", "examples", "duration", "last_round")
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        for name, cast in (("loss", float), ("examples", int), ("duration", float)):
            setattr(self, name, {int(k): cast(v) for k, v in state.get(name, {}).items()})
        self.last_round = {int(k): int(v) for k, v in state.get("last_round", {}).items()}


class PowerOfChoiceSelector:
    """Power-of-choice (Cho, Wang & Joshi 2022, AISTATS, Section 3): draw a candidate set
    of ``d`` clients, then ask the ``count`` with the highest local loss.

    The loss of a candidate is the training loss it reported the last time it took part
    (the paper's communication-free variant, rpow-d); a client never seen yet ranks
    first, so every client is tried once. The paper draws candidates in proportion to
    their data size; the server does not know sizes before a client reports, so
    candidates are drawn uniformly (the same when clients hold equal amounts of data).
    ``d`` defaults to twice the cohort (``options.candidates`` or ``options.d_factor``).
    """

    uniform = False

    def __init__(self, *, candidates: int | None = None, d_factor: float = 2.0) -> None:
        if d_factor < 1.0:
            raise ValueError("power_of_choice: d_factor must be at least 1")
        self.candidates = candidates
        self.d_factor = d_factor
        self.history = _ClientHistory()

    def select(
        self, rnd: int, pool: np.ndarray, count: int, rng: np.random.Generator
    ) -> np.ndarray:
        d = self.candidates if self.candidates is not None else math.ceil(self.d_factor * count)
        d = min(len(pool), max(count, d))
        candidates = pool[rng.choice(len(pool), size=d, replace=False)]
        loss = np.array([self.history.loss.get(int(c), math.inf) for c in candidates])
        # Highest loss first; ties (e.g. unseen clients) broken by the random draw order.
        order = np.argsort(-loss, kind="stable")
        return np.sort(candidates[order[:count]]).astype(np.int64)

    def observe(
        self, rnd: int, updates: Sequence[FitResult], durations: Mapping[int, float]
    ) -> None:
        self.history.observe(rnd, updates, durations)

    def state(self) -> dict[str, Any]:
        return self.history.state()

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.history.load_state(state)


class OortSelector:
    """Oort (Lai et al. 2021, OSDI, Section 4 and Algorithm 1): ask the clients with the
    best statistical utility per unit of time, and keep exploring.

    Utility of an explored client i at round R (Eq. 2 with the staleness bonus of
    Section 4.2)::

        U_i = n_i · L_i + sqrt(0.1 · ln R / r_i)  ·  (T / t_i)^α  if t_i > T else 1

    where n_i · L_i stands for the paper's |B_i| · sqrt(mean of squared sample losses)
    (clients report their mean training loss, a lower bound of that root mean square),
    r_i is the last round i took part in, t_i its last duration and T the preferred
    round duration (``preferred_duration_s``; default: the median duration seen so far).
    A fraction ε of the cohort (0.9, decaying by 0.98 a round to 0.2) explores clients
    never seen, fastest first when their speed is known; the rest is drawn among the
    explored clients whose utility is at least 95 % of the cutoff utility, with
    probability proportional to utility.
    """

    uniform = False

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        preferred_duration_s: float | None = None,
        epsilon: float = 0.9,
        epsilon_decay: float = 0.98,
        epsilon_min: float = 0.2,
        cutoff: float = 0.95,
    ) -> None:
        self.alpha = alpha
        self.preferred = preferred_duration_s
        self.epsilon0 = epsilon
        self.decay = epsilon_decay
        self.epsilon_min = epsilon_min
        self.cutoff = cutoff
        self.history = _ClientHistory()

    def epsilon(self, rnd: int) -> float:
        return max(self.epsilon_min, self.epsilon0 * self.decay ** max(0, rnd - 1))

    def utility(self, client_id: int, rnd: int) -> float:
        h = self.history
        stat = h.examples[client_id] * h.loss[client_id]
        stat += math.sqrt(0.1 * math.log(max(rnd, 2)) / max(h.last_round[client_id], 1))
        t = h.duration.get(client_id)
        target = self.preferred
        if target is None and h.duration:
            target = float(np.median(list(h.duration.values())))
        if t is not None and target is not None and t > target:
            stat *= (target / t) ** self.alpha
        return stat

    def select(
        self, rnd: int, pool: np.ndarray, count: int, rng: np.random.Generator
    ) -> np.ndarray:
        explored = [int(c) for c in pool if int(c) in self.history.loss]
        unexplored = [int(c) for c in pool if int(c) not in self.history.loss]
        explore = min(len(unexplored), max(count - len(explored), round(self.epsilon(rnd) * count)))
        exploit = count - explore
        chosen: list[int] = []
        if exploit > 0:
            utils = np.array([self.utility(c, rnd) for c in explored])
            ranked = np.argsort(-utils, kind="stable")
            threshold = self.cutoff * utils[ranked[exploit - 1]]
            eligible = np.flatnonzero(utils >= threshold)
            weights = np.maximum(utils[eligible], 1e-12)
            picked = rng.choice(
                len(eligible), size=exploit, replace=False, p=weights / weights.sum()
            )
            chosen += [explored[i] for i in eligible[picked]]
        if explore > 0:
            speed = np.array([self.history.duration.get(c, math.nan) for c in unexplored])
            order = rng.permutation(len(unexplored))
            known = order[~np.isnan(speed[order])]
            known = known[np.argsort(speed[known], kind="stable")]
            order = np.concatenate([known, order[np.isnan(speed[order])]])
            chosen += [unexplored[i] for i in order[:explore]]
        return np.sort(np.asarray(chosen, dtype=np.int64))

    def observe(
        self, rnd: int, updates: Sequence[FitResult], durations: Mapping[int, float]
    ) -> None:
        self.history.observe(rnd, updates, durations)

    def state(self) -> dict[str, Any]:
        return self.history.state()

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.history.load_state(state)


@CLIENT_SELECTORS.register("uniform")
def make_uniform(options: Mapping[str, Any]) -> UniformSelector:
    return UniformSelector()


@CLIENT_SELECTORS.register("power_of_choice")
def make_power_of_choice(options: Mapping[str, Any]) -> PowerOfChoiceSelector:
    return PowerOfChoiceSelector(**dict(options))


@CLIENT_SELECTORS.register("oort")
def make_oort(options: Mapping[str, Any]) -> OortSelector:
    return OortSelector(**dict(options))
