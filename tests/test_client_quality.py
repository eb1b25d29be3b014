"""Model quality across the client population: per-client accuracies, their mean, worst
10 % and spread in each evaluated round and in the summary; withheld under secure
aggregation unless the run reveals client metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedloom.config import RunConfig, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.report import summary_table
from fedloom.server.client_quality import client_quality


def test_worst_ten_percent_is_the_mean_of_the_lowest_tenth_rounded_up() -> None:
    # 12 clients: ⌈1.2⌉ = 2 worst, (.1 + .2) / 2.
    accs = [0.9, 0.1, 0.8, 0.2, 0.7, 0.6, 0.95, 0.5, 0.4, 0.85, 0.3, 0.75]
    q = client_quality(accs)
    assert q["client_accuracy_worst10"] == pytest.approx(0.15)
    assert q["client_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert q["client_accuracy_std"] == pytest.approx(np.std(accs))
    # Fewer than 10 clients: still one client, the worst.
    assert client_quality([0.5, 0.9, 0.7])["client_accuracy_worst10"] == pytest.approx(0.5)
    assert client_quality([]) == {}


def _config(*extra: str) -> RunConfig:
    return load_config(
        None,
        [
            "rounds=2",
            "data.num_clients=10",
            "data.alpha=0.1",
            "data.client_test_fraction=0.3",
            "eval.federated=true",
            "client.epochs=1",
            *extra,
        ],
    )


def test_digits_dirichlet_01_summary_reports_worst_ten_percent_next_to_the_mean(
    tmp_path: Path,
) -> None:
    """The issue's acceptance check, on a small run: digits, Dirichlet α = 0.1."""
    summary = run_simulation(_config(), tmp_path / "run")
    for record in summary["history"]:
        accs = record["client_accuracies"]
        assert accs and all(0.0 <= a <= 1.0 for a in accs.values())
        values = list(accs.values())
        assert record["client_accuracy_mean"] == pytest.approx(np.mean(values), abs=1e-5)
        worst = sorted(values)[: max(1, int(np.ceil(len(values) / 10)))]
        assert record["client_accuracy_worst10"] == pytest.approx(np.mean(worst), abs=1e-5)
    metrics, final = summary["metrics"], summary["final"]
    last = summary["history"][-1]
    assert metrics["client_accuracy_worst10"] == last["client_accuracy_worst10"]
    assert metrics["client_accuracy_worst10"] < metrics["client_accuracy_mean"]
    assert final["client_accuracy_worst10"] == metrics["client_accuracy_worst10"]
    console = Console(width=120, record=True)
    console.print(summary_table(summary))
    text = console.export_text()
    line = next(li for li in text.splitlines() if "worst 10 %" in li)
    mean, worst = metrics["client_accuracy_mean"], metrics["client_accuracy_worst10"]
    assert f"{mean:.4f} / {worst:.4f}" in line


def test_secure_aggregation_withholds_per_client_accuracy_and_says_why(tmp_path: Path) -> None:
    summary = run_simulation(
        _config("rounds=1", "data.num_clients=4", "privacy.secure_aggregation='secagg+'"),
        tmp_path / "hidden",
    )
    record = summary["history"][0]
    assert record["fed_accuracy"] is not None
    for key in ("client_accuracies", "client_accuracy_mean", "client_accuracy_worst10"):
        assert key not in record
    assert summary["metrics"]["client_accuracy_worst10"] is None
    assert summary["client_quality"]["available"] is False
    assert "privacy.reveal_client_metrics" in summary["client_quality"]["reason"]
    revealed = run_simulation(
        _config(
            "rounds=1",
            "data.num_clients=4",
            "privacy.secure_aggregation='secagg+'",
            "privacy.reveal_client_metrics=true",
        ),
        tmp_path / "revealed",
    )
    assert len(revealed["history"][0]["client_accuracies"]) == 4
    assert "client_quality" not in revealed
