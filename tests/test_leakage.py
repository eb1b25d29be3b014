"""Gradient leakage (fedloom.attacks.leakage): the attacks work; which defences stop them.

Thresholds come from the measured numbers (seed 0, 20 targets: the benchmark's table) with wide
margins, so that a change in torch's floating-point details cannot flip them:

* no defence: every DLG reconstruction measured ≥ 64 dB, most at the 100 dB cap. We ask
  for > 30 dB per target (at 30 dB the 8×8 image is visually identical to the truth)
  and 40 dB above the random baseline on average.
* DP noise z = 1: measured 3.5 dB, below a uniform random image (5.8 dB); we ask for
  less than the random baseline + 3 dB and less than the mean digit (which needs no
  update at all).
* secure aggregation K = 16, the sum attacked as one client's gradient: measured
  11.6 dB, the mean digit's level (11.7 dB); we ask for 50 dB below no defence and less
  than 18 dB.
* secure aggregation K = 4 against DLG with 4 dummy images: measured 65 ± 13 dB over 20
  targets (74 dB on both targets tested here); we ask for > 30 dB. This test pins down a
  limit of the defence, not a bug: see the module doc.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest

from fedloom.attacks.leakage import (
    DEFAULT_CLIP_NORM,
    DEFAULT_LR,
    PSNR_CAP_DB,
    AttackBudget,
    Condition,
    ConditionResult,
    LeakageReport,
    build_attack_model,
    format_leakage_table,
    gradient_estimate,
    infer_label,
    invert_gradient,
    load_digit_images,
    mse,
    observe_update,
    psnr,
    run_leakage_report,
    single_example_gradient,
    write_leakage_png,
)

NONE = Condition("no defense", "none")
CLIP = Condition("clipping alone", "clip", clip_norm=DEFAULT_CLIP_NORM)
DP_HEAVY = Condition("clip + DP z=1", "dp", clip_norm=DEFAULT_CLIP_NORM, noise_multiplier=1.0)
SECAGG_16 = Condition("secure aggregation K=16", "secagg", clients=16)


@pytest.fixture(scope="module")
def report() -> LeakageReport:
    """Four targets under the four conditions the tests judge (about 5 s). The K-image
    attack gets a token budget: nothing here judges it."""
    budget = AttackBudget(batch_iterations=20)
    return run_leakage_report([NONE, CLIP, DP_HEAVY, SECAGG_16], targets=4, budget=budget)


def _result(report: LeakageReport, condition: Condition) -> ConditionResult:
    return next(r for r in report.results if r.condition == condition)


def _mean_psnr(report: LeakageReport, condition: Condition) -> float:
    return statistics.fmean(_result(report, condition).psnrs(report.truths, "dlg"))


def test_idlg_reads_the_label_from_a_single_example_gradient() -> None:
    images, labels = load_digit_images()
    rng = np.random.default_rng(7)
    picks = rng.choice(len(images), 20, replace=False)
    correct = 0
    for trial, index in enumerate(picks):
        model = build_attack_model(trial)
        update = observe_update(NONE, model, (images[index], int(labels[index])))
        correct += infer_label(model, gradient_estimate(NONE, update, DEFAULT_LR)) == labels[index]
    assert correct / len(picks) >= 0.95


def test_dlg_reconstructs_the_image_without_defence(report: LeakageReport) -> None:
    psnrs = _result(report, NONE).psnrs(report.truths, "dlg")
    assert min(psnrs) > 30.0
    assert statistics.fmean(psnrs) > statistics.fmean(report.baseline_random) + 40.0
    assert _result(report, NONE).label_accuracy == 1.0


def test_clipping_alone_does_not_protect(report: LeakageReport) -> None:
    """Clipping keeps the direction; DLG's soft label absorbs the scale."""
    clipped = _result(report, CLIP)
    assert min(clipped.psnrs(report.truths, "dlg")) > 30.0
    assert min(clipped.psnrs(report.truths, "idlg")) > 30.0


def test_heavy_dp_noise_leaves_nothing_but_a_random_guess(report: LeakageReport) -> None:
    noisy = _mean_psnr(report, DP_HEAVY)
    assert noisy < statistics.fmean(report.baseline_random) + 3.0
    assert noisy < statistics.fmean(report.baseline_mean)
    assert noisy < _mean_psnr(report, NONE) - 50.0


def test_secure_aggregation_hides_the_target_in_the_sum(report: LeakageReport) -> None:
    summed = _mean_psnr(report, SECAGG_16)
    assert summed < _mean_psnr(report, NONE) - 50.0
    assert summed < 18.0


def test_a_batch_attack_recovers_the_target_from_a_sum_of_four() -> None:
    """K single-example updates sum to one batch gradient, and DLG inverts small batches."""
    secagg_4 = Condition("secure aggregation K=4", "secagg", clients=4)
    result = run_leakage_report([secagg_4], targets=2).results[0]
    truths = load_digit_images()[0]
    assert min(result.psnrs(truths, "batch")) > 30.0
    assert max(result.psnrs(truths, "dlg")) < 20.0


def test_secure_aggregation_sum_is_the_plain_sum_up_to_quantization() -> None:
    """The attacker gets what SecAgg+ really releases: Σ updates, 16-bit quantized."""
    images, labels = load_digit_images()
    model = build_attack_model(3)
    examples = [(images[i], int(labels[i])) for i in (5, 50, 500, 1500)]
    condition = Condition("secure aggregation K=4", "secagg", clients=4)
    released = observe_update(condition, model, examples[0], examples[1:])
    plain = sum(-DEFAULT_LR * single_example_gradient(model, x, y) for x, y in examples)
    peak = max(
        float(np.max(np.abs(DEFAULT_LR * single_example_gradient(model, x, y))))
        for x, y in examples
    )
    step = 2.0 ** np.ceil(np.log2(peak)) / (2**15 - 1)
    assert np.max(np.abs(released - plain)) <= 4 * step / 2 + 1e-7


def test_the_report_is_deterministic_given_the_seed() -> None:
    """Noise is seeded; SecAgg+ draws fresh OS keys and masks, but its sum is exact."""
    conditions = [
        Condition("dp", "dp", clip_norm=0.1, noise_multiplier=0.01),
        Condition("secure aggregation K=4", "secagg", clients=4),
    ]
    budget = AttackBudget(iterations=30, batch_iterations=30)
    first = run_leakage_report(conditions, targets=2, seed=5, budget=budget)
    second = run_leakage_report(conditions, targets=2, seed=5, budget=budget)
    assert first.targets == second.targets
    for one, two in zip(first.results, second.results, strict=True):
        for a, b in zip(one.trials, two.trials, strict=True):
            np.testing.assert_array_equal(a.dlg.images, b.dlg.images)
            np.testing.assert_array_equal(a.idlg.images, b.idlg.images)
            assert (a.batch is None) == (b.batch is None)
            if a.batch is not None and b.batch is not None:
                np.testing.assert_array_equal(a.batch.images, b.batch.images)


def test_idlg_attack_with_a_given_label_keeps_it() -> None:
    images, labels = load_digit_images()
    model = build_attack_model(0)
    gradient = single_example_gradient(model, images[10], int(labels[10]))
    result = invert_gradient(model, gradient, label=int(labels[10]), iterations=100)
    assert result.labels == (labels[10],)
    assert psnr(result.image, images[10]) > 30.0
    assert result.image.min() >= 0.0 and result.image.max() <= 1.0


def test_metrics() -> None:
    truth = np.zeros(64)
    assert mse(np.full(64, 0.1), truth) == pytest.approx(0.01)
    assert psnr(np.full(64, 0.1), truth) == pytest.approx(20.0)
    assert psnr(truth, truth) == PSNR_CAP_DB


def test_conditions_are_validated() -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        Condition("c", "clip")
    with pytest.raises(ValueError, match="noise_multiplier"):
        Condition("d", "dp", clip_norm=1.0)
    with pytest.raises(ValueError, match="K ≥ 2"):
        Condition("s", "secagg", clients=1)


def test_table_and_png(report: LeakageReport, tmp_path: Path) -> None:
    table = format_leakage_table(report)
    names = ("no defense", "secure aggregation K=16", "baseline: mean digit", "closest of 16")
    for name in names:
        assert name in table
    path = write_leakage_png(report, tmp_path / "grid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
