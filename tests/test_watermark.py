"""WAFFLE watermarking: the trigger set, the exact binomial test, the server's embedding,
the post-aggregation transform seam, and ``fedloom watermark verify`` on real runs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch import nn

from fedloom.algorithms.base import PlainServer, StageContext
from fedloom.attacks.theft import Theft, fine_tune_stolen
from fedloom.cli import main
from fedloom.client.learner import Learner
from fedloom.config import ConfigError, ServerConfig, WatermarkConfig, load_config
from fedloom.data import build_federated_dataset
from fedloom.data.base import ArrayDataset
from fedloom.engine.simulation import run_simulation
from fedloom.messages import DELTA, FitResult
from fedloom.server.aggregators import MeanAggregator
from fedloom.server.optimizers import make_server_optimizer
from fedloom.server.strategy import Strategy
from fedloom.server.transforms import ServerModel
from fedloom.server.watermark import (
    WATERMARK_FILE,
    TriggerSet,
    WaffleEmbedding,
    binomial_p_value,
    make_trigger_set,
    make_waffle,
    verify,
)
from fedloom.strategies import build_learner
from tests.helpers import final_weights, interrupt_after, latest_checkpoint

# A small real run: 5 digits clients, 1 local epoch, 3 rounds (about a second each).
SMALL = [
    "rounds=3",
    "client.epochs=1",
    "data.num_clients=5",
    "data.partition='iid'",
    "watermark.max_steps=200",
]


# ------------------------------------------------------------------ trigger set
def test_trigger_set_is_a_function_of_its_seed() -> None:
    kwargs: dict[str, Any] = {
        "size": 50,
        "num_labels": 4,
        "input_shape": (2, 3),
        "low": -1.0,
        "high": 2.0,
    }
    a, b = make_trigger_set(seed=7, **kwargs), make_trigger_set(seed=7, **kwargs)
    other = make_trigger_set(seed=8, **kwargs)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, other.x)
    assert a.x.shape == (50, 2, 3) and a.x.dtype == np.float32
    assert set(np.unique(a.x)) == {-1.0, 2.0}
    assert a.y.dtype == np.int64 and set(np.unique(a.y)) <= {0, 1, 2, 3}


def test_trigger_file_round_trip(tmp_path: Path) -> None:
    trigger = make_trigger_set(seed=1, size=10, num_labels=3, input_shape=(4,), low=0.0, high=1.0)
    path = tmp_path / "t.safetensors"
    path.write_bytes(trigger.to_bytes())
    back = TriggerSet.load(path)
    assert np.array_equal(back.x, trigger.x) and np.array_equal(back.y, trigger.y)
    assert back.num_labels == 3


# ---------------------------------------------------------------------- p-value
def test_binomial_p_value_against_hand_computed_cases() -> None:
    # n = 3, p0 = 1/2: P(X >= 2) = (C(3,2) + C(3,3)) / 2^3 = 4/8.
    assert binomial_p_value(2, 3, 2) == 0.5
    # n = 4, p0 = 1/10: P(X >= 2) = 1 - 0.9^4 - 4 * 0.1 * 0.9^3 = 1 - 0.6561 - 0.2916.
    assert binomial_p_value(2, 4, 10) == pytest.approx(0.0523, abs=1e-12)
    assert binomial_p_value(0, 4, 10) == 1.0
    # All 100 right with 10 labels: exactly 10^-100 (no underflow to 0 on the way).
    assert binomial_p_value(100, 100, 10) == pytest.approx(1e-100, rel=1e-12)
    with pytest.raises(ValueError):
        binomial_p_value(5, 4, 10)


# -------------------------------------------------------------------- embedding
def _tiny_server_model() -> ServerModel:
    torch.manual_seed(0)
    learner = Learner(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)))
    return ServerModel(
        learner=learner, input_shape=(6,), num_classes=3, input_low=0.0, input_high=1.0
    )


def test_embedding_raises_trigger_accuracy_above_the_threshold() -> None:
    model = _tiny_server_model()
    cfg = WatermarkConfig(enabled=True, trigger_size=20, threshold=0.9, max_steps=2000, lr=0.1)
    waffle = WaffleEmbedding(cfg, model, seed=3)
    w0 = model.learner.initial_vector()
    assert waffle.accuracy(w0) < 0.9
    weights, fields = waffle.transform(1, w0)
    assert fields["watermark_accuracy"] >= 0.9
    assert fields["watermark_accuracy"] == waffle.accuracy(weights)
    assert fields["watermark_accuracy_before"] == waffle.accuracy(w0)
    assert 0 < fields["watermark_steps"] <= 2000
    # Already above the threshold: the model is left as it is.
    again, fields = waffle.transform(2, weights)
    assert fields["watermark_steps"] == 0 and np.array_equal(again, weights)


def test_embedding_stops_at_the_step_cap() -> None:
    model = _tiny_server_model()
    cfg = WatermarkConfig(enabled=True, trigger_size=20, threshold=1.0, max_steps=3)
    _, fields = WaffleEmbedding(cfg, model, seed=3).transform(1, model.learner.initial_vector())
    assert fields["watermark_steps"] == 3


def test_waffle_refuses_more_labels_than_classes_token_inputs_and_regression() -> None:
    model = _tiny_server_model()
    context = StageContext(num_clients=2, spec=model.learner.binding.spec, seed=0)
    with pytest.raises(ConfigError, match="num_labels"):
        make_waffle(WatermarkConfig(enabled=True, num_labels=5), context, model)
    tokens = ServerModel(
        learner=model.learner,
        input_shape=(6,),
        num_classes=3,
        input_low=0.0,
        input_high=1.0,
        real_inputs=False,
    )
    with pytest.raises(ConfigError, match="real-valued inputs"):
        make_waffle(WatermarkConfig(enabled=True), context, tokens)
    regression = ServerModel(
        learner=model.learner, input_shape=(6,), num_classes=1, input_low=0.0, input_high=1.0
    )
    with pytest.raises(ConfigError, match="classifier"):
        make_waffle(WatermarkConfig(enabled=True), context, regression)


# ---------------------------------------------------------------- the seam
class _AddOne:
    """A user's post-aggregation transform: adds 1 to every weight, counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def transform(self, rnd: int, weights: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        self.calls += 1
        return weights + 1, {"added_in_round": rnd}

    def state(self) -> dict[str, Any]:
        return {"calls": self.calls, "marker": np.full(2, 5.0, np.float32)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.calls = int(state["calls"])


def _strategy(transform: _AddOne, min_aggregate_clients: int = 1) -> Strategy:
    server = ServerConfig(min_fit_clients=1)
    return Strategy(
        algorithm=PlainServer(),
        aggregator=MeanAggregator(),
        optimizer=make_server_optimizer(server, 2),
        sampling=server,
        transforms=[transform],
        min_aggregate_clients=min_aggregate_clients,
        dimension=2,
    )


def _update() -> FitResult:
    delta = np.array([1.0, 2.0], np.float32)
    return FitResult(client_id=0, round=1, model_version=0, num_examples=3, vectors={DELTA: delta})


def test_transforms_edit_the_aggregated_model_and_are_checkpointed() -> None:
    transform = _AddOne()
    strategy = _strategy(transform)
    outcome = strategy.process_fit(1, [_update()], np.zeros(2, np.float32), exchange=None)  # type: ignore[arg-type]
    assert np.array_equal(outcome.weights, [2.0, 3.0])
    assert outcome.fields["added_in_round"] == 1
    tensors, meta = strategy.state()
    assert np.array_equal(tensors["transform0/marker"], [5.0, 5.0])
    assert meta["transform0/calls"] == 1
    restored = _AddOne()
    _strategy(restored).load_state(tensors, meta)
    assert restored.calls == 1
    # A round that does not aggregate leaves the model, and the transform, alone.
    idle = _AddOne()
    outcome = _strategy(idle, min_aggregate_clients=2).process_fit(
        1,
        [_update()],
        np.zeros(2, np.float32),
        exchange=None,  # type: ignore[arg-type]
    )
    assert not outcome.aggregated and idle.calls == 0


# ----------------------------------------------------------- real runs, CLI
def test_verify_accepts_the_watermarked_model_and_rejects_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marked, clean = tmp_path / "marked", tmp_path / "clean"
    assert main(["run", *_sets(SMALL, "watermark.enabled=true"), "--out", str(marked)]) == 0
    assert main(["run", *_sets(SMALL), "--out", str(clean)]) == 0
    assert (marked / WATERMARK_FILE).is_file() and not (clean / WATERMARK_FILE).exists()
    # The secret seed is in the run store (checkpoints), not in the config.
    assert json.loads((marked / "config.json").read_text())["watermark"]["seed"] is None
    assert isinstance(latest_checkpoint(marked).meta["stages"]["transform0/seed"], int)
    capsys.readouterr()

    assert main(["watermark", "verify", str(marked)]) == 0
    out = capsys.readouterr().out
    assert "carries the watermark" in out and "p-value" in out

    assert main(["watermark", "verify", str(marked), "--model", str(clean)]) == 1
    out = capsys.readouterr().out
    assert "verdict: no watermark" in out

    # A run without a watermark: one line saying so, exit code 2.
    assert main(["watermark", "verify", str(clean)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "watermark.enabled" in err

    # A stolen copy, fine-tuned and saved by the thief as a .npy vector or as the
    # model's named tensors, still carries it; a file of another shape is refused.
    cfg = load_config(None, SMALL)
    data = build_federated_dataset(cfg.data, cfg.seed)
    learner = build_learner(cfg, data)
    stolen = fine_tune_stolen(learner, final_weights(marked), data.pooled_train(), Theft())
    np.save(tmp_path / "stolen.npy", stolen)
    learner.binding.load(stolen)
    named = {k: v.detach().numpy().copy() for k, v in learner.model.state_dict().items()}
    save_file(named, tmp_path / "stolen.safetensors")
    for name in ("stolen.npy", "stolen.safetensors"):
        assert main(["watermark", "verify", str(marked), "--model", str(tmp_path / name)]) == 0
    np.save(tmp_path / "short.npy", stolen[:10])
    capsys.readouterr()
    assert main(["watermark", "verify", str(marked), "--model", str(tmp_path / "short.npy")]) == 2
    assert "same architecture" in capsys.readouterr().err

    assert main(["watermark", "verify", str(tmp_path)]) == 2
    assert "not a fedloom run directory" in capsys.readouterr().err

    # A checkpoint of the run is verified with the run's trigger set.
    ckpt = sorted((marked / "checkpoints").iterdir())[-1]
    assert main(["watermark", "verify", str(ckpt)]) == 0


def test_resume_keeps_the_watermark(tmp_path: Path) -> None:
    """A secret seed survives a crash: the resumed run embeds the same trigger set, and
    with a given seed the resumed run ends exactly where an uninterrupted one does."""
    secret = load_config(None, [*SMALL, "watermark.enabled=true"])
    run = tmp_path / "secret"
    interrupt_after(secret, run, 2)
    before = TriggerSet.load(run / WATERMARK_FILE)
    seed = latest_checkpoint(run).meta["stages"]["transform0/seed"]
    run_simulation(secret, run, resume=True)
    after = TriggerSet.load(run / WATERMARK_FILE)  # (the file's header order may differ)
    assert np.array_equal(after.x, before.x) and np.array_equal(after.y, before.y)
    assert latest_checkpoint(run).meta["stages"]["transform0/seed"] == seed

    seeded = load_config(None, [*SMALL, "watermark.enabled=true", "watermark.seed=5"])
    interrupt_after(seeded, tmp_path / "resumed", 2)
    run_simulation(seeded, tmp_path / "resumed", resume=True)
    run_simulation(seeded, tmp_path / "straight")
    assert np.array_equal(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight"))
    trigger = TriggerSet.load(tmp_path / "straight" / WATERMARK_FILE)
    data = build_federated_dataset(seeded.data, seeded.seed)
    verdict = verify(build_learner(seeded, data), final_weights(tmp_path / "straight"), trigger)
    assert verdict.carries_watermark


def test_theft_fine_tunes_on_the_given_share_only() -> None:
    model = _tiny_server_model()
    data = ArrayDataset(np.zeros((30, 6), np.float32), np.zeros(30, np.int64))
    w0 = model.learner.initial_vector()
    with pytest.raises(ValueError, match="fraction"):
        fine_tune_stolen(model.learner, w0, data, Theft(fraction=0.0))
    # 10 % of 30 examples at batch size 16 is one step per epoch: 5 steps change the model.
    assert not np.array_equal(fine_tune_stolen(model.learner, w0, data, Theft()), w0)


def _sets(items: list[str], *extra: str) -> list[str]:
    return [arg for item in [*items, *extra] for arg in ("--set", item)]
