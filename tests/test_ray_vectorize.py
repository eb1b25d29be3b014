"""engine.vectorize on Ray: what is refused, at start-up and in one line (no Ray needed:
the refusals come before Ray starts)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch import nn

from fedloom.client.learner import Learner
from fedloom.client_store import ClientStateStore
from fedloom.config import ConfigError, load_config
from fedloom.engine.simulation import Wiring, make_executor, run_simulation

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
