"""Privacy accounting: fedloom's ε against independent analyses, and calibration.

Poisson sampling is checked against Opacus' own RDP analysis of the sampled Gaussian
mechanism, on the same RDP orders; fixed-size sampling against the general upper bound of
Wang, Balle & Kasiviswanathan (2019, Theorem 9), implemented here in NumPy/math.
"""

import functools
import itertools
import math
import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp as dp_rdp
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedloom.privacy.accounting import (
    RDP_ORDERS,
    ClientSampling,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    compute_epsilon,
    round_event,
)

POPULATION = 1000
# (q, z, T, δ): the test vectors.
VECTORS = [(0.01, 1.1, 1000, 1e-5), (0.1, 1.0, 100, 1e-5), (0.05, 0.8, 500, 1e-6)]
# (q, z, T, δ) grid for the comparison with Opacus.
GRID = list(itertools.product([0.01, 0.1, 0.5], [0.8, 1.1, 4.0], [10, 1000], [1e-5, 1e-6]))
# Cases where fedloom's ε (dp-accounting 0.6) is more than 1 % above Opacus' on the same
# orders (measured: up to +65 % at q = 0.5, z = 0.8, T = 1000, where ε ≈ 571 vs 347). All
# have ε > 25 and an optimal order below 2.5. The difference is the fractional-order
# analysis, not the grid: at fractional α, dp-accounting's series for log A_α adds the
# binomial terms' absolute values and drops orders whose series does not converge in 1000
# terms (a valid but looser upper bound), while Opacus keeps the terms' signs; Opacus'
# RDP there agrees with numerical integration of E[(μ/μ0)^α] to 1e-8. At integer orders
# the two agree to 1e-7; the test brackets fedloom's ε between them in every case.
LOOSE_AT_FRACTIONAL_ORDERS = {
    (0.1, 0.8, 1000, 1e-5),
    (0.1, 0.8, 1000, 1e-6),
    (0.5, 0.8, 1000, 1e-5),
    (0.5, 0.8, 1000, 1e-6),
    (0.5, 1.1, 1000, 1e-5),
    (0.5, 1.1, 1000, 1e-6),
    (0.5, 4.0, 1000, 1e-6),
}


def _poisson(q: float) -> ClientSampling:
    return ClientSampling("poisson", POPULATION, q * POPULATION)


def _direct_rdp_poisson(q: float, z: float, steps: int, delta: float) -> float:
    """dp-accounting used directly, as a reviewer would, with fedloom's orders."""
    acc = dp_rdp.RdpAccountant(list(RDP_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return float(acc.get_epsilon(delta))


@functools.cache
def _fedloom_poisson(q: float, z: float, delta: float) -> PrivacyAccountant:
    """One ledger per (q, z, δ): it computes the per-round RDP once, for every T."""
    return PrivacyAccountant("rdp", _poisson(q), z, delta)


@functools.cache
def _opacus_rdp_per_round(q: float, z: float, orders: tuple[float, ...]) -> np.ndarray:
    """Opacus' RDP of one Poisson-subsampled Gaussian step (Mironov, Talwar & Zhang 2019)."""
    return np.asarray(compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(orders)))


def _opacus_epsilon(
    q: float, z: float, steps: int, delta: float, orders: tuple[float, ...]
) -> float:
    """ε from Opacus over ``orders``: T times the per-step RDP (what ``compute_rdp(steps=T)``
    returns) and Opacus' RDP-to-(ε, δ) conversion (Balle et al. 2020, Theorem 21, the same
    conversion as dp-accounting's)."""
    with warnings.catch_warnings():  # "optimal order is the largest alpha" hints
        warnings.simplefilter("ignore")
        eps, _order = get_privacy_spent(
            orders=list(orders), rdp=steps * _opacus_rdp_per_round(q, z, orders), delta=delta
        )
    return float(eps)


@pytest.mark.parametrize(("q", "z", "steps", "delta"), VECTORS)
def test_rdp_epsilon_equals_dp_accounting(q: float, z: float, steps: int, delta: float) -> None:
    reported = PrivacyAccountant("rdp", _poisson(q), z, delta).epsilon(steps)
    assert reported == pytest.approx(_direct_rdp_poisson(q, z, steps, delta), rel=1e-12)


@pytest.mark.parametrize(("q", "z", "steps", "delta"), GRID + VECTORS)
def test_rdp_epsilon_matches_opacus_on_the_same_orders(
    q: float, z: float, steps: int, delta: float
) -> None:
    """fedloom's ε against Opacus' analysis over fedloom's own RDP orders.

    Within 1 % except in ``LOOSE_AT_FRACTIONAL_ORDERS``; measured largest relative
    difference elsewhere: 6.4e-3 (q = 0.1, z = 1.1, T = 1000, δ = 1e-6), most cases agree to
    better than 1e-4. Everywhere: Opacus over all of fedloom's orders ≤ fedloom's ε ≤ Opacus
    over the integer orders among them, where both compute A_α exactly (binomial
    expansion), so fedloom is never more optimistic than Opacus on the same orders and never
    looser than its integer-order analysis (measured: both sides hold to 5e-13).
    """
    reported = _fedloom_poisson(q, z, delta).epsilon(steps)
    opacus = _opacus_epsilon(q, z, steps, delta, RDP_ORDERS)
    integer_orders = tuple(a for a in RDP_ORDERS if a.is_integer())
    assert reported >= opacus * (1 - 1e-6)
    assert reported <= _opacus_epsilon(q, z, steps, delta, integer_orders) * (1 + 1e-6)
    if (q, z, steps, delta) not in LOOSE_AT_FRACTIONAL_ORDERS:
        assert reported == pytest.approx(opacus, rel=0.01)


# Fixed-size sampling: fedloom's ε against an independent bound.

# (population N, clients per round k, z, T, δ); measured fedloom ε / bound: 1.0000, 1.0000,
# 0.9086, 1.0000 (dp-accounting uses WBK's Theorem 27, the Gaussian-specific refinement of
# Theorem 9, which is tighter only in the third case). The mis-accountings checked below
# land at most at 0.69 × the bound (one round instead of T = 10), 0.40 × (sensitivity C
# instead of 2C) and 0.19 × (Poisson sampling).
FIXED_CASES = [
    (1000, 10, 1.1, 200, 1e-5),
    (1000, 10, 2.0, 1000, 1e-5),
    (100, 10, 4.0, 100, 1e-6),
    (1000, 10, 0.8, 10, 1e-5),
]
WBK_ORDERS = range(2, 257)  # Theorem 9 holds at integer orders α ≥ 2


def _wbk_theorem9_rdp(gamma: float, noise_multiplier: float, alpha: int) -> float:
    """RDP ε'(α), integer α ≥ 2, of one fedloom round with fixed-size client sampling.

    Wang, Balle & Kasiviswanathan, "Subsampled Rényi Differential Privacy and Analytical
    Moments Accountant", AISTATS 2019, Theorem 9 (general upper bound for subsampling m of
    n without replacement, γ = m/n, replace-one adjacency; Theorem 27 in arXiv:1808.00087v2
    is its Gaussian-specific refinement, which dp-accounting implements). For a mechanism
    that is (α, ε(α))-RDP:

        ε'(α) ≤ 1/(α−1) · log(1 + γ² C(α,2) min{4(e^{ε(2)} − 1), e^{ε(2)} min{2, (e^{ε(∞)} − 1)²}}
                               + Σ_{j=3..α} γ^j C(α,j) e^{(j−1) ε(j)} min{2, (e^{ε(∞)} − 1)^j})

    The Gaussian mechanism has ε(∞) = ∞, so both inner minima are 2. Sensitivity
    convention: fedloom adds N(0, (zC)² I) to the sum of clients' updates clipped to norm
    C, and replacing one client's update by another's moves that sum by up to Δ = 2C, so
    ε(α) = α Δ² / (2σ²) = α / (2 (z/2)²) = 2α / z²; in dp-accounting's terms
    (``GaussianDpEvent``'s noise multiplier is σ / L2 sensitivity) the base mechanism has
    noise multiplier z/2, and ``SampledWithoutReplacementDpEvent`` needs REPLACE_ONE.
    Summed in log space (log-sum-exp).
    """

    def eps(order: float) -> float:
        return 2.0 * order / noise_multiplier**2

    def log_binom(n: int, j: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)

    log_gamma = math.log(gamma)
    terms = [
        0.0,
        2 * log_gamma
        + log_binom(alpha, 2)
        + min(math.log(4.0) + math.log(math.expm1(eps(2))), eps(2) + math.log(2.0)),
    ]
    terms += [
        j * log_gamma + log_binom(alpha, j) + (j - 1) * eps(j) + math.log(2.0)
        for j in range(3, alpha + 1)
    ]
    log_terms = np.asarray(terms)
    top = log_terms.max()
    return float(top + np.log(np.exp(log_terms - top).sum())) / (alpha - 1)


def _wbk_fixed_epsilon(gamma: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε(δ) after ``rounds`` rounds from :func:`_wbk_theorem9_rdp`.

    RDP composes additively (Mironov 2017, Proposition 1): RDP_T(α) = T ε'(α). Conversion
    to (ε, δ): the one dp-accounting and Opacus use (Canonne, Kamath & Steinke 2020,
    Proposition 12; Balle et al. 2020, Theorem 21), not Mironov's looser
    ε = RDP_T(α) + log(1/δ)/(α−1):

        ε = min_α  RDP_T(α) + log((α−1)/α) − (log δ + log α)/(α−1)
    """
    orders = np.asarray(list(WBK_ORDERS), dtype=float)
    rdp = rounds * np.array([_wbk_theorem9_rdp(gamma, noise_multiplier, a) for a in WBK_ORDERS])
    eps = rdp + np.log1p(-1.0 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    return max(0.0, float(eps.min()))


@pytest.mark.parametrize(("population", "k", "z", "steps", "delta"), FIXED_CASES)
def test_fixed_size_epsilon_is_the_wbk_bound_or_a_little_tighter(
    population: int, k: int, z: float, steps: int, delta: float
) -> None:
    sampling = ClientSampling("fixed", population, k)
    bound = _wbk_fixed_epsilon(k / population, z, steps, delta)
    reported = PrivacyAccountant("rdp", sampling, z, delta).epsilon(steps)
    assert 0.8 * bound <= reported <= 1.01 * bound
    # The lower limit has teeth: each plausible mis-accounting falls below it.
    mistakes = {
        "Poisson sampling (add/remove, sensitivity C)": compute_epsilon(
            "rdp", ClientSampling("poisson", population, k), z, steps, delta
        ),
        "sensitivity C instead of 2C": compute_epsilon("rdp", sampling, 2 * z, steps, delta),
        "one round, composition ignored": PrivacyAccountant("rdp", sampling, z, delta).epsilon(1),
    }
    for mistake, eps in mistakes.items():
        assert eps < 0.8 * bound, mistake


@pytest.mark.parametrize(("q", "z", "steps", "delta"), VECTORS)
def test_pld_is_tighter_than_rdp_and_close(q: float, z: float, steps: int, delta: float) -> None:
    rdp_eps = PrivacyAccountant("rdp", _poisson(q), z, delta).epsilon(steps)
    pld_eps = PrivacyAccountant("pld", _poisson(q), z, delta).epsilon(steps)
    direct = dp_accounting.pld.PLDAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    assert pld_eps == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
    assert 0.75 * rdp_eps <= pld_eps <= rdp_eps


def test_epsilon_grows_per_round_and_is_zero_before_any() -> None:
    acc = PrivacyAccountant("rdp", _poisson(0.1), 1.0, 1e-5)
    assert acc.epsilon() == 0.0
    curve = [acc.epsilon(t) for t in range(1, 6)]
    assert all(a < b for a, b in itertools.pairwise(curve))
    for _ in range(3):
        acc.step()
    assert acc.rounds == 3 and acc.epsilon() == curve[2]
    assert acc.ledger()["epsilon"] == curve[2] and acc.ledger()["sampling_rate"] == 0.1


def test_fixed_size_sampling_uses_sampled_without_replacement_with_replace_one() -> None:
    """Fixed-size k of N: replace-one adjacency, sensitivity 2C, so the event has z / 2."""
    sampling = ClientSampling("fixed", POPULATION, 10)
    z, steps, delta = 1.1, 200, 1e-5
    event = round_event(z, sampling)
    assert isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent)
    assert (event.source_dataset_size, event.sample_size) == (POPULATION, 10)

    def direct(noise: float) -> float:
        acc = dp_rdp.RdpAccountant(list(RDP_ORDERS), dp_accounting.NeighboringRelation.REPLACE_ONE)
        acc.compose(
            dp_accounting.SampledWithoutReplacementDpEvent(
                POPULATION, 10, dp_accounting.GaussianDpEvent(noise)
            ),
            steps,
        )
        return float(acc.get_epsilon(delta))

    reported = PrivacyAccountant("rdp", sampling, z, delta).epsilon(steps)
    assert reported == pytest.approx(direct(z / 2), rel=1e-12)
    assert reported > direct(z)  # without the factor 2 the bound would be too optimistic
    # Same q, same z: Poisson sampling (add/remove, sensitivity C) is cheaper.
    assert reported > compute_epsilon("rdp", _poisson(0.01), z, steps, delta)


def test_pld_refuses_fixed_size_sampling() -> None:
    with pytest.raises(ValueError, match="Poisson"):
        PrivacyAccountant("pld", ClientSampling("fixed", POPULATION, 10), 1.0, 1e-5)


@pytest.mark.parametrize(
    ("sampling", "target"),
    [(ClientSampling("poisson", 700, 105), 8.0), (ClientSampling("fixed", POPULATION, 10), 4.0)],
)
def test_calibration_is_within_budget_and_tight(sampling: ClientSampling, target: float) -> None:
    rounds, delta = 100, 1e-5
    z = calibrate_noise_multiplier("rdp", sampling, rounds, target, delta)
    assert compute_epsilon("rdp", sampling, z, rounds, delta) <= target
    assert compute_epsilon("rdp", sampling, 0.98 * z, rounds, delta) > target


@pytest.mark.slow
def test_pld_calibration_is_within_budget_and_below_rdp() -> None:
    sampling, rounds, delta = _poisson(0.1), 100, 1e-5
    z_pld = calibrate_noise_multiplier("pld", sampling, rounds, 8.0, delta)
    z_rdp = calibrate_noise_multiplier("rdp", sampling, rounds, 8.0, delta)
    assert compute_epsilon("pld", sampling, z_pld, rounds, delta) <= 8.0
    assert compute_epsilon("pld", sampling, 0.98 * z_pld, rounds, delta) > 8.0
    assert z_pld <= z_rdp


def test_unreachable_target_is_an_error() -> None:
    with pytest.raises(ValueError, match="no noise multiplier"):
        calibrate_noise_multiplier("rdp", ClientSampling("poisson", 10, 10), 10**6, 1e-9, 1e-12)


def test_client_sampling_validates() -> None:
    with pytest.raises(ValueError):
        ClientSampling("poisson", 10, 0)
    with pytest.raises(ValueError):
        ClientSampling("fixed", 10, 2.5)
    assert ClientSampling("poisson", 200, 30).rate == pytest.approx(0.15)
    assert np.isclose(ClientSampling("fixed", 8, 2).rate, 0.25)


def test_pld_ledger_composes_round_by_round_to_the_fresh_accountants_epsilon() -> None:
    """The PLD ledger convolves one more round per round instead of rebuilding (so a
    round's cost does not grow with the rounds so far); ε stays dp_accounting's, here
    against a fresh PLDAccountant at every T, after a jump of several rounds (resume)
    and when asked for fewer rounds than it has composed."""
    q, z, delta = 0.05, 1.0, 1e-5

    def fresh(t: int) -> float:
        direct = dp_accounting.pld.PLDAccountant()
        direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), t)
        return float(direct.get_epsilon(delta))

    acc = PrivacyAccountant("pld", _poisson(q), z, delta)
    for t in (1, 2, 3, 7, 8, 4):  # one by one, a jump of four, then backwards
        assert acc.epsilon(t) == pytest.approx(fresh(t), rel=1e-6), t
    assert PrivacyAccountant("pld", _poisson(q), 0.0, delta).epsilon(2) == math.inf
