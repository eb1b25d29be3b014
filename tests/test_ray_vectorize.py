"""engine.vectorize on Ray: what is refused, at start-up and in one line (no Ray needed:
the refusals come before Ray starts)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch import nn

from fedloom.client.learner import Learner
from fedloom.client_store import ClientState, ClientStateStore
from fedloom.config import ConfigError, load_config
from fedloom.engine.inprocess import InProcessExecutor
from fedloom.engine.ray import _ClientActor
from fedloom.engine.simulation import Wiring, make_executor, run_simulation
from fedloom.messages import GLOBAL, FitResult, FitTask

from .helpers import client_runtime, toy_dataset


def test_vectorize_needs_the_ray_engine() -> None:
    for name in ("inprocess", "pool", "vectorized"):
        with pytest.raises(ConfigError, match=r"engine\.vectorize trains each Ray actor") as err:
            load_config(None, [f"engine.name={name}", "engine.vectorize=true"])
        assert "\n" not in str(err.value).strip()
    assert load_config(None, ["engine.name=ray", "engine.vectorize=true"]).engine.vectorize


def test_a_non_vectorizable_algorithm_is_refused_before_ray_starts(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["strategy=scaffold", "engine.name=ray", "engine.vectorize=true", "rounds=1"]
    )
    with pytest.raises(
        ConfigError, match=r"engine\.vectorize = true cannot train the client algorithm"
    ) as err:
        run_simulation(cfg, tmp_path / "run")
    assert str(err.value).endswith("set engine.vectorize = false")
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()  # refused before Ray started


def test_a_non_vectorizable_model_is_refused_before_ray_starts() -> None:
    cfg = load_config(None, ["engine.name=ray", "engine.vectorize=true"])
    data = toy_dataset()
    runtime = client_runtime(cfg, data)
    runtime.learner = Learner(nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)))
    wiring = Wiring(
        cfg=cfg,
        data=data,
        runtime=runtime,
        client_store=ClientStateStore(),
        roles=[],
        runtime_factory=lambda: runtime,  # never called: the refusal comes first
    )
    with pytest.raises(
        ConfigError, match=r"engine\.vectorize = true cannot train a model with a Tanh"
    ):
        make_executor(wiring)
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_an_actor_trains_its_chunk_at_once_as_the_in_process_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The actor class itself (no Ray): one batched call for the chunk, each client's
    update, loss, steps and kept state as the in-process engine's."""
    cfg = load_config(None, ["model.name=mlp", "client.batch_size=4", "client.epochs=2"])
    data = toy_dataset(n=30, clients=3)
    runtime = client_runtime(cfg, data)
    actor = _ClientActor(lambda: runtime, 1, vectorize=True)
    assert actor._batch is not None
    batched: list[int] = []
    fit = actor._batch.fit

    def spy(tasks: Any, broadcast: Any, states: Any) -> Any:
        batched.append(len(tasks))
        return fit(tasks, broadcast, states)

    monkeypatch.setattr(actor._batch, "fit", spy)
    w0 = runtime.initial_vector()
    tasks = [FitTask(client_id=c, round=2, model_version=1) for c in range(3)]
    answers = actor.run(list(tasks), 1, {GLOBAL: w0}, [ClientState().to_bytes()] * 3)
    assert batched == [3]
    reference = InProcessExecutor(runtime, ClientStateStore()).fit(tasks, {GLOBAL: w0})
    for (ours, state), ref in zip(answers, reference, strict=True):
        assert isinstance(ours, FitResult) and isinstance(ref, FitResult)
        assert ours.client_id == ref.client_id and state is not None
        assert ours.metrics["steps"] == ref.metrics["steps"]
        assert ours.metrics["train_loss"] == pytest.approx(ref.metrics["train_loss"], rel=1e-5)
        np.testing.assert_allclose(ours.vectors["delta"], ref.vectors["delta"], atol=1e-6)
