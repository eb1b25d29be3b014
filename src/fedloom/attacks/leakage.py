"""Gradient leakage: how much of a client's training image its update gives away.

A federated client never sends its data, only an update. This module measures how much
of the data an honest-but-curious server can still recover from that update, with each
of fedloom's defences in place, so that a user sees *why* the defences exist.

**Attacks.**

* DLG, "Deep Leakage from Gradients" (Zhu, Liu & Han, NeurIPS 2019, Algorithm 1): start
  from a random dummy image x' and a random dummy label y' (soft, through a softmax),
  and minimise ‖∇_w L(x', y') − ∇_w L(x, y)‖² over both with L-BFGS. The model w is the
  global model the server itself broadcast, so the attacker can differentiate it.
* iDLG, "iDLG: Improved Deep Leakage from Gradients" (Zhao, Mopuri & Bilen 2020): for
  one example under cross-entropy, the last layer's weight gradient is
  (softmax(z) − e_y) h^T. When the features h entering that layer are non-negative (they
  are after a sigmoid), the row of the true label is the only row with negative
  entries, so the label is read off the signs (:func:`infer_label`), and the
  optimisation then runs over x' alone with that label fixed (:func:`invert_gradient`).

**Model.** A 64→64→10 MLP with *sigmoid* activations on the 8×8 digits
(:func:`build_attack_model`). Sigmoid, not tanh or ReLU, for two reasons: DLG
differentiates a gradient, so it needs the network's second derivative, which ReLU does
not have (it is zero almost everywhere and the matching loss becomes piecewise); Zhu et
al. replace ReLU by sigmoid for that reason. And iDLG's sign rule needs non-negative
features into the last layer, which sigmoid gives and tanh does not. fedloom's built-in
``mlp`` uses ReLU, which does make *these optimisers'* job harder (measured on 10 digits:
DLG recovers 4 exactly and the rest at 16-30 dB; iDLG stalls at 7-20 dB). It does not
make the update safer: with a fully connected first layer with bias, the weight
gradient is δ x^T and the bias gradient δ, so x = ∂L/∂W₁[i] / ∂L/∂b₁[i] exactly for
any unit i with δ_i ≠ 0, whatever the activation (Geiping et al. 2020, "Inverting
Gradients", Sec. 3). Sigmoid shows what a capable attacker gets.

**What the attacker observes** (:func:`observe_update`): the client's update after one
local SGD step on one example, Δ = −η ∇_w L(x, y), which is the setting DLG assumes and
the worst case for the client (several local steps, or many examples per client, make
inversion harder; not measured here), under

1. no defence;
2. clipping alone, Δ · min(1, C/‖Δ‖) (:func:`~fedloom.privacy.central.clip_update`):
   the direction is unchanged, and a rescaled gradient is matched just as well (DLG's
   soft label absorbs a scale s ≤ 1 exactly: y' = (1 − s)·softmax(z) + s·e_y; the iDLG
   attacker fits the scale in closed form), so expect no protection at all;
3. clipping plus Gaussian noise N(0, (zC)² I) from fedloom's own DP noise generator. In
   DP-FedAvg (McMahan et al. 2018) the server adds this noise once to the *sum* of the
   clipped updates; an attacker who sees that sum sees the target's update plus the
   other clients' updates plus the noise. Here the attacker sees the target's clipped
   update plus the noise alone, the worst case, which is exactly what the DP guarantee
   is about (noise of scale zC against one client's sensitivity C);
4. secure aggregation: the sum of K clients' updates, produced by the real SecAgg+
   protocol (:func:`~fedloom.privacy.secagg.driver.run_secagg_round`, with its 16-bit
   quantization). The server cannot tell the contributions apart, so DLG and iDLG
   attack the sum as if it were one client's gradient, scored against the target
   client's image. But a sum of K single-example gradients of one model *is* the
   gradient of a batch of K, and DLG inverts batches too (Zhu et al. 2019 show batches
   of up to 8 images), so the report also runs DLG with K dummy images ("DLG×K") and
   scores the dummy closest to the target: the server then learns the clients' images
   without learning who sent which, which is what secure aggregation was meant to hide.
   This attack gets more L-BFGS iterations (:class:`AttackBudget`; K times the unknowns)
   and keeps improving beyond them (K = 16: 12-20 dB after 1000 iterations, 15-28 dB
   after 4000, on three targets), so its row is a lower bound on what leaks.

**Metrics** (:func:`mse`, :func:`psnr`): mean squared error and PSNR (peak 1.0) between
the reconstruction, clipped to the pixel range [0, 1], and the true image, and whether
iDLG's label is the target's. PSNR is capped at :data:`PSNR_CAP_DB` = 100 dB (MSE
10⁻¹⁰): beyond that a reconstruction is the image up to the float32 precision of the
update. Two reference levels say what "learned nothing" looks like: a uniform random
image, and the mean digit (what an attacker knows from public data alone).

Everything is deterministic given the seed (CPU, float64 attack, one torch thread
inside :func:`run_leakage_report`); secure aggregation uses fresh OS randomness for its
keys and masks, but with deterministic rounding the unmasked sum is exact and so
identical in every run.

**Running it.** ``fedloom leakage`` and ``benchmarks/leakage.py`` call
:func:`run_leakage` with a :class:`~fedloom.attacks.leakage_settings.LeakageSettings`
read from their shared options, print :func:`format_leakage_report`, and write
:func:`write_leakage_png` (the CLI also :func:`write_leakage_json`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedloom.attacks.leakage_settings import (
    DEFAULT_CLIP_NORM,
    DEFAULT_LR,
    FULL_SETTINGS,
    QUICK_SETTINGS,
    ConditionKind,
    LeakageSettings,
    LeakageSettingsError,
)
from fedloom.data.digits import NUM_CLASSES, NUM_PIXELS, load_digits_arrays
from fedloom.privacy.central import clip_update
from fedloom.privacy.noise import UPDATE_STREAM, SeededGaussianNoise
from fedloom.privacy.secagg.config import SecAggConfig
from fedloom.privacy.secagg.driver import run_secagg_round
from fedloom.seeding import derive_rng, derive_seed

__all__ = [
    "DEFAULT_CLIP_NORM",
    "DEFAULT_CONDITIONS",
    "DEFAULT_LR",
    "PSNR_CAP_DB",
    "QUICK_CONDITIONS",
    "AttackBudget",
    "AttackName",
    "AttackResult",
    "Condition",
    "ConditionResult",
    "LeakageReport",
    "Trial",
    "build_attack_model",
    "build_conditions",
    "format_leakage_report",
    "format_leakage_table",
    "gradient_estimate",
    "infer_label",
    "invert_gradient",
    "leakage_summary",
    "load_digit_images",
    "mse",
    "observe_update",
    "psnr",
    "run_leakage",
    "run_leakage_report",
    "single_example_gradient",
    "write_leakage_json",
    "write_leakage_png",
]

#: PSNR reported for a reconstruction with MSE at or below 1e-10 (see module doc).
PSNR_CAP_DB = 100.0

#: Purpose tags for this module's random streams (kept apart from ``fedloom.seeding``'s).
_TARGETS, _MODEL, _DUMMY, _NOISE, _OTHERS, _BASELINE = 101, 102, 103, 104, 105, 106

Activation = Literal["sigmoid", "relu"]


# --------------------------------------------------------------------------- model, data


def build_attack_model(
    seed: int, hidden: int = 64, activation: Activation = "sigmoid"
) -> nn.Module:
    """The victim's float32 model: Linear(64, hidden) → activation → Linear(hidden, 10).

    Sigmoid by default; see the module doc for why. The weights are PyTorch's default
    initialisation drawn from ``seed``: an early-round global model, which is where
    gradient inversion is easiest and where a new federation starts.
    """
    act: nn.Module = nn.Sigmoid() if activation == "sigmoid" else nn.ReLU()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, _MODEL))
        return nn.Sequential(
            nn.Linear(NUM_PIXELS, hidden), act, nn.Linear(hidden, NUM_CLASSES)
        ).float()


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 embedded digits as (N, 64) float64 pixels in [0, 1] and (N,) int labels."""
    pixels, labels = load_digits_arrays()
    return pixels / 16.0, labels


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a probability vector (DLG's loss for a soft dummy label)."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def single_example_gradient(model: nn.Module, image: np.ndarray, label: int) -> np.ndarray:
    """∇_w CE(model(x), y) for one example, as the flat float32 vector a client computes.

    The order is ``model.parameters()`` order, fedloom's flat-vector layout.
    """
    x = torch.as_tensor(image, dtype=torch.float32).reshape(1, -1)
    loss = F.cross_entropy(model(x), torch.tensor([label]))
    grads = torch.autograd.grad(loss, tuple(model.parameters()))
    return _flat(grads).detach().numpy().astype(np.float32)


# --------------------------------------------------------------------------- attacks


def _last_weight_slice(model: nn.Module) -> tuple[slice, tuple[int, int]]:
    """Where the last Linear layer's weight lives in the flat vector, and its shape."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("iDLG needs a model whose last layer is nn.Linear")
    weight = linears[-1].weight
    offset = 0
    for p in model.parameters():
        if p is weight:
            return slice(offset, offset + p.numel()), (p.shape[0], p.shape[1])
        offset += p.numel()
    raise ValueError("the last Linear layer's weight is not a parameter of the model")


def infer_label(model: nn.Module, gradient: np.ndarray) -> int:
    """iDLG's label (Zhao et al. 2020): the last-layer weight row that is negative.

    For one example, ∂L/∂W_last = (p − e_y) h^T with p the softmax output and h ≥ 0 the
    features entering the layer, so row y is ≤ 0 and every other row ≥ 0. Taking the row
    with the smallest *sum* rather than testing signs keeps the rule usable when the
    gradient is noised or summed over clients (it then returns the most negative row).
    ``gradient`` is ∇_w L in ``model.parameters()`` order (not the update −η∇_w L).
    """
    where, shape = _last_weight_slice(model)
    rows = np.asarray(gradient, dtype=np.float64)[where].reshape(shape)
    return int(np.argmin(rows.sum(axis=1)))


@dataclass(frozen=True)
class AttackResult:
    """A reconstruction: ``images`` (B, 64) clipped to [0, 1], the labels the attack ended
    with, the final normalised gradient distance and the L-BFGS wall time."""

    images: np.ndarray
    labels: tuple[int, ...]
    distance: float
    seconds: float

    @property
    def image(self) -> np.ndarray:
        """The first (for a batch of one, the only) reconstructed image."""
        return np.asarray(self.images[0])

    def best_match(self, truth: np.ndarray) -> np.ndarray:
        """The reconstruction closest to ``truth`` (by MSE).

        Scoring a batch attack this way credits the attacker with recognising the
        target among its B images; what it learns is the set of images, not who sent
        which, and that set is what secure aggregation promised to hide.
        """
        errors = [mse(image, truth) for image in self.images]
        return np.asarray(self.images[int(np.argmin(errors))])


class _Best:
    """The dummies with the lowest finite distance seen: L-BFGS may step into NaN late,
    and the final iterate is then worse than one it passed through. Starts at the start."""

    def __init__(self, images: torch.Tensor, logits: torch.Tensor) -> None:
        self.distance = math.inf
        self.images = images.detach().numpy().copy()
        self.logits = logits.detach().numpy().copy()

    def offer(self, distance: float, images: torch.Tensor, logits: torch.Tensor) -> None:
        if math.isfinite(distance) and distance < self.distance:
            self.distance = distance
            self.images = images.detach().numpy().copy()
            self.logits = logits.detach().numpy().copy()


def invert_gradient(
    model: nn.Module,
    gradient: np.ndarray,
    *,
    label: int | None = None,
    batch: int = 1,
    iterations: int = 200,
    seed: int = 0,
) -> AttackResult:
    """Reconstruct training examples from the gradient ``gradient`` by gradient matching.

    ``label=None`` is DLG (Zhu et al. 2019, Algorithm 1): dummy images and dummy soft
    labels are optimised together so that the mean cross-entropy gradient of the ``batch``
    dummies matches ``gradient`` (Zhu et al. also invert batches of several images; with
    ``batch = K`` this attacks a sum of K single-example updates, which is the gradient
    of one batch of K). With a ``label`` (from :func:`infer_label`) it is iDLG (Zhao et
    al. 2020), one image: the label is fixed and only the image is optimised; the dummy
    gradient is then scaled by the least-squares factor s* = max(0, ⟨g', g⟩) / ‖g'‖²
    before the distance is taken, because a clipped update is the gradient times an
    unknown s ≤ 1 that a fixed one-hot label cannot absorb (DLG's soft label can).

    The distance is ‖g' − g‖² / ‖g‖²: Algorithm 1's L2 distance divided by a constant, so
    that L-BFGS's tolerances mean the same whatever the update's scale. Both run in float64
    on a copy of ``model``; the dummies start from N(0, 1) drawn from ``seed``; L-BFGS
    (strong Wolfe line search, history 100) runs at most ``iterations`` iterations, which
    bounds the time (about 0.2 s for 200 iterations of one image on one core).
    """
    if batch < 1 or (label is not None and batch != 1):
        raise ValueError("batch must be ≥ 1, and iDLG (a given label) inverts one image")
    start = time.perf_counter()
    attacker = copy.deepcopy(model).double().requires_grad_(True)
    params = tuple(attacker.parameters())
    target = torch.as_tensor(np.asarray(gradient, dtype=np.float64))
    scale = float(target.pow(2).sum())
    if not scale > 0:
        raise ValueError("the observed gradient is zero; there is nothing to invert")

    gen = torch.Generator().manual_seed(derive_seed(seed, _DUMMY))
    shape = (batch, NUM_PIXELS)
    dummy = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(batch, NUM_CLASSES, generator=gen, dtype=torch.float64)
    logits.requires_grad_(label is None)
    variables = [dummy] if label is not None else [dummy, logits]
    fixed = None if label is None else F.one_hot(torch.tensor([label]), NUM_CLASSES).double()

    optimizer = torch.optim.LBFGS(
        variables,
        lr=1.0,
        max_iter=iterations,
        history_size=100,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
    )
    best = _Best(dummy, logits)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        soft = F.softmax(logits, dim=-1) if fixed is None else fixed
        loss = _soft_cross_entropy(attacker(dummy), soft)
        guess = _flat(torch.autograd.grad(loss, params, create_graph=True))
        if fixed is not None:
            fit = torch.clamp(torch.dot(guess, target), min=0.0) / guess.pow(2).sum()
            guess = fit * guess
        distance = (guess - target).pow(2).sum() / scale
        # Only the dummies need gradients; backward() would also fill the model's.
        for variable, grad in zip(variables, torch.autograd.grad(distance, variables), strict=True):
            variable.grad = grad
        best.offer(float(distance.detach()), dummy, logits)
        return distance

    optimizer.step(closure)
    labels = (label,) if label is not None else tuple(int(i) for i in best.logits.argmax(axis=1))
    images = np.clip(best.images, 0.0, 1.0)
    return AttackResult(images, labels, best.distance, time.perf_counter() - start)


# --------------------------------------------------------------------------- defences


@dataclass(frozen=True)
class Condition:
    """One thing the attacker may see; ``kind`` picks which (see :func:`observe_update`).

    ``clip_norm`` is C for ``clip`` and ``dp``; ``noise_multiplier`` is z for ``dp``;
    ``clients`` is K for ``secagg``.
    """

    name: str
    kind: ConditionKind
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    clients: int = 1

    def __post_init__(self) -> None:
        if self.kind in ("clip", "dp") and not (self.clip_norm and self.clip_norm > 0):
            raise ValueError(f"condition {self.name!r} needs a positive clip_norm")
        if self.kind == "dp" and self.noise_multiplier is None:
            raise ValueError(f"condition {self.name!r} needs a noise_multiplier")
        if self.kind == "secagg" and self.clients < 2:
            raise ValueError(f"condition {self.name!r}: secure aggregation needs K ≥ 2")


def build_conditions(settings: LeakageSettings) -> tuple[Condition, ...]:
    """The conditions ``settings`` asks for, in the order the report lists them: no
    defence, clipping alone, one clip + DP condition per z, one secure-aggregation
    condition per K. Their names are the table's row labels."""
    conditions: list[Condition] = []
    if "none" in settings.kinds:
        conditions.append(Condition("no defense", "none"))
    clip_norm = settings.clip_norm
    if "clip" in settings.kinds:
        conditions.append(
            Condition(f"clipping alone (C={clip_norm:g})", "clip", clip_norm=clip_norm)
        )
    if "dp" in settings.kinds:
        conditions.extend(
            Condition(f"clip + DP noise z={z:g}", "dp", clip_norm=clip_norm, noise_multiplier=z)
            for z in settings.noise_multipliers
        )
    if "secagg" in settings.kinds:
        conditions.extend(
            Condition(f"secure aggregation K={k}", "secagg", clients=k)
            for k in settings.secagg_clients
        )
    return tuple(conditions)


DEFAULT_CONDITIONS: tuple[Condition, ...] = build_conditions(FULL_SETTINGS)
#: ``--quick``: every kind of condition, with light (z = 0.01) and heavy (z = 1) noise.
QUICK_CONDITIONS: tuple[Condition, ...] = build_conditions(QUICK_SETTINGS)


def _secagg_sum(updates: Sequence[np.ndarray]) -> np.ndarray:
    """Σ updates through one real SecAgg+ round (16-bit quantization, 32-bit ring).

    The quantization range r is the largest coordinate magnitude rounded up to a power
    of two, as a server would configure it to cover the updates it expects; the step is
    then r / 32767, far below the coordinates that matter.
    """
    peak = max(float(np.max(np.abs(u))) for u in updates)
    clip_range = 2.0 ** math.ceil(math.log2(peak)) if peak > 0 else 1.0
    config = SecAggConfig(clip_range=clip_range, quantization_bits=16, modulus_bits=32)
    result = run_secagg_round(dict(enumerate(updates)), config)
    if result.num_contributors != len(updates):
        raise RuntimeError("secure aggregation lost a client in a round without dropouts")
    return result.sum


def observe_update(
    condition: Condition,
    model: nn.Module,
    target: tuple[np.ndarray, int],
    others: Sequence[tuple[np.ndarray, int]] = (),
    *,
    lr: float = DEFAULT_LR,
    seed: int = 0,
) -> np.ndarray:
    """The update the server sees when ``target`` is one client's only training example.

    Every client takes one SGD step (Δ = −η∇L) on one example. ``others`` are the other
    K − 1 clients' examples, used by ``secagg`` only. DP noise comes from fedloom's
    :class:`~fedloom.privacy.noise.SeededGaussianNoise` keyed by ``seed``.
    """
    image, label = target
    update = -lr * single_example_gradient(model, image, label)
    if condition.kind == "none":
        return update
    if condition.kind == "secagg":
        if len(others) != condition.clients - 1:
            raise ValueError(f"{condition.name}: need {condition.clients - 1} other clients")
        rest = [-lr * single_example_gradient(model, x, y) for x, y in others]
        return _secagg_sum([update, *rest])
    assert condition.clip_norm is not None
    clipped = clip_update(update, condition.clip_norm).delta
    if condition.kind == "clip":
        return clipped
    assert condition.noise_multiplier is not None
    xi = SeededGaussianNoise(derive_seed(seed, _NOISE)).standard_normal(
        clipped.size, 0, UPDATE_STREAM
    )
    sigma = condition.noise_multiplier * condition.clip_norm
    return (clipped.astype(np.float64) + sigma * xi).astype(np.float32)


def gradient_estimate(condition: Condition, update: np.ndarray, lr: float) -> np.ndarray:
    """What the attacker takes for ∇L: −Δ/η, and the mean −ΣΔ/(Kη) under secure aggregation
    (the server knows η and K: both are in the round configuration it chose)."""
    return -np.asarray(update, dtype=np.float64) / (lr * condition.clients)


# --------------------------------------------------------------------------- metrics


def mse(reconstruction: np.ndarray, truth: np.ndarray) -> float:
    """Mean squared pixel error."""
    diff = np.asarray(reconstruction, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    return float(np.mean(diff**2))


def psnr(reconstruction: np.ndarray, truth: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio 10·log10(peak² / MSE) in dB, capped at :data:`PSNR_CAP_DB`."""
    error = mse(reconstruction, truth)
    if error <= 0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(peak * peak / error))


# --------------------------------------------------------------------------- the report


#: The attacks a report runs: DLG and iDLG on the observation as one client's gradient,
#: and (secure aggregation only) DLG with K dummies, scored by its best match.
AttackName = Literal["dlg", "idlg", "batch"]
#: Every attack, in the order the table and ``leakage.json`` list them.
_ATTACKS: tuple[AttackName, ...] = ("dlg", "idlg", "batch")


@dataclass(frozen=True)
class Trial:
    """One target image under one condition: each attack's result and iDLG's label.

    ``batch`` is DLG with K dummy images, run only when the observation is a sum of K
    clients' updates (secure aggregation); None otherwise.
    """

    index: int
    true_label: int
    inferred_label: int
    dlg: AttackResult
    idlg: AttackResult
    batch: AttackResult | None
    seconds: float

    def reconstruction(self, attack: AttackName, truth: np.ndarray) -> np.ndarray | None:
        """The image ``attack`` offers for the target (a batch attack's best match)."""
        if attack == "batch":
            return None if self.batch is None else self.batch.best_match(truth)
        return (self.dlg if attack == "dlg" else self.idlg).image


@dataclass
class ConditionResult:
    """All trials of one condition, with the summary statistics the table prints."""

    condition: Condition
    trials: list[Trial] = field(default_factory=list)

    def _images(self, truths: np.ndarray, attack: AttackName) -> list[tuple[np.ndarray, int]]:
        found = [(t.reconstruction(attack, truths[t.index]), t.index) for t in self.trials]
        return [(image, index) for image, index in found if image is not None]

    def psnrs(self, truths: np.ndarray, attack: AttackName) -> list[float]:
        """PSNR per target (empty for ``batch`` when the condition is not a sum)."""
        return [psnr(image, truths[i]) for image, i in self._images(truths, attack)]

    def mses(self, truths: np.ndarray, attack: AttackName) -> list[float]:
        """MSE per target (empty for ``batch`` when the condition is not a sum)."""
        return [mse(image, truths[i]) for image, i in self._images(truths, attack)]

    @property
    def label_accuracy(self) -> float:
        """Share of targets whose label iDLG's rule read correctly."""
        return statistics.fmean(t.inferred_label == t.true_label for t in self.trials)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.trials)


@dataclass(frozen=True)
class AttackBudget:
    """How hard the attacker tries: L-BFGS iterations of the one-image attacks and of the
    K-image attack (which has K times the unknowns and needs more), and the victim's η."""

    iterations: int = 200
    batch_iterations: int = 1000
    lr: float = DEFAULT_LR


@dataclass
class LeakageReport:
    """The outcome of :func:`run_leakage_report`: per-condition results and the baselines.

    ``truths`` and ``truths_labels`` are all digits (trials refer to them by index);
    ``baseline_random`` and ``baseline_mean`` are the PSNRs of a uniform random image and
    of the mean digit against each target: the level of an attacker who learned nothing
    from the update. ``baseline_closest_of[K]`` is that level for DLG×K, which is scored
    by the best of K images: the closest of K random other digits.
    """

    targets: list[int]
    truths: np.ndarray
    truths_labels: np.ndarray
    results: list[ConditionResult]
    baseline_random: list[float]
    baseline_mean: list[float]
    baseline_closest_of: dict[int, list[float]]
    budget: AttackBudget
    seed: int
    wall_s: float = 0.0


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: faster for these tiny models (see docs/design-notes.md,
    "Threads") and the same floating-point reduction order on every machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _baselines(
    truths: np.ndarray, targets: Sequence[int], seed: int
) -> tuple[list[float], list[float]]:
    """PSNR of a uniform random image and of the mean of the non-target digits."""
    rng = derive_rng(seed, _BASELINE)
    keep = np.ones(len(truths), dtype=bool)
    keep[list(targets)] = False
    mean_digit = truths[keep].mean(axis=0)
    random = [psnr(rng.random(NUM_PIXELS), truths[i]) for i in targets]
    return random, [psnr(mean_digit, truths[i]) for i in targets]


def _closest_of_k_baseline(
    truths: np.ndarray, targets: Sequence[int], k: int, seed: int
) -> list[float]:
    """PSNR of the closest of ``k`` random other digits to each target.

    DLG×K is scored by the best of its K images, so its fair "learned nothing" level is
    the best of K real digits that are not the target, not a single guess.
    """
    rng = derive_rng(seed, _BASELINE, k)
    out = []
    for index in targets:
        others = rng.choice(np.delete(np.arange(len(truths)), index), k, replace=False)
        out.append(max(psnr(truths[j], truths[index]) for j in others))
    return out


def _run_trial(
    condition: Condition,
    trial_seed: int,
    index: int,
    data: tuple[np.ndarray, np.ndarray],
    budget: AttackBudget,
) -> Trial:
    """Build the trial's model, observe the update under ``condition``, attack it."""
    start = time.perf_counter()
    images, labels = data
    model = build_attack_model(trial_seed)
    others: list[tuple[np.ndarray, int]] = []
    if condition.kind == "secagg":
        pool = np.delete(np.arange(len(images)), index)
        picks = derive_rng(trial_seed, _OTHERS).choice(pool, condition.clients - 1, replace=False)
        others = [(images[j], int(labels[j])) for j in picks]
    target = (images[index], int(labels[index]))
    update = observe_update(condition, model, target, others, lr=budget.lr, seed=trial_seed)
    gradient = gradient_estimate(condition, update, budget.lr)
    label = infer_label(model, gradient)
    steps = budget.iterations
    dlg = invert_gradient(model, gradient, iterations=steps, seed=trial_seed)
    idlg = invert_gradient(model, gradient, label=label, iterations=steps, seed=trial_seed)
    batch = None
    if condition.kind == "secagg":
        batch = invert_gradient(
            model,
            gradient,
            batch=condition.clients,
            iterations=budget.batch_iterations,
            seed=trial_seed,
        )
    seconds = time.perf_counter() - start
    return Trial(index, target[1], label, dlg, idlg, batch, seconds)


def run_leakage_report(
    conditions: Sequence[Condition] = DEFAULT_CONDITIONS,
    *,
    targets: int = 20,
    seed: int = 0,
    budget: AttackBudget | None = None,
) -> LeakageReport:
    """Attack ``targets`` digit images under every condition (for a ``fedloom leakage``).

    Trial t uses the same target image, model initialisation, dummy start and noise seed
    under every condition, so the rows differ only by the defence. On one core a trial
    takes about 0.1-0.5 s (DLG and iDLG) plus 1-3 s for the K-image attack under secure
    aggregation; the default conditions with 20 targets take about 2 minutes.
    """
    if targets < 1:
        raise ValueError("need at least one target image")
    budget = budget or AttackBudget()
    start = time.perf_counter()
    images, labels = load_digit_images()
    picks = derive_rng(seed, _TARGETS).choice(len(images), targets, replace=False)
    chosen = [int(i) for i in picks]
    results = [ConditionResult(c) for c in conditions]
    with _one_torch_thread():
        for result in results:
            for trial, index in enumerate(chosen):
                trial_seed = derive_seed(seed, trial)
                result.trials.append(
                    _run_trial(result.condition, trial_seed, index, (images, labels), budget)
                )
    random, mean_digit = _baselines(images, chosen, seed)
    sums = sorted({c.clients for c in conditions if c.kind == "secagg"})
    closest = {k: _closest_of_k_baseline(images, chosen, k, seed) for k in sums}
    report = LeakageReport(
        chosen, images, labels, results, random, mean_digit, closest, budget, seed
    )
    report.wall_s = time.perf_counter() - start
    return report


def run_leakage(settings: LeakageSettings) -> LeakageReport:
    """:func:`run_leakage_report` with what ``settings`` asks for: the entry point of
    ``fedloom leakage`` and ``benchmarks/leakage.py``.

    Checks the settings against the data first (raising :class:`LeakageSettingsError`),
    so that a value too large ends in one sentence rather than in NumPy's sampling error.
    """
    available = len(load_digit_images()[1])
    if settings.targets > available:
        raise LeakageSettingsError(
            f"--targets must be at most {available} (the digits available), got {settings.targets}"
        )
    if "secagg" in settings.kinds and max(settings.secagg_clients) > available:
        raise LeakageSettingsError(
            f"--secagg-clients must be at most {available} (one digit per client), "
            f"got {max(settings.secagg_clients)}"
        )
    budget = AttackBudget(
        iterations=settings.iterations,
        batch_iterations=settings.batch_iterations,
        lr=settings.lr,
    )
    return run_leakage_report(
        build_conditions(settings), targets=settings.targets, seed=settings.seed, budget=budget
    )


# --------------------------------------------------------------------------- output

_ATTACK_TITLES: dict[AttackName, str] = {"dlg": "DLG", "idlg": "iDLG", "batch": "DLG×K"}


def _mean_and_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), as the table prints them."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "—"
    mean, sd = _mean_and_sd(values)
    return f"{mean:5.1f} ± {sd:4.1f}"


def _mean_mse(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.1e}" if values else "—"


def format_leakage_table(report: LeakageReport) -> str:
    """The plain-text table: per condition, PSNR in dB (mean ± sd over targets) and mean
    MSE of each attack, iDLG's label accuracy and the mean seconds per target (observing
    the update and all attacks); then the "learned nothing" baselines."""
    header = f"{'condition':<26}"
    for attack in _ATTACKS:
        header += f" {_ATTACK_TITLES[attack] + ' PSNR':>12} {'MSE':>7}"
    header += f" {'label acc':>9} {'s/target':>8}"
    lines = [header, "-" * len(header)]
    truths = report.truths
    for r in report.results:
        line = f"{r.condition.name:<26}"
        for attack in _ATTACKS:
            line += (
                f" {_mean_sd(r.psnrs(truths, attack)):>12} {_mean_mse(r.mses(truths, attack)):>7}"
            )
        line += f" {r.label_accuracy:9.0%} {r.seconds / len(r.trials):8.2f}"
        lines.append(line)
    lines.append("-" * len(header))
    baselines = (
        ("baseline: uniform random", report.baseline_random),
        ("baseline: mean digit", report.baseline_mean),
    )
    for name, values in baselines:
        lines.append(f"{name:<26} {_mean_sd(values):>12}")
    # DLG×K's baseline goes under DLG×K's column: skip the DLG and iDLG columns.
    skip = " " * (2 * (1 + 12 + 1 + 7))
    for k, values in sorted(report.baseline_closest_of.items()):
        lines.append(f"{f'baseline: closest of {k}':<26}{skip} {_mean_sd(values):>12}")
    return "\n".join(lines)


def format_leakage_report(report: LeakageReport, settings: LeakageSettings) -> str:
    """What both callers print: the settings line, :func:`format_leakage_table`, the time."""
    return "\n".join(
        (settings.describe(), format_leakage_table(report), f"total {report.wall_s:.1f} s")
    )


def _attack_summary(
    result: ConditionResult, truths: np.ndarray, attack: AttackName
) -> dict[str, Any] | None:
    """PSNR and MSE per target and their means; None where the attack did not run."""
    psnrs, mses = result.psnrs(truths, attack), result.mses(truths, attack)
    if not psnrs:
        return None
    mean, sd = _mean_and_sd(psnrs)
    return {
        "psnr_db_mean": mean,
        "psnr_db_sd": sd,
        "mse_mean": statistics.fmean(mses),
        "psnr_db": psnrs,
        "mse": mses,
    }


def leakage_summary(report: LeakageReport, settings: LeakageSettings) -> dict[str, Any]:
    """The machine-readable report (``leakage.json``): the settings, the targets, and per
    condition each attack's PSNR (dB, peak 1.0, capped at :data:`PSNR_CAP_DB`) and MSE
    per target with their means, iDLG's label accuracy and the seconds spent; then the
    "learned nothing" baselines. The numbers are those of :func:`format_leakage_table`
    before rounding; ``batch`` (DLG×K) is None outside secure aggregation."""
    truths = report.truths
    conditions = [
        {
            "name": r.condition.name,
            "kind": r.condition.kind,
            "clip_norm": r.condition.clip_norm,
            "noise_multiplier": r.condition.noise_multiplier,
            "clients": r.condition.clients,
            "label_accuracy": r.label_accuracy,
            "inferred_labels": [t.inferred_label for t in r.trials],
            "seconds": r.seconds,
            "attacks": {a: _attack_summary(r, truths, a) for a in _ATTACKS},
        }
        for r in report.results
    ]
    return {
        "settings": settings.as_dict(),
        "psnr_cap_db": PSNR_CAP_DB,
        "targets": [{"index": i, "label": int(report.truths_labels[i])} for i in report.targets],
        "conditions": conditions,
        "baselines": {
            "uniform_random_psnr_db": report.baseline_random,
            "mean_digit_psnr_db": report.baseline_mean,
            "closest_of_k_psnr_db": {
                str(k): v for k, v in sorted(report.baseline_closest_of.items())
            },
        },
        "wall_s": report.wall_s,
    }


def write_leakage_json(report: LeakageReport, settings: LeakageSettings, path: str | Path) -> Path:
    """Write :func:`leakage_summary` as strict JSON (no NaN: every number is finite)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(leakage_summary(report, settings), indent=2, allow_nan=False)
    out.write_text(text + "\n", encoding="utf-8")
    return out


def _grid_rows(report: LeakageReport) -> list[tuple[str, list[np.ndarray], list[str]]]:
    """(row title, images, captions): the truths, DLG per condition, and DLG×K's best
    matches under secure aggregation."""
    truths = [report.truths[i] for i in report.targets]
    labels = [f"label {report.truths_labels[i]}" for i in report.targets]
    rows = [("true image", truths, labels)]
    for r in report.results:
        grid_attacks: tuple[tuple[AttackName, str], ...] = (("dlg", ""), ("batch", ", DLG×K"))
        for attack, suffix in grid_attacks:
            found = [t.reconstruction(attack, report.truths[t.index]) for t in r.trials]
            pictures = [p for p in found if p is not None]
            if len(pictures) == len(truths):
                notes = [f"{psnr(p, x):.0f} dB" for p, x in zip(pictures, truths, strict=True)]
                rows.append((r.condition.name + suffix, pictures, notes))
    return rows


def write_leakage_png(report: LeakageReport, path: str | Path) -> Path:
    """A grid: the true images on top, then one row of DLG reconstructions per condition
    and, under secure aggregation, one of DLG×K's best matches (one column per target,
    PSNR under each). Drawn on an Agg canvas, as :mod:`fedloom.report` does."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _grid_rows(report)
    cols = len(report.targets)
    # Row titles take about 2.6 in; at least 6 in wide so that the title fits over the
    # few columns of `fedloom leakage`'s default three targets.
    fig = Figure(figsize=(max(6.0, 2.6 + 0.8 * cols), 0.95 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for row, (name, pictures, notes) in enumerate(rows):
        for col, (picture, note) in enumerate(zip(pictures, notes, strict=True)):
            ax = axes[row][col]
            ax.imshow(np.asarray(picture).reshape(8, 8), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(note, fontsize=6, labelpad=1)
            if col == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(
        "gradient inversion: true digits and reconstructions (PSNR, peak 1.0)", fontsize=10
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    out.write_bytes(buffer.getvalue())
    return out
