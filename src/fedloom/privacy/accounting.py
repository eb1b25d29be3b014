"""Privacy accounting for central (user-level) DP, on Google's ``dp-accounting``.

fedloom does not derive any privacy bound itself. Every ε comes from
``dp_accounting``'s Rényi-DP accountant (``RdpAccountant``, Mironov 2017; subsampled
Gaussian of Mironov, Talwar & Zhang 2019 and Wang, Balle & Kasiviswanathan 2019) or its
privacy-loss-distribution accountant (``PLDAccountant``, Koskela et al. 2020; Doroshenko
et al. 2022), fed with the ``DpEvent`` that describes one round:

* **Poisson sampling** (``server.sampling = "poisson"``): each of the N clients takes part
  independently with probability q. One round of DP-FedAvg is
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under add-or-remove-one-client
  adjacency: adding or removing one client's clipped update moves the sum by at most the
  clipping norm C, and the noise has standard deviation z·C (McMahan et al. 2018,
  "Learning Differentially Private Recurrent Language Models", Theorem 1 and Algorithm 1).
* **Fixed-size sampling** (``server.sampling = "fixed"``): k of the N clients, uniformly
  without replacement. The size k is public only if N is, so the accountant uses
  replace-one-client adjacency (``SampledWithoutReplacementDpEvent``, Wang, Balle &
  Kasiviswanathan 2019, Theorem 27). Replacing one client's clipped update by another's
  moves the sum by up to **2C**, and ``dp_accounting``'s noise multiplier is σ divided by
  the L2 sensitivity, so the event is ``GaussianDpEvent(z / 2)``. Forgetting that factor
  would understate ε; fixed-size sampling therefore costs clearly more ε than Poisson
  sampling at the same z and q. The PLD accountant has no fixed-size event, so fixed-size
  sampling needs the RDP accountant.

Every round in which the mechanism runs is one event, including rounds in which Poisson
sampling picked nobody (the server still releases noise). The ledger is three numbers,
(event parameters, z, rounds T), so ε after T rounds is a pure function of it: a resumed
run rebuilds the same accountant from its checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import dp_accounting
import numpy as np
from dp_accounting import rdp as dp_rdp
from dp_accounting.rdp import rdp_privacy_accountant

SamplingScheme = Literal["poisson", "fixed"]
AccountantName = Literal["rdp", "pld"]

#: RDP orders: ``dp_accounting``'s defaults (fine steps below 11, integers to 63, then
#: 128..1024), which cover the Gaussian mechanism's useful regime.
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS)

#: Discretization of the PLD accountant (``dp_accounting``'s default). Smaller is tighter
#: and slower; the PLD ε is an upper bound at any discretization (pessimistic rounding).
PLD_DISCRETIZATION = 1e-4


@dataclass(frozen=True)
class ClientSampling:
    """How a round's clients are chosen from a population of ``population`` clients.

    ``clients_per_round`` is the exact sample size k for fixed-size sampling and the
    expected size qN for Poisson sampling; either way it is the fixed denominator of the
    DP-FedAvg estimator (McMahan et al. 2018, Algorithm 1).
    """

    scheme: SamplingScheme
    population: int
    clients_per_round: float

    def __post_init__(self) -> None:
        if self.population < 1:
            raise ValueError(f"population must be >= 1, got {self.population}")
        if not 0.0 < self.clients_per_round <= self.population:
            raise ValueError(
                f"clients_per_round must be in (0, {self.population}], got {self.clients_per_round}"
            )
        if self.scheme == "fixed" and float(self.clients_per_round) != int(self.clients_per_round):
            raise ValueError("fixed-size sampling needs an integer clients_per_round")

    @property
    def rate(self) -> float:
        """The sampling rate q (the probability that a given client takes part)."""
        return float(self.clients_per_round) / self.population

    @property
    def neighboring_relation(self) -> dp_accounting.NeighboringRelation:
        """Add/remove-one-client for Poisson sampling, replace-one-client for fixed size."""
        if self.scheme == "poisson":
            return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        return dp_accounting.NeighboringRelation.REPLACE_ONE

    def describe(self) -> dict[str, Any]:
        return {
            "sampling": self.scheme,
            "sampling_rate": self.rate,
            "population": self.population,
            "clients_per_round": self.clients_per_round,
            "neighboring_relation": (
                "add or remove one client"
                if self.scheme == "poisson"
                else "replace one client (sensitivity 2C)"
            ),
        }


def round_event(noise_multiplier: float, sampling: ClientSampling) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of one DP-FedAvg round (see the module docstring for the 2C factor).

    McMahan et al. 2018, Algorithm 1: the sum of clipped updates of the sampled clients
    plus N(0, (zC)² I). Poisson: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
    (Mironov, Talwar & Zhang 2019); fixed size:
    ``SampledWithoutReplacementDpEvent(N, k, GaussianDpEvent(z/2))`` (Wang, Balle &
    Kasiviswanathan 2019, Theorem 27, replace-one adjacency).
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if sampling.scheme == "poisson":
        return dp_accounting.PoissonSampledDpEvent(
            sampling.rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
    return dp_accounting.SampledWithoutReplacementDpEvent(
        sampling.population,
        int(sampling.clients_per_round),
        dp_accounting.GaussianDpEvent(noise_multiplier / 2.0),
    )


def make_dp_accountant(
    accountant: AccountantName, sampling: ClientSampling
) -> dp_accounting.PrivacyAccountant:
    """A fresh ``dp_accounting`` accountant with the adjacency ``sampling`` needs."""
    if accountant == "rdp":
        return dp_rdp.RdpAccountant(RDP_ORDERS, sampling.neighboring_relation)
    if accountant == "pld":
        if sampling.scheme != "poisson":
            raise ValueError(
                "the PLD accountant supports Poisson sampling only; use the RDP accountant "
                "for fixed-size sampling"
            )
        return dp_accounting.pld.PLDAccountant(
            sampling.neighboring_relation, value_discretization_interval=PLD_DISCRETIZATION
        )
    raise ValueError(f"unknown accountant '{accountant}'")


class _DropUnconvergedOrders(logging.Filter):
    """Hide ``dp_accounting``'s per-order convergence warnings.

    For some (q, σ) the series for fractional orders close to 1 does not converge;
    ``dp_accounting`` then logs a warning and *excludes that order*, which can only make
    ε larger (a valid, slightly looser bound). Calibration evaluates dozens of candidate
    σ and would print that warning for each, so it is dropped while we call in.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    logger = logging.getLogger("absl")
    flt = _DropUnconvergedOrders()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def compute_epsilon(
    accountant: AccountantName,
    sampling: ClientSampling,
    noise_multiplier: float,
    rounds: int,
    delta: float,
) -> float:
    """ε(δ) after ``rounds`` rounds, from a fresh ``dp_accounting`` accountant.

    The reference computation: :class:`PrivacyAccountant` gives the same number, faster
    per round.
    """
    if rounds <= 0:
        return 0.0
    acc = make_dp_accountant(accountant, sampling)
    with _quiet_accountant():
        acc.compose(round_event(noise_multiplier, sampling), int(rounds))
        return float(acc.get_epsilon(delta))


def calibrate_noise_multiplier(
    accountant: AccountantName,
    sampling: ClientSampling,
    rounds: int,
    target_epsilon: float,
    delta: float,
    tol: float = 1e-6,
) -> float:
    """The smallest noise multiplier z (within ``tol``) with ε(δ) ≤ ``target_epsilon``.

    ``dp_accounting.calibrate_dp_mechanism`` (Brent's method over fresh accountants, with
    a fallback bisection that guarantees the returned value meets the target). Raises
    ``ValueError`` when no z in (0, 2^30] reaches the target, e.g. an ε so small that
    ``rounds`` rounds cannot fit.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if target_epsilon <= 0 or not 0 < delta < 1:
        raise ValueError("target_epsilon must be > 0 and delta in (0, 1)")

    def event(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(round_event(z, sampling), rounds)

    def fresh() -> dp_accounting.PrivacyAccountant:
        return make_dp_accountant(accountant, sampling)

    bracket: dp_accounting.mechanism_calibration.BracketInterval
    if accountant == "pld":
        # A PLD at a tiny z spans an enormous privacy-loss range (tens of GiB at z = 1e-3),
        # so bracket from the RDP answer instead: PLD is tighter than RDP, so the RDP z
        # meets the target under PLD too, and halving finds a z that does not.
        upper = calibrate_noise_multiplier("rdp", sampling, rounds, target_epsilon, delta, tol)
        lower = upper / 2.0
        while lower > 0.05 and (
            compute_epsilon("pld", sampling, lower, rounds, delta) <= target_epsilon
        ):
            lower /= 2.0
        bracket = dp_accounting.ExplicitBracketInterval(lower, upper)
    else:
        # Start above 0: at z = 0 the mechanism is not private (ε = ∞), which Brent's
        # method cannot evaluate; 1e-3 is far below any useful z.
        bracket = dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
    with _quiet_accountant():
        try:
            z = dp_accounting.calibrate_dp_mechanism(
                fresh, event, target_epsilon, delta, bracket_interval=bracket, tol=tol
            )
        except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError as err:
            raise ValueError(
                f"no noise multiplier reaches ε = {target_epsilon} at δ = {delta} "
                f"over {rounds} rounds"
            ) from err
    return float(z)


class PrivacyAccountant:
    """The run's privacy ledger and its ε.

    The ledger is the event's parameters (accountant, sampling, noise multiplier z) and
    the number of rounds T the mechanism has run. ε(T) is memoized: the round loop asks
    for ε(T + 1) ahead of a round (``privacy.max_epsilon``) and then for the same value
    after it.

    A round whose clients were drawn at another sampling than the configured one (a
    deployment samples k among the *connected* clients: q = k / connected, not k / N)
    is counted at the sampling that happened (:meth:`step` with ``sampling``);
    :attr:`other` holds those rounds by sampling, and ε composes every round's own event
    (RDP adds per-round RDP vectors; Mironov 2017, Proposition 1).

    With the RDP accountant, composition over rounds is additive in RDP (Mironov 2017,
    Proposition 1), and ``RdpAccountant.compose(event, T)`` computes the event's RDP
    vector once and multiplies it by T. We do the same, once per run: the RDP vector of
    one round comes from ``RdpAccountant`` (public ``rdp`` property) and the conversion
    to (ε, δ) from ``dp_accounting.rdp.compute_epsilon``, so ε is bit-for-bit what a
    fresh accountant composed T times reports, at a few microseconds per round.

    The PLD accountant composes by convolution. Rebuilding it for every T (one round's
    PLD, self-composed T times) made a round's cost grow with the rounds so far; instead
    the composed PLD of T rounds is kept and convolved with the one round's PLD (built
    once, exactly as ``PLDAccountant`` builds it) to get T + 1. ε agrees with a fresh
    ``PLDAccountant`` to about 1e-9 relative (both are pessimistic; the tails are
    truncated after each composition instead of once). A request for fewer rounds than
    the kept PLD (a resume) rebuilds it by self-composition.
    """

    def __init__(
        self,
        accountant: AccountantName,
        sampling: ClientSampling,
        noise_multiplier: float,
        delta: float,
        rounds: int = 0,
    ) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.accountant: AccountantName = accountant
        self.sampling = sampling
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.rounds = int(rounds)
        #: Rounds (among :attr:`rounds`) drawn at another sampling than :attr:`sampling`.
        self.other: dict[ClientSampling, int] = {}
        self._cache: dict[tuple[int, frozenset[tuple[ClientSampling, int]]], float] = {}
        self._rdp: dict[ClientSampling, np.ndarray] = {}
        self._pld: Any = None  # the PLD of ``_pld_rounds`` rounds (PLD accountant only)
        self._pld_rounds = 0
        make_dp_accountant(accountant, sampling)  # fail now on an unsupported combination

    @cached_property
    def _rdp_per_round(self) -> np.ndarray:
        return self._rdp_of(self.sampling)

    def _rdp_of(self, sampling: ClientSampling) -> np.ndarray:
        if sampling not in self._rdp:
            acc = make_dp_accountant("rdp", sampling)
            with _quiet_accountant():
                acc.compose(round_event(self.noise_multiplier, sampling))
            self._rdp[sampling] = acc.rdp
        return self._rdp[sampling]

    def epsilon(self, rounds: int | None = None) -> float:
        """ε at this ledger's δ after ``rounds`` rounds (default: the rounds so far); rounds
        beyond the ledger's are counted at the configured sampling."""
        t = self.rounds if rounds is None else int(rounds)
        if t < 0:
            raise ValueError(f"rounds must be >= 0, got {t}")
        return self._epsilon_of(t, self.other)

    def epsilon_after(self, sampling: ClientSampling | None) -> float:
        """ε if one more round ran at ``sampling`` (None: the configured sampling)."""
        if sampling is None or sampling == self.sampling:
            return self.epsilon(self.rounds + 1)
        other = dict(self.other)
        other[sampling] = other.get(sampling, 0) + 1
        return self._epsilon_of(self.rounds + 1, other)

    def _epsilon_of(self, t: int, other: dict[ClientSampling, int]) -> float:
        key = (t, frozenset(other.items()))
        if key not in self._cache:
            self._cache[key] = self._compute(t, other)
        return self._cache[key]

    def _compute(self, t: int, other: dict[ClientSampling, int]) -> float:
        if t == 0:
            return 0.0
        if self.accountant == "rdp":
            nominal = max(0, t - sum(other.values()))
            rdp = nominal * self._rdp_per_round
            for sampling, count in other.items():
                rdp = rdp + count * self._rdp_of(sampling)
            eps, _order = dp_rdp.compute_epsilon(np.asarray(RDP_ORDERS), rdp, self.delta)
            return float(eps)
        if other:
            raise ValueError("the PLD accountant composes one sampling only; use the RDP one")
        if t == 0 or self.sampling.rate == 0 or self.noise_multiplier == 0:
            # Trivial PLDs (ε = 0 or ∞): dp_accounting's own answer, no convolution.
            return compute_epsilon("pld", self.sampling, self.noise_multiplier, t, self.delta)
        with _quiet_accountant():
            if self._pld is None or t < self._pld_rounds:
                self._pld = self._one_round_pld.self_compose(t)
            elif t > self._pld_rounds:
                extra = t - self._pld_rounds
                step = (
                    self._one_round_pld if extra == 1 else self._one_round_pld.self_compose(extra)
                )
                self._pld = self._pld.compose(step)
            self._pld_rounds = t
            return float(self._pld.get_epsilon_for_delta(self.delta))

    @cached_property
    def _one_round_pld(self) -> Any:
        """One round's PLD, with ``PLDAccountant``'s own construction for a
        ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``."""
        from dp_accounting.pld import privacy_loss_distribution as pld

        return pld.from_gaussian_mechanism(
            standard_deviation=self.noise_multiplier,
            value_discretization_interval=PLD_DISCRETIZATION,
            sampling_prob=self.sampling.rate,
            neighboring_relation=self.sampling.neighboring_relation,
        )

    def step(self, sampling: ClientSampling | None = None) -> None:
        """Count one more round of the mechanism, drawn at ``sampling`` (None: as
        configured)."""
        self.rounds += 1
        if sampling is not None and sampling != self.sampling:
            self.other[sampling] = self.other.get(sampling, 0) + 1

    def ledger(self) -> dict[str, Any]:
        out = {
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon": self.epsilon(),
            "noise_multiplier": self.noise_multiplier,
            "rounds": self.rounds,
            **self.sampling.describe(),
        }
        if self.other:
            out["rounds_at_other_sampling"] = [
                {**s.describe(), "rounds": n}
                for s, n in sorted(self.other.items(), key=lambda kv: kv[0].rate)
            ]
        return out
