"""Central (user-level) differential privacy: DP-FedAvg with fixed or adaptive clipping.

The mechanism is DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models", Algorithm 1) with the fixed-denominator estimator and every
client weighted 1:

1. **Client** (:func:`clip_update`, applied by the client's trainer before the update
   leaves it, so it composes with secure aggregation): Δ_k ← Δ_k · min(1, C / ‖Δ_k‖).
2. **Server** (:func:`noisy_average`): Δ̃ = (Σ_k Δ_k + N(0, σ² I)) / (qN), with
   σ = z·C and qN the *expected* number of clients per round. Dividing by the expected
   rather than the actual count keeps the sensitivity of the released value at C/(qN)
   whatever the round's sample was.
3. **Accounting** (:mod:`fedloom.privacy.accounting`): one sampled Gaussian event per
   round with noise multiplier z.

The server optimizer then applies Δ̃ like any aggregated update (server SGD with lr 1 is
the paper's algorithm; momentum or Adam on Δ̃ is post-processing and costs no privacy).

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping", Algorithm 1) replaces the fixed C by one that tracks the γ-quantile of the
clients' update norms; see :class:`AdaptiveClipping` and :func:`split_noise_multiplier`.

:class:`CentralDP` is the server-side state (current C, ledger, noise generator) that the
round loop holds; everything else here is a pure function.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedloom.config import ConfigError, PrivacyConfig
from fedloom.privacy.noise import COUNT_STREAM, UPDATE_STREAM, GaussianNoise, make_noise

log = logging.getLogger("fedloom.privacy")

if TYPE_CHECKING:
    # dp-accounting (with SciPy) takes most of a second to import; clients only clip, so
    # the accountant is imported where the server builds its mechanism.
    from fedloom.privacy.accounting import ClientSampling

#: Relative shrink applied when an update is clipped, so that the float32 result's norm
#: stays at or below C despite rounding (float32 rounding is 2^-24 relative per element).
_CLIP_MARGIN = 2.0**-20

#: Tolerance of the server's check that clients clipped: float32 vectors, float64 norms.
NORM_CHECK_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ClippedUpdate:
    """A client's update after clipping, with what the server may need to know.

    ``below_clip`` is the bit b = 1[‖Δ‖ ≤ C] of Andrew et al. 2021 (Algorithm 1), which
    adaptive clipping aggregates with noise. ``norm`` (before clipping) is a diagnostic
    for simulation only: releasing it is *not* covered by the privacy guarantee, and the
    server uses it for nothing.
    """

    delta: np.ndarray
    norm: float
    below_clip: bool


def _l2_norm(delta: np.ndarray) -> float:
    """‖Δ‖ in float64: the client clips and the server checks by this one measure."""
    return float(np.linalg.norm(delta.astype(np.float64, copy=False)))


def clip_update(delta: np.ndarray, clip_norm: float) -> ClippedUpdate:
    """Scale ``delta`` to L2 norm at most ``clip_norm`` (McMahan et al. 2018, Algorithm 1,
    ``ClipFn`` with flat clipping: Δ · min(1, S / ‖Δ‖)).

    An update already within the bound is returned unchanged (bit for bit). A longer one
    keeps its direction and gets norm C·(1 - 2^-20), the small margin guaranteeing that
    float32 rounding cannot push it above C. The norm is computed in float64.
    """
    if clip_norm <= 0:
        raise ValueError(f"clipping norm must be > 0, got {clip_norm}")
    norm = _l2_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("update contains NaN or Inf; it cannot be clipped")
    if norm <= clip_norm:
        return ClippedUpdate(delta, norm, below_clip=True)
    scale = (clip_norm / norm) * (1.0 - _CLIP_MARGIN)
    clipped = (delta.astype(np.float64) * scale).astype(delta.dtype)
    return ClippedUpdate(clipped, norm, below_clip=False)


def noisy_average(
    clipped: Sequence[np.ndarray],
    size: int,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    standard_normal: np.ndarray,
) -> np.ndarray:
    """(Σ_k Δ_k + z·C·ξ) / (qN), the DP-FedAvg aggregate (McMahan et al. 2018, Algorithm 1,
    fixed-denominator estimator f̃_f with w_k = 1, so that qW = qN).

    ``clipped`` must already be clipped to ``clip_norm`` (the server checks it; see
    :meth:`CentralDP.check_update`); it may be empty (a Poisson round that sampled nobody
    still releases noise). ``standard_normal`` is ξ ~ N(0, I) of length ``size``, drawn
    by the caller so that seeded and secure generators plug in alike. Accumulates in
    float64 and returns float32.
    """
    if expected_clients <= 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    if standard_normal.shape != (size,):
        raise ValueError(f"noise has shape {standard_normal.shape}, expected ({size},)")
    total = np.zeros(size, dtype=np.float64)
    for update in clipped:
        total += update.astype(np.float64, copy=False)
    total += (noise_multiplier * clip_norm) * standard_normal
    return (total / expected_clients).astype(np.float32)


def split_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """z_Δ = (z^-2 - (2σ_b)^-2)^(-1/2): the update-noise multiplier under adaptive clipping.

    Andrew et al. 2021, Theorem 1: releasing the noised sum of updates with
    noise multiplier z_Δ together with the noised count of the centred bits (b - 1/2),
    whose sensitivity is 1/2, with standard deviation σ_b, is as private as one Gaussian
    mechanism with noise multiplier z = (z_Δ^-2 + (2σ_b)^-2)^(-1/2). Solving for z_Δ keeps
    the overall multiplier at the z the accountant is told. Requires 2σ_b > z.
    """
    if noise_multiplier <= 0 or clipped_count_stddev <= 0:
        raise ValueError("noise multiplier and clipped-count stddev must be > 0")
    remaining = noise_multiplier**-2 - (2.0 * clipped_count_stddev) ** -2
    if remaining <= 0:
        raise ValueError(
            f"clipped-count stddev {clipped_count_stddev} must exceed half the noise "
            f"multiplier ({noise_multiplier / 2})"
        )
    return remaining**-0.5


def noisy_unclipped_fraction(
    below_clip: Sequence[bool | float],
    clipped_count_stddev: float,
    expected_clients: float,
    standard_normal: float,
) -> float:
    """b̄ = (Σ_k (b_k - 1/2) + σ_b·ξ) / (qN) + 1/2, the private fraction of unclipped updates.

    Andrew et al. 2021, Algorithm 1 (b̃ = (Σ b + N(0, σ_b²)) / m) with the bits centred at
    1/2 as in their privacy analysis (Theorem 1) and in TensorFlow Privacy's
    ``QuantileEstimatorQuery``: a centred bit has sensitivity 1/2 under add/remove of one
    client, which is where the factor 2σ_b of :func:`split_noise_multiplier` comes from.
    """
    centred = float(sum(float(b) for b in below_clip)) - 0.5 * len(below_clip)
    return (centred + clipped_count_stddev * standard_normal) / expected_clients + 0.5


def geometric_clip_update(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float
) -> float:
    """C ← C · exp(-η_C (b̄ - γ)) (Andrew et al. 2021, Algorithm 1, geometric update).

    When more than a γ share of the updates fit under C (b̄ > γ), C shrinks; when fewer
    do, it grows. In expectation this is online gradient descent on the pinball loss
    whose minimum is the γ-quantile of the update norms.
    """
    return clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile))


@dataclass
class AdaptiveClipping:
    """The clipping norm of Andrew et al. 2021, Algorithm 1, as server state.

    ``clip_norm`` is C for the next round; :meth:`update` moves it after a round from the
    clients' bits and a standard normal draw for the count noise.
    """

    clip_norm: float
    target_quantile: float
    lr: float
    clipped_count_stddev: float
    expected_clients: float

    def update(self, below_clip: Sequence[bool | float], standard_normal: float) -> float:
        """Apply one round's bits; return the noisy unclipped fraction b̄ it used."""
        fraction = noisy_unclipped_fraction(
            below_clip, self.clipped_count_stddev, self.expected_clients, standard_normal
        )
        self.clip_norm = geometric_clip_update(
            self.clip_norm, fraction, self.target_quantile, self.lr
        )
        return fraction


class CentralDP:
    """Server-side state of central DP: clipping norm, noise, accountant, ledger.

    Built once per run by :meth:`from_config` (which calibrates z when the config gives a
    target ε). Each round the loop sends :attr:`clip_norm` to the clients, checks their
    updates with :meth:`check_update`, and calls :meth:`aggregate`, which releases the
    noisy average, moves an adaptive C, and counts the round in the accountant.
    """

    def __init__(
        self,
        cfg: PrivacyConfig,
        sampling: ClientSampling,
        noise_multiplier: float,
        noise: GaussianNoise,
        calibrated_for: float | None = None,
    ) -> None:
        from fedloom.privacy.accounting import PrivacyAccountant

        self.cfg = cfg
        self.sampling = sampling
        self.noise = noise
        self.calibrated_for = calibrated_for
        self.accountant = PrivacyAccountant(cfg.accountant, sampling, noise_multiplier, cfg.delta)
        self.adaptive: AdaptiveClipping | None = None
        self.update_noise_multiplier = noise_multiplier
        self._clip_norm = cfg.clipping_norm
        #: The sampling of the last round that ran (None: as configured); the budget check
        #: before a round expects the next one to be drawn alike.
        self.last_sampling: ClientSampling | None = None
        if cfg.adaptive_clipping:
            stddev = cfg.clipped_count_stddev
            if stddev is None:
                # Andrew et al. 2021 recommend σ_b = m/20 (m the expected clients).
                stddev = sampling.clients_per_round / 20.0
            try:
                self.update_noise_multiplier = split_noise_multiplier(noise_multiplier, stddev)
            except ValueError:
                raise ConfigError(
                    f"adaptive clipping needs privacy.clipped_count_stddev ({stddev:g}) > "
                    f"noise_multiplier / 2 ({noise_multiplier / 2:g}) (Andrew et al. 2021, "
                    "Thm 1); raise it or sample more clients per round"
                ) from None
            self.adaptive = AdaptiveClipping(
                cfg.clipping_norm,
                cfg.target_quantile,
                cfg.clip_lr,
                stddev,
                sampling.clients_per_round,
            )

    @classmethod
    def from_config(
        cls, cfg: PrivacyConfig, sampling: ClientSampling, rounds: int, seed: int
    ) -> CentralDP:
        """The run's mechanism; calibrates z to ``cfg.target_epsilon`` over ``rounds`` rounds."""
        from fedloom.privacy.accounting import calibrate_noise_multiplier

        if cfg.accountant == "pld" and sampling.scheme != "poisson":
            raise ConfigError(
                "privacy.accountant = 'pld' supports server.sampling = 'poisson' only; "
                "use privacy.accountant = 'rdp' for fixed-size sampling"
            )
        calibrated_for: float | None = None
        if cfg.noise_multiplier is not None:
            z = cfg.noise_multiplier
        else:
            assert cfg.target_epsilon is not None  # the config validator guarantees one
            try:
                z = calibrate_noise_multiplier(
                    cfg.accountant, sampling, rounds, cfg.target_epsilon, cfg.delta
                )
            except ValueError as err:
                raise ConfigError(f"privacy.target_epsilon: {err}") from None
            calibrated_for = cfg.target_epsilon
        return cls(cfg, sampling, z, make_noise(cfg.secure_noise, seed), calibrated_for)

    # ------------------------------------------------------------------ per round

    @property
    def clip_norm(self) -> float:
        """C for the next round (fixed, or the adaptive estimate)."""
        return self.adaptive.clip_norm if self.adaptive is not None else self._clip_norm

    @property
    def noise_multiplier(self) -> float:
        """The overall z that the accountant is told."""
        return self.accountant.noise_multiplier

    def check_update(self, delta: np.ndarray) -> str | None:
        """Why ``delta`` must not enter this round's DP sum (None if it may).

        The guarantee rests on every update having norm ≤ C, the :attr:`clip_norm` the
        round's clients were sent. A client, engine or wire format that loses the clipping
        step would silently void it, so the server verifies what it can see and turns a
        violation into a client failure.
        """
        clip_norm = self.clip_norm
        norm = _l2_norm(delta)
        if norm > clip_norm * (1.0 + NORM_CHECK_TOLERANCE):
            return (
                f"update norm {norm:.6g} exceeds the clipping norm {clip_norm:.6g}; "
                "central DP needs every client to clip its update"
            )
        return None

    def round_sampling(
        self, pool_size: int | None, sample_size: int | None
    ) -> ClientSampling | None:
        """The sampling round's clients were really drawn at (None: as configured).

        Fixed-size sampling draws k among the clients available (a deployment's connected
        ones), so with M < N available a client's chance is k / M, not k / N: the round is
        ``SampledWithoutReplacementDpEvent(M, k)``. Poisson sampling gives each available
        client the configured q whatever M is, so its event does not change.
        """
        from fedloom.privacy.accounting import ClientSampling

        if self.sampling.scheme != "fixed" or not pool_size or not sample_size:
            return None
        actual = ClientSampling("fixed", int(pool_size), float(sample_size))
        return None if actual == self.sampling else actual

    def refusal(self, rnd: int, sampling: ClientSampling | None) -> str | None:
        """Why round ``rnd`` must not be released at ``sampling`` (None: it may).

        The budget check before the round assumed the configured (or the last) sampling;
        if the round was drawn at a higher rate and would take ε past ``max_epsilon``,
        nothing of it may leave the server.
        """
        limit = self.cfg.max_epsilon
        if sampling is not None and sampling != self.last_sampling:
            log.warning(
                "round %d: fixed-size sampling drew %d of the %d clients available "
                "(q = %.4g; configured: %g of %d, q = %.4g); the privacy ledger counts the "
                "round at the rate that happened",
                rnd,
                int(sampling.clients_per_round),
                sampling.population,
                sampling.rate,
                self.sampling.clients_per_round,
                self.sampling.population,
                self.sampling.rate,
            )
        self.last_sampling = sampling
        if limit is None:
            return None
        eps = self.accountant.epsilon_after(sampling)
        if eps <= limit:
            return None
        return (
            f"privacy budget: round {rnd} drew its clients at q = "
            f"{(sampling or self.sampling).rate:.4g}, which would bring ε to {eps:.4g} > "
            f"privacy.max_epsilon = {limit:g}; the round is not released"
        )

    def aggregate(
        self,
        rnd: int,
        clipped: Sequence[np.ndarray],
        below_clip: Sequence[bool | float],
        size: int,
        sampling: ClientSampling | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Release round ``rnd``'s noisy average, update C, and count the round at
        ``sampling`` (the one that happened; None: as configured).

        Returns the update and the round-record fields (clipping norm used, noisy
        unclipped fraction for adaptive clipping, ε after this round).
        """
        clip_norm = self.clip_norm
        xi = self.noise.standard_normal(size, rnd, UPDATE_STREAM)
        update = noisy_average(
            clipped,
            size,
            clip_norm,
            self.update_noise_multiplier,
            self.sampling.clients_per_round,
            xi,
        )
        fields: dict[str, Any] = {"clip_norm": clip_norm}
        if self.adaptive is not None:
            count_xi = float(self.noise.standard_normal(1, rnd, COUNT_STREAM)[0])
            fields["unclipped_fraction"] = self.adaptive.update(below_clip, count_xi)
        self.accountant.step(sampling)
        fields["epsilon"] = self.accountant.epsilon()
        if sampling is not None:
            fields["sampling_rate"] = sampling.rate
        return update, fields

    # ----------------------------------------------------------------- budget

    def next_round_exceeds_budget(self) -> str | None:
        """The stop message when one more round would take ε above ``max_epsilon``."""
        limit = self.cfg.max_epsilon
        if limit is None:
            return None
        upcoming = self.accountant.rounds + 1
        eps = self.accountant.epsilon_after(self.last_sampling)
        if eps <= limit:
            return None
        return (
            f"privacy budget reached: round {upcoming} would bring ε to {eps:.4g} > "
            f"privacy.max_epsilon = {limit:g} (δ = {self.cfg.delta:g}); stopped after "
            f"{upcoming - 1} rounds at ε = {self.accountant.epsilon():.4g}"
        )

    # ------------------------------------------------------------- ledger, resume

    def ledger(self) -> dict[str, Any]:
        """What a reviewer needs to check the guarantee (stored in summary and run store)."""
        out: dict[str, Any] = {
            "mechanism": "central DP-FedAvg (McMahan et al. 2018), user-level",
            **self.accountant.ledger(),
            "clipping_norm": self.clip_norm,
            "adaptive_clipping": self.adaptive is not None,
            "target_epsilon": self.calibrated_for,
            "max_epsilon": self.cfg.max_epsilon,
            "secure_noise": self.noise.secure,
        }
        if self.adaptive is not None:
            out.update(
                {
                    "initial_clipping_norm": self.cfg.clipping_norm,
                    "target_quantile": self.adaptive.target_quantile,
                    "clip_lr": self.adaptive.lr,
                    "clipped_count_stddev": self.adaptive.clipped_count_stddev,
                    "update_noise_multiplier": self.update_noise_multiplier,
                }
            )
        return out

    def checkpoint_meta(self) -> dict[str, Any]:
        """The state a resumed run needs: the ledger (z, T) and the current C."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "rounds": self.accountant.rounds,
            "clip_norm": self.clip_norm,
            # Rounds drawn at another sampling: [population, clients per round, rounds].
            "other_sampling": [
                [s.population, s.clients_per_round, n] for s, n in self.accountant.other.items()
            ],
            "last_sampling": None
            if self.last_sampling is None
            else [self.last_sampling.population, self.last_sampling.clients_per_round],
        }

    def restore(self, meta: dict[str, Any], rounds_run: int | None = None) -> None:
        """Continue from :meth:`checkpoint_meta`.

        ``rounds_run`` is how many rounds the mechanism had run before the interruption
        (the run store's ledger). With seeded noise a replayed round releases exactly
        what it released before, so it costs nothing extra. With secure noise it draws
        fresh noise, a new release of the same data, so the rounds that the resume
        discards and re-runs are counted again.
        """
        z = float(meta["noise_multiplier"])
        if z != self.noise_multiplier:
            raise ConfigError(
                f"the checkpoint's noise multiplier {z} differs from this run's "
                f"{self.noise_multiplier}; resume with the configuration the run started with"
            )
        rounds = int(meta["rounds"])
        if self.noise.secure and rounds_run is not None and rounds_run > rounds:
            rounds = rounds_run
        from fedloom.privacy.accounting import ClientSampling

        self.accountant.rounds = rounds
        self.accountant.other = {
            ClientSampling(self.sampling.scheme, int(pop), float(k)): int(n)
            for pop, k, n in meta.get("other_sampling", [])
        }
        last = meta.get("last_sampling")
        self.last_sampling = (
            None if not last else ClientSampling(self.sampling.scheme, int(last[0]), float(last[1]))
        )
        if self.adaptive is not None:
            self.adaptive.clip_norm = float(meta["clip_norm"])
