"""Anomaly scores, flags and reputation (fedloom.server.anomaly): scores worked out by
hand, the reputation's moving average and the sampling policy, the checkpointed
reputation across a resume, refusals, and the acceptance check of issue 10: with 20 %
sign-flip attackers on digits the flagged set has precision and recall >= 0.9."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.base import AlgorithmSettings, ClientContext, ClientUpdate, StageContext
from fedloom.algorithms.sgd import LocalSGD
from fedloom.config import AnomalyConfig, ConfigError, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.messages import DELTA
from fedloom.params import ParamEntry, ParamSpec
from fedloom.registry import CLIENT_ALGORITHMS, UPDATE_MONITORS
from fedloom.server.aggregators import AggregationInput
from fedloom.server.anomaly import MAX_SCORE, AnomalyMonitor, anomaly_scores, robust_z

from .helpers import final_weights, interrupt_after, latest_checkpoint

# A = (1, 0), B = (2, 2), C = (3, 0), D = (-4, 0); the coordinate-wise median is
# m = (median{-4, 1, 2, 3}, median{0, 0, 0, 2}) = (1.5, 0).
ROWS = np.array([[1, 0], [2, 2], [3, 0], [-4, 0]], dtype=np.float64)


def test_cosine_scores_by_hand() -> None:
    # 1 - cos(x, m): A and C lie along m (0), B at 45° (1 - 1/√2), D opposite (2).
    assert anomaly_scores(ROWS, "cosine") == pytest.approx([0, 1 - 1 / math.sqrt(2), 0, 2])


def test_distance_scores_by_hand() -> None:
    # ‖x - m‖ = 0.5, √4.25, 1.5, 5.5; their median (1.5 + √4.25) / 2 is the unit.
    dist = np.array([0.5, math.sqrt(4.25), 1.5, 5.5])
    unit = (1.5 + math.sqrt(4.25)) / 2
    assert anomaly_scores(ROWS, "distance") == pytest.approx(dist / unit)


def test_sign_scores_by_hand() -> None:
    # sign(m) = (+, 0): only the first coordinate counts; D alone disagrees there.
    assert anomaly_scores(ROWS, "sign").tolist() == [0.0, 0.0, 0.0, 1.0]
    rows = np.array([[1, -1, 2], [1, 1, 1], [-1, -1, 3]], dtype=np.float64)
    # m = (1, -1, 2): row 0 agrees everywhere, row 1 disagrees in 1 of 3, row 2 in 1 of 3.
    assert anomaly_scores(rows, "sign") == pytest.approx([0, 1 / 3, 1 / 3])


def test_robust_z_by_hand() -> None:
    # median 3, |deviations| 2, 1, 0, 1, 17 → MAD 1, unit 1.4826.
    assert robust_z(np.array([1.0, 2.0, 3.0, 4.0, 20.0])) == pytest.approx(
        np.array([-2.0, -1.0, 0.0, 1.0, 17.0]) / 1.4826
    )
    assert robust_z(np.array([1.0, 1.0, 1.0, 5.0])).tolist() == [0, 0, 0, MAX_SCORE]


def test_norm_scores_by_hand() -> None:
    # Norms 1, √8, 3, 4; median (√8 + 3) / 2; MAD = median of the deviations.
    norms = np.array([1, math.sqrt(8), 3, 4])
    dev = np.abs(norms - (math.sqrt(8) + 3) / 2)
    mad = np.median(dev)
    assert anomaly_scores(ROWS, "norm") == pytest.approx(dev / (1.4826 * mad))
    # All norms equal: MAD = 0, nobody deviates, every score 0 (not NaN).
    assert anomaly_scores(np.eye(3), "norm").tolist() == [0.0, 0.0, 0.0]


def _input(rows: Any, ids: list[int]) -> AggregationInput:
    rows = np.asarray(rows, dtype=np.float32)
    return AggregationInput(
        round=1,
        dimension=rows.shape[1],
        updates=rows,
        weights=np.ones(len(rows)),
        count=len(rows),
        client_ids=ids,
    )


def _monitor(**kw: Any) -> AnomalyMonitor:
    settings: dict[str, Any] = {
        "num_clients": 6,
        "method": "cosine",
        "rule": "absolute",
        "threshold": 1.0,
        "score_decay": 0.0,
        "decay": 0.5,
        "exclude_below": 0.3,
    }
    settings.update(kw)
    return AnomalyMonitor(**settings)


def test_flags_reputation_and_sampling_policy_by_hand() -> None:
    mon = _monitor()
    fields = mon.observe(_input(ROWS, [0, 2, 3, 5]))
    assert fields["flagged_clients"] == [5]  # D: score 2 > 1
    assert fields["anomaly_scores"] == pytest.approx(
        {"0": 0.0, "2": 1 - 1 / math.sqrt(2), "3": 0.0, "5": 2.0}, abs=1e-6
    )
    # r ← 0.5 r + 0.5 [not flagged]: client 5 goes 1 → 0.5; the others stay 1, and
    # clients 1 and 4 (not in the round) keep their starting reputation 1.
    assert mon.reputation.tolist() == [1, 1, 1, 1, 1, 0.5]
    assert fields["low_reputation_clients"] == []
    pool = np.arange(6)
    assert mon.eligible(2, pool).tolist() == [0, 1, 2, 3, 4, 5]
    fields = mon.observe(_input(ROWS, [0, 2, 3, 5]))
    assert mon.reputation[5] == 0.25 and fields["low_reputation_clients"] == [5]
    assert mon.eligible(3, pool).tolist() == [0, 1, 2, 3, 4]
    # State round trip: a fresh monitor loaded from it decides the same.
    fresh = _monitor()
    fresh.load_state(mon.state())
    assert fresh.eligible(3, pool).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="7 clients"):
        fresh.load_state({"reputation": np.ones(7), "smoothed": np.ones(6)})


def test_smoothed_scores_and_the_robust_z_rule_by_hand() -> None:
    # Sign scores, ρ = 0.5. Round 1 (clients 0..3 = A, B, C, D): raw (0, 0, 0, 1), the
    # smoothed scores start there; median 0, MAD 0, so D's z is MAX_SCORE: flagged.
    mon = _monitor(method="sign", rule="robust_z", threshold=2.5, score_decay=0.5)
    fields = mon.observe(_input(ROWS, [0, 1, 2, 3]))
    assert fields["flagged_clients"] == [3]
    assert mon.smoothed[:4].tolist() == [0, 0, 0, 1]
    # Round 2: D = (4, 0) now agrees (raw 0) and A = (-1, 0) disagrees (raw 1); m = (2.5, 0).
    # Smoothed: A 0.5·0 + 0.5·1 = 0.5, B 0, C 0, D 0.5·1 + 0.5·0 = 0.5. Median 0.25,
    # |deviations| all 0.25, MAD 0.25: z = ±0.25 / (1.4826 · 0.25) = ±0.674, nobody > 2.5.
    rows = np.array([[-1, 0], [2, 2], [3, 0], [4, 0]], dtype=np.float64)
    fields = mon.observe(_input(rows, [0, 1, 2, 3]))
    assert mon.smoothed[:4].tolist() == [0.5, 0, 0, 0.5]
    z = 1 / 1.4826
    assert fields["anomaly_scores"] == pytest.approx({"0": z, "1": -z, "2": -z, "3": z}, abs=1e-6)
    assert fields["flagged_clients"] == []
    # The smoothed scores are state too; clients not yet seen stay NaN.
    state = mon.state()
    assert np.isnan(state["smoothed"][4:]).all()
    fresh = _monitor(method="sign", rule="robust_z", threshold=2.5, score_decay=0.5)
    fresh.load_state(state)
    assert fresh.smoothed[:4].tolist() == [0.5, 0, 0, 0.5]


def test_the_section_reaches_the_monitor() -> None:
    context = StageContext(num_clients=3, spec=ParamSpec((ParamEntry("w", (2,)),)), seed=0)
    mon = UPDATE_MONITORS.create("anomaly", AnomalyConfig(enabled=True), context)
    assert (mon.method, mon.rule, mon.threshold, mon.score_decay) == ("sign", "robust_z", 2.5, 0.8)
    assert (mon.decay, mon.exclude_below) == (0.8, None)
    mon = UPDATE_MONITORS.create(
        "anomaly", AnomalyConfig(method="norm", rule="absolute", reputation_decay=0.9), context
    )
    assert (mon.method, mon.threshold, mon.decay) == ("norm", 3.0, 0.9)
    mon = UPDATE_MONITORS.create("anomaly", AnomalyConfig(threshold=0.5), context)
    assert (mon.method, mon.threshold) == ("sign", 0.5)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["privacy.secure_aggregation=secagg+"], "anomaly detection reads every client's update"),
        (
            [
                "privacy.mechanism=central",
                "privacy.noise_multiplier=1.0",
                "anomaly.exclude_below=0.5",
            ],
            "anomaly.exclude_below makes who is sampled depend",
        ),
    ],
)
def test_impossible_combinations_are_refused_in_one_line(
    tmp_path: Path, overrides: list[str], fragment: str
) -> None:
    cfg = load_config(None, ["rounds=1", "anomaly.enabled=true", *overrides])
    with pytest.raises(ConfigError) as info:
        run_simulation(cfg, tmp_path / "run")
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["fltrust", "flame"])
def test_new_aggregators_refuse_secure_aggregation(tmp_path: Path, name: str) -> None:
    cfg = load_config(
        None, ["rounds=1", f"server.aggregator={name}", "privacy.secure_aggregation=secagg+"]
    )
    with pytest.raises(ConfigError) as info:
        run_simulation(cfg, tmp_path / "run")
    assert "secure aggregation" in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------ sign-flip attackers


class _SignFlip:
    """Test-only attacker: honest local SGD, then the delta negated on malicious clients
    (the attack module proper lives elsewhere; this one only exercises the detector)."""

    def __init__(self, malicious: list[int]) -> None:
        self.inner = LocalSGD()
        self.malicious = set(malicious)

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        update = self.inner.fit(ctx)
        if ctx.client_id in self.malicious:
            return ClientUpdate({DELTA: -update.vectors[DELTA]}, update.metrics)
        return update

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        return self.inner.evaluate(ctx)


def _make_sign_flip(settings: AlgorithmSettings, context: StageContext) -> _SignFlip:
    return _SignFlip(list(settings.options["malicious"]))


CLIENT_ALGORITHMS.add("test-sign-flip", _make_sign_flip, replace=True)

#: 20 % of digits' 20 clients.
MALICIOUS = [0, 1, 2, 3]


def _attacked(*extra: str) -> list[str]:
    return [
        "client.algorithm=test-sign-flip",
        f"client.options={{malicious = {MALICIOUS}}}",
        "anomaly.enabled=true",
        *extra,
    ]


@pytest.mark.parametrize(
    ("partition", "extra"),
    [
        # The setting: digits, 20 clients, Dirichlet(0.5), 5 local epochs.
        ("dirichlet", []),
        ("iid", ["client.epochs=1"]),
    ],
)
def test_sign_flip_attackers_are_flagged_with_precision_and_recall_of_0_9(
    tmp_path: Path, partition: str, extra: list[str]
) -> None:
    """The default detector (sign score, smoothed, robust z > 2.5) in every round."""
    cfg = load_config(None, ["rounds=10", f"data.partition={partition}", *extra, *_attacked()])
    history = run_simulation(cfg, tmp_path / "run")["history"]
    truth = set(MALICIOUS)
    for record in history:
        assert set(record["anomaly_scores"]) == {str(c) for c in range(20)}
        flagged = set(record["flagged_clients"])
        precision = len(flagged & truth) / max(len(flagged), 1)
        recall = len(flagged & truth) / len(truth)
        assert precision >= 0.9 and recall >= 0.9, (record["round"], sorted(flagged))


def test_low_reputation_clients_stop_being_sampled_and_the_reputation_survives_resume(
    tmp_path: Path,
) -> None:
    overrides = [
        "rounds=6",
        "data.partition=iid",
        "client.epochs=1",
        # Cosine > 1 on IID digits: honest scores at most 0.49, attackers at least 1.5.
        *_attacked(
            "anomaly.method=cosine",
            "anomaly.rule=absolute",
            "anomaly.score_decay=0",
            "anomaly.exclude_below=0.5",
            "anomaly.reputation_decay=0.5",
        ),
    ]
    whole = run_simulation(load_config(None, overrides), tmp_path / "whole")["history"]
    # Flagged in round 1 (reputation 0.5) and 2 (0.25 < 0.5): not sampled from round 3 on.
    assert [r["clients_sampled"] for r in whole] == [20, 20, 16, 16, 16, 16]
    assert whole[1]["low_reputation_clients"] == MALICIOUS
    for record in whole[2:]:
        assert set(record["anomaly_scores"]).isdisjoint({str(c) for c in MALICIOUS})
    interrupt_after(load_config(None, overrides), tmp_path / "cut", 2)
    saved = latest_checkpoint(tmp_path / "cut").tensors["mon/anomaly/reputation"]
    assert saved[MALICIOUS].tolist() == [0.25] * 4
    resumed = run_simulation(load_config(None), tmp_path / "cut", resume=True)["history"]
    assert [r["clients_sampled"] for r in resumed] == [20, 20, 16, 16, 16, 16]
    assert np.array_equal(final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole"))
