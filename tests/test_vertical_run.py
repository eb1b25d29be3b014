"""``mode = "vertical"`` through ``fedloom run``: PSI alignment, round records, summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedloom.cli.main import main
from fedloom.config import ConfigError, load_config
from fedloom.engine.simulation import run_simulation

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "vertical_breast_cancer.toml"


def test_vertical_run_writes_records_alignment_and_baselines(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(
        [
            "run",
            str(EXAMPLE),
            "--out",
            str(out),
            "--set",
            "rounds=2",
            "--set",
            "vertical.records=60",
            "--set",
            "vertical.test_fraction=0.4",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    align = summary["alignment"]
    assert 0 < align["intersection_size"] <= min(align["set_sizes"]) <= 60
    assert align["bytes_exchanged"] > 256 * align["intersection_size"]
    rec = summary["history"][-1]
    for key in ("accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "leak_norm_auc"):
        assert key in rec
    assert rec["clients_sampled"] == rec["clients_succeeded"] == 3  # label + 2 feature parties
    base = summary["baselines"]
    assert len(base["feature_party_alone"]) == 2
    assert summary["metrics"]["centralized_accuracy"] == base["centralized_same_network"]
    assert (out / "history.csv").exists() and (out / "accuracy.png").exists()


def test_vertical_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be resumed"):
        run_simulation(
            load_config(EXAMPLE, ["rounds=1", "vertical.records=30", "vertical.baselines=false"]),
            tmp_path / "r",
        )
        run_simulation(load_config(EXAMPLE), tmp_path / "r", resume=True)
    cfg = load_config(EXAMPLE, ["privacy.mechanism=central", "privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="mode = 'vertical'"):
        run_simulation(cfg, tmp_path / "dp")
    with pytest.raises(ConfigError, match="one per party"):
        load_config(EXAMPLE, ["vertical.feature_parties=3", "vertical.bottom=[{}, {}]"])
