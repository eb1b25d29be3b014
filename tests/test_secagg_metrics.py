"""Under secure aggregation a client's training metrics and example count describe its
data, which the protocol exists to hide: they stay on the client unless the config says
``privacy.reveal_client_metrics = true`` (issue 9). Metrics a server stage needs (the
clipped-count bit of adaptive clipping, FedNova's normalizer) still go."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedloom.client_store import ClientState
from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation
from fedloom.messages import GLOBAL, HOLD, FitTask

from .helpers import client_runtime, toy_dataset

SECAGG = ["privacy.secure_aggregation=secagg+", "privacy.secagg_clip_range=4.0"]


def _held(overrides: list[str]) -> tuple[dict[str, float], int]:
    cfg = load_config(None, ["model.name=logreg", "client.epochs=1", *overrides])
    runtime = client_runtime(cfg, toy_dataset(clients=2))
    task = FitTask(client_id=0, round=1, model_version=0, config={HOLD: "secagg", "clip_norm": 1.0})
    result = runtime.fit(task, {GLOBAL: runtime.initial_vector()}, ClientState())
    assert result.held and not result.vectors
    return result.metrics, result.num_examples


def test_a_held_upload_carries_no_metrics_and_no_count_by_default() -> None:
    metrics, n = _held(SECAGG)
    assert metrics == {} and n == 0


def test_reveal_client_metrics_sends_them_in_the_clear() -> None:
    metrics, n = _held([*SECAGG, "privacy.reveal_client_metrics=true"])
    assert "train_loss" in metrics and n == 40


@pytest.mark.parametrize(
    ("overrides", "kept"),
    [
        (
            [
                "strategy=dp-fedavg",
                "server.sampling=fixed",
                "privacy.noise_multiplier=1.0",
                "privacy.adaptive_clipping=true",
                "privacy.clipped_count_stddev=1.0",
            ],
            {"below_clip"},
        ),
        (["strategy=fednova"], {"fednova_a"}),
    ],
    ids=["adaptive-clipping", "fednova"],
)
def test_metrics_a_server_stage_needs_still_go(overrides: list[str], kept: set[str]) -> None:
    metrics, n = _held([*SECAGG, *overrides])
    assert set(metrics) == kept and n == 0


def test_a_secure_run_records_no_client_train_loss_unless_revealed(tmp_path: Path) -> None:
    base = ["data.num_clients=3", "rounds=1", "client.epochs=1", *SECAGG]
    hidden = run_simulation(load_config(None, base), tmp_path / "hidden")["history"][0]
    assert hidden["aggregated"] and hidden["train_loss"] is None
    shown = run_simulation(
        load_config(None, [*base, "privacy.reveal_client_metrics=true"]), tmp_path / "shown"
    )["history"][0]
    assert shown["train_loss"] is not None
