"""Privacy accounting: fedloom's ε against dp-accounting (directly) and Opacus, calibration."""

import itertools

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


def _poisson(q: float) -> ClientSampling:
    return ClientSampling("poisson", POPULATION, q * POPULATION)


def _direct_rdp_poisson(q: float, z: float, steps: int, delta: float) -> float:
    """dp-accounting used directly, as a reviewer would, with fedloom's orders."""
    acc = dp_rdp.RdpAccountant(list(RDP_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(("q", "z", "steps", "delta"), VECTORS)
def test_rdp_epsilon_equals_dp_accounting_and_matches_opacus(
    q: float, z: float, steps: int, delta: float
) -> None:
    reported = PrivacyAccountant("rdp", _poisson(q), z, delta).epsilon(steps)
    assert reported == pytest.approx(_direct_rdp_poisson(q, z, steps, delta), rel=1e-12)
    orders = list(RDP_ORDERS)
    opacus_eps, _ = get_privacy_spent(
        orders=orders,
        rdp=compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders),
        delta=delta,
    )
    assert reported == pytest.approx(opacus_eps, rel=0.05)


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
