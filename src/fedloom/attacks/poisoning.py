"""Poisoning attacks: malicious client behaviours that wrap the honest client algorithm.

A run with ``[attack] kind = "..."`` builds the honest client algorithm as usual and
wraps it in :class:`MaliciousClient`, registered in
:data:`fedloom.registry.CLIENT_ALGORITHMS` as ``attack:<kind>``. The wrapper answers for
every client: the ``fraction`` chosen by :func:`malicious_client_ids` (fixed for the run
by the seed) run the attack, everyone else trains honestly. Because the attack lives in
the client algorithm, every engine (in-process, pool, a gRPC deployment) runs it without
knowing it is there, and the server sees only what a real adversary could send.

Only the ``"delta"`` upload is forged; other uploads (a control variate) are the
client's honest ones. Each attack cites its paper; docs/robustness.md states the threat
model each one assumes:

* ``label_flip`` — data poisoning: labels y ↦ C − 1 − y before honest training (Fang
  et al. 2020, Section 5; Tolpegin et al. 2020).
* ``label_shuffle`` — useless data: the client's training labels randomly permuted
  (once, seeded by the run and the client), so labels carry no information about the
  inputs; the "random labels" of Zhang et al. 2017 (Section 2), used here as a
  free-rider whose update should earn no contribution (``fedloom.server.contribution``).
* ``sign_flip`` — send −k·Δ (the "reversed gradient" Byzantine of Damaskinos et al.
  2018 / Fang et al. 2020, scaled by k = ``factor``).
* ``scale`` — send k·Δ, the explicit boosting of Bhagoji et al. 2019, Eq. 3.
* ``gaussian`` — send N(0, σ² I) (the Gaussian Byzantine of Blanchard et al. 2017, §5).
* ``alie`` — "A little is enough" (Baruch et al. 2019, Algorithm 1): every coordinate
  moved z_max standard deviations off the mean, μ_j − z·σ_j, with z_max = Φ⁻¹((n − s)/n)
  and s = ⌊n/2 + 1⌋ − m (the paper allows μ_j ± z·σ_j; the minus opposes the mean).
* ``ipm`` — inner-product manipulation (Xie et al. 2020, Eq. 2 with the mean as the
  estimate of the true gradient): send −ε·μ.
* ``min_max`` / ``min_sum`` — Shejwalkar & Houmansadr 2021, Eqs. (4)-(5), Algorithm 1:
  μ + γ·∇p with the largest γ (halving search from ``gamma_init``) whose distance to the
  reference updates stays within theirs.
* ``backdoor`` — model replacement (Bagdasaryan et al. 2020, Eq. 3): train on data where
  a share of examples carries a pixel-pattern trigger relabelled to the target, and send
  γ·(L − G) with γ = n / (η·m).

ALIE, IPM, min-max and min-sum need statistics of honest updates. Here the adversary
colludes ("partial knowledge", Shejwalkar & Houmansadr 2021, Section 3): it controls all
malicious clients and holds their data, so each malicious client computes the honest
updates of *all* malicious clients from the round's broadcast (deterministic, seeded
local training) and crafts from their mean and standard deviation. It never sees an
honest client's update. With ``attack.knowledge = "omniscient"`` (the papers' own threat
model) the malicious clients upload their honest update and a server-side oracle of the
simulation, :mod:`fedloom.attacks.omniscient`, crafts from the round's honest updates.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np

from fedloom.algorithms.base import (
    AlgorithmSettings,
    ClientAlgorithm,
    ClientContext,
    ClientUpdate,
    StageContext,
)
from fedloom.client.learner import plan_work
from fedloom.client_store import ClientState
from fedloom.config import AttackConfig, ConfigError
from fedloom.data.base import ArrayDataset, ClientData
from fedloom.messages import DELTA, GLOBAL
from fedloom.registry import CLIENT_ALGORITHMS
from fedloom.seeding import derive_rng

#: Purpose tags for the attack's own random streams (kept apart from fedloom.seeding's).
ATTACK_CHOICE = 101
ATTACK_NOISE = 102
BACKDOOR_POISON = 103
LABEL_SHUFFLE = 104

ATTACK_KINDS = (
    "label_flip",
    "sign_flip",
    "gaussian",
    "scale",
    "alie",
    "ipm",
    "min_max",
    "min_sum",
    "backdoor",
    "label_shuffle",
)
#: The kinds that craft from the colluding clients' honest updates.
COLLUDING_KINDS = frozenset({"alie", "ipm", "min_max", "min_sum"})


def attack_algorithm_name(kind: str) -> str:
    """The client-algorithm registry name of an attack kind."""
    return f"attack:{kind}"


def malicious_client_ids(*, num_clients: int, fraction: float, seed: int) -> list[int]:
    """The malicious clients of a run: round(fraction · N) ids drawn from the seed.

    Public so that other stages (anomaly detection's precision and recall, a report) can
    learn the truth in simulation; a run stores the list as ``malicious_clients``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"attack fraction must be in [0, 1), got {fraction}")
    count = round(fraction * num_clients)
    if count == 0:
        return []
    rng = derive_rng(seed, ATTACK_CHOICE)
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def attack_client_ids(attack: AttackConfig, *, num_clients: int, seed: int) -> list[int]:
    """The run's malicious clients: ``attack.clients`` when named, else the seeded draw."""
    if attack.clients is not None:
        return sorted(set(attack.clients))
    return malicious_client_ids(num_clients=num_clients, fraction=attack.fraction, seed=seed)


def expected_per_round(
    malicious: int, *, num_clients: int, expected_clients: float
) -> tuple[int, int]:
    """(n, m): clients and malicious clients in an average round (at least one of each)."""
    n = max(1, round(expected_clients))
    m = max(1, round(malicious * expected_clients / max(num_clients, 1)))
    return n, min(m, n)


# ----------------------------------------------------------------------------- crafting


def alie_z_max(n: int, m: int) -> float:
    """Baruch et al. 2019, Algorithm 1: s = ⌊n/2 + 1⌋ − m supporters are needed, and
    z_max = Φ⁻¹((n − s)/n). With no supporters needed (a malicious majority) s is held
    at 1, the largest z the formula gives for n."""
    s = max(1, math.floor(n / 2 + 1) - m)
    return NormalDist().inv_cdf((n - s) / n)


def alie_update(references: np.ndarray, z: float) -> np.ndarray:
    """μ − z·σ per coordinate over the reference updates (Baruch et al. 2019, Alg. 1)."""
    mu = references.mean(axis=0)
    sigma = references.std(axis=0)
    return (mu - z * sigma).astype(np.float32)


def ipm_update(references: np.ndarray, epsilon: float) -> np.ndarray:
    """−ε·μ: a negative inner product with the true gradient's estimate (Xie et al. 2020)."""
    return (-epsilon * references.mean(axis=0)).astype(np.float32)


def perturbation_direction(references: np.ndarray, kind: str) -> np.ndarray:
    """∇p of Shejwalkar & Houmansadr 2021, Section 4: inverse unit vector, inverse
    standard deviation, or inverse sign of the mean update."""
    mu = references.mean(axis=0)
    if kind == "unit":
        norm = float(np.linalg.norm(mu))
        return -mu / norm if norm > 0 else np.zeros_like(mu)
    if kind == "std":
        return -references.std(axis=0)
    if kind == "sign":
        return -np.sign(mu)
    raise ValueError(f"unknown perturbation '{kind}'; choose unit, std or sign")


def _pairwise_sq(references: np.ndarray) -> np.ndarray:
    sq = np.sum(references.astype(np.float64) ** 2, axis=1)
    d = sq[:, None] + sq[None, :] - 2.0 * references.astype(np.float64) @ references.T
    return np.maximum(d, 0.0)


def min_max_update(
    references: np.ndarray,
    *,
    objective: str,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
) -> tuple[np.ndarray, float]:
    """The min-max (Eq. 4) or min-sum (Eq. 5) update of Shejwalkar & Houmansadr 2021.

    ∇m = μ + γ·∇p with the largest γ found by Algorithm 1's halving search such that
    min-max: max_i ‖∇m − ∇_i‖ ≤ max_{i,j} ‖∇_i − ∇_j‖, or
    min-sum: Σ_i ‖∇m − ∇_i‖² ≤ max_i Σ_j ‖∇_i − ∇_j‖².
    Returns (∇m, γ).
    """
    refs = references.astype(np.float64)
    mu = refs.mean(axis=0)
    direction = perturbation_direction(refs, perturbation)
    pair = _pairwise_sq(refs)
    bound = float(pair.max()) if objective == "min_max" else float(pair.sum(axis=1).max())

    def ok(gamma: float) -> bool:
        dist = np.sum((mu + gamma * direction - refs) ** 2, axis=1)
        return bool((dist.max() if objective == "min_max" else dist.sum()) <= bound)

    gamma, step, best = gamma_init, gamma_init / 2.0, 0.0
    while abs(best - gamma) > tolerance:
        if ok(gamma):
            best = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2.0
    return (mu + best * direction).astype(np.float32), best


def craft_colluding(
    attack: AttackConfig, references: np.ndarray, *, n: int, m: int
) -> tuple[np.ndarray, dict[str, float]]:
    """The colluders' one crafted update from ``references`` (ALIE, IPM, min-max or
    min-sum, as ``attack.kind`` says), and what the crafting chose (ALIE's z, min-max's
    γ). n and m are the clients and malicious clients of a round, for ALIE's z_max.
    Both knowledge models craft through here; only the references differ."""
    kind = attack.kind
    if kind == "alie":
        z = attack.z if attack.z is not None else alie_z_max(n, m)
        return alie_update(references, z), {"z": z}
    if kind == "ipm":
        return ipm_update(references, attack.epsilon), {}
    if kind in ("min_max", "min_sum"):
        forged, gamma = min_max_update(
            references,
            objective=kind,
            perturbation=attack.perturbation,
            gamma_init=attack.gamma_init,
        )
        return forged, {"gamma": gamma}
    raise ValueError(f"attack kind '{kind}' does not craft from honest updates")


# ----------------------------------------------------------------------------- data


def image_side(num_features: int) -> int:
    side = math.isqrt(num_features)
    if side * side != num_features:
        raise ConfigError(
            f"the backdoor trigger is a square pixel patch, but inputs have {num_features} "
            "features per example, not a square image; use an image data set (digits, mnist)"
        )
    return side


def apply_trigger(x: np.ndarray, *, size: int, value: float) -> np.ndarray:
    """A copy of ``x`` with a size × size pixel patch in each image's bottom-right corner
    set to ``value`` (Bagdasaryan et al. 2020's pixel pattern; digits are 8×8, MNIST
    28×28; channels share the patch)."""
    flat = x.reshape(len(x), -1).copy()
    side = image_side(flat.shape[1])
    if size > side:
        raise ConfigError(f"attack.trigger_size = {size} exceeds the image side {side}; lower it")
    images = flat.reshape(len(x), side, side)
    images[:, side - size :, side - size :] = value
    return images.reshape(x.shape).astype(x.dtype, copy=False)


def triggered_test_set(test: ArrayDataset, attack: AttackConfig) -> ArrayDataset:
    """The test examples whose true label is not the target, triggered and labelled with
    the target: accuracy on it is the backdoor's attack success rate."""
    keep = np.flatnonzero(test.y != attack.target_label)
    x = apply_trigger(test.x[keep], size=attack.trigger_size, value=attack.trigger_value)
    return ArrayDataset(x, np.full(len(keep), attack.target_label, dtype=test.y.dtype))


def poison_backdoor(
    train: ArrayDataset, attack: AttackConfig, seed: int, client_id: int
) -> ArrayDataset:
    """The client's data with ``poison_fraction`` of examples (a fixed draw) triggered
    and relabelled to the target; the rest stay clean so the main task survives."""
    n = len(train)
    count = max(1, round(attack.poison_fraction * n))
    rng = derive_rng(seed, BACKDOOR_POISON, client_id)
    pick = rng.choice(n, size=min(count, n), replace=False)
    x, y = train.x.copy(), train.y.copy()
    x[pick] = apply_trigger(x[pick], size=attack.trigger_size, value=attack.trigger_value)
    y[pick] = attack.target_label
    return ArrayDataset(x, y)


def shuffle_labels(train: ArrayDataset, *, seed: int, client_id: int) -> ArrayDataset:
    """The labels randomly permuted over the examples (seeded by run and client, so the
    same every round): the class counts stay, the link between x and y is gone."""
    rng = derive_rng(seed, LABEL_SHUFFLE, client_id)
    return ArrayDataset(train.x, train.y[rng.permutation(len(train.y))])


def flip_labels(train: ArrayDataset, num_classes: int) -> ArrayDataset:
    """y ↦ C − 1 − y (Fang et al. 2020, Section 5: the label-flipping attack)."""
    return ArrayDataset(train.x, (num_classes - 1 - train.y).astype(train.y.dtype))


# ----------------------------------------------------------------------------- the wrapper


@dataclass(frozen=True, kw_only=True)
class AttackSettings(AlgorithmSettings):
    """The honest algorithm's settings plus what the wrapper needs to attack with."""

    attack: AttackConfig
    #: The registered name of the honest client algorithm this attack wraps.
    honest: str = "sgd"
    #: Data of the clients this process can reach: the colluding attacks train on the
    #: other malicious clients' data (simulation, or a deployment of built-in partitions).
    data_of: Callable[[int], ClientData] | None = None


class MaliciousClient:
    """The honest algorithm for honest clients, the attack for the malicious ones."""

    def __init__(
        self,
        *,
        honest: ClientAlgorithm,
        attack: AttackConfig,
        malicious: list[int],
        context: StageContext,
        server_lr: float,
        data_of: Callable[[int], ClientData] | None,
    ) -> None:
        self.honest = honest
        self.attack = attack
        self.malicious = list(malicious)
        self._malicious_set = frozenset(malicious)
        self.context = context
        self.server_lr = server_lr
        self.data_of = data_of
        self.n, self.m = expected_per_round(
            len(malicious),
            num_clients=context.num_clients,
            expected_clients=context.expected_clients,
        )
        self._num_classes: int | None = None
        #: The colluders' crafted update of the latest round: (round, model digest) → Δ.
        self._crafted: tuple[tuple[int, str], np.ndarray] | None = None

    def check(self, learner: Any) -> None:
        check = getattr(self.honest, "check", None)
        if check is not None:
            check(learner)

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        return self.honest.evaluate(ctx)

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        if ctx.client_id not in self._malicious_set:
            return self.honest.fit(ctx)
        kind = self.attack.kind
        if kind == "label_flip":
            flipped = flip_labels(ctx.data.train, self._classes(ctx))
            return self.honest.fit(replace(ctx, data=replace(ctx.data, train=flipped)))
        if kind == "label_shuffle":
            shuffled = shuffle_labels(ctx.data.train, seed=ctx.seed, client_id=ctx.client_id)
            return self.honest.fit(replace(ctx, data=replace(ctx.data, train=shuffled)))
        if kind == "backdoor":
            return self._backdoor(ctx)
        update = self.honest.fit(ctx)
        if kind in COLLUDING_KINDS and self.attack.knowledge == "omniscient":
            # The server-side oracle (fedloom.attacks.omniscient) replaces this upload with
            # one crafted from the round's honest updates, which no client process sees.
            return update
        delta = update.vectors[DELTA]
        if kind == "sign_flip":
            forged = -self.attack.factor * delta
        elif kind == "scale":
            forged = self.attack.factor * delta
        elif kind == "gaussian":
            rng = derive_rng(ctx.seed, ATTACK_NOISE, ctx.round, ctx.client_id)
            forged = rng.normal(0.0, self.attack.sigma, size=delta.shape)
        else:
            forged = self._colluding(ctx, own=delta)
        vectors = dict(update.vectors)
        vectors[DELTA] = np.asarray(forged, dtype=np.float32)
        return ClientUpdate(vectors, dict(update.metrics))

    # -- backdoor -------------------------------------------------------------------------

    def boost(self) -> float:
        """γ = n / (η·m): the m colluders' mean share of the aggregate, undone so the global
        model is replaced by the backdoored one (Bagdasaryan et al. 2020, Eq. 3)."""
        if self.attack.boost is not None:
            return self.attack.boost
        return self.n / (self.server_lr * self.m)

    def _backdoor(self, ctx: ClientContext) -> ClientUpdate:
        poisoned = poison_backdoor(ctx.data.train, self.attack, ctx.seed, ctx.client_id)
        update = self.honest.fit(replace(ctx, data=replace(ctx.data, train=poisoned)))
        vectors = dict(update.vectors)
        vectors[DELTA] = (self.boost() * vectors[DELTA]).astype(np.float32)
        return ClientUpdate(vectors, dict(update.metrics))

    # -- colluding model poisoning ----------------------------------------------------------

    def _colluding(self, ctx: ClientContext, *, own: np.ndarray) -> np.ndarray:
        digest = hashlib.sha1(np.ascontiguousarray(ctx.broadcast[GLOBAL]).tobytes()).hexdigest()
        key = (ctx.round, digest)
        if self._crafted is not None and self._crafted[0] == key:
            return self._crafted[1]
        refs = self.reference_updates(ctx, own=own)
        forged, _ = craft_colluding(self.attack, refs, n=self.n, m=self.m)
        self._crafted = (key, forged)
        return forged

    def reference_updates(self, ctx: ClientContext, *, own: np.ndarray) -> np.ndarray:
        """The honest updates of every malicious client whose data this process reaches,
        trained from this round's broadcast exactly as each would train (own seeds, own
        work plan; a fresh client state for algorithms that keep one)."""
        rows = []
        for cid in self.malicious:
            if cid == ctx.client_id:
                rows.append(own)
                continue
            data = self._reach(cid)
            if data is None:
                continue
            plan = plan_work(
                ctx.work,
                seed=ctx.seed,
                round=ctx.round,
                client_id=cid,
                num_examples=len(data.train),
            )
            other = replace(ctx, client_id=cid, data=data, state=ClientState(), plan=plan)
            rows.append(self.honest.fit(other).vectors[DELTA])
        return np.stack(rows).astype(np.float32)

    def _reach(self, cid: int) -> ClientData | None:
        if self.data_of is None:
            return None
        try:
            data = self.data_of(cid)
        except (IndexError, KeyError):
            return None
        return data if data.client_id == cid else None

    def _classes(self, ctx: ClientContext) -> int:
        """The number of classes: the width of the model's output."""
        if self._num_classes is None:
            import torch

            model = ctx.learner.model
            with torch.no_grad():
                out = model(torch.from_numpy(ctx.data.train.x[:1]).to(ctx.learner.device))
            self._num_classes = int(out.shape[-1])
        return self._num_classes


def make_attack(kind: str) -> Callable[[AlgorithmSettings, StageContext], MaliciousClient]:
    def factory(settings: AlgorithmSettings, context: StageContext) -> MaliciousClient:
        if not isinstance(settings, AttackSettings):
            raise ConfigError(
                f"client algorithm '{attack_algorithm_name(kind)}' is chosen by the [attack] "
                f"table; set attack.kind = '{kind}' instead of client.algorithm"
            )
        honest = CLIENT_ALGORITHMS.create(settings.honest, settings, context)
        malicious = attack_client_ids(
            settings.attack, num_clients=context.num_clients, seed=context.seed
        )
        return MaliciousClient(
            honest=honest,
            attack=settings.attack.model_copy(update={"kind": kind}),
            malicious=malicious,
            context=context,
            server_lr=settings.server_lr,
            data_of=settings.data_of,
        )

    return factory


for _kind in ATTACK_KINDS:
    CLIENT_ALGORITHMS.add(attack_algorithm_name(_kind), make_attack(_kind))
