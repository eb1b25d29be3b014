"""The same user model and client code in a real deployment: ``fedloom.serve`` and
``fedloom.connect`` over gRPC end with exactly the model ``fedloom.simulate`` trains."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch import nn

import fedloom
from tests.deploy_helpers import federate_in_threads
from tests.helpers import final_weights


class TwoLayer(nn.Module):
    """A user's own model, defined here, not in fedloom."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: Any) -> Any:
        return self.head(self.body(x))


def _parts() -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 3))

    def draw(n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
        x = (rng.normal(size=(n, 6)) + shift).astype(np.float32)
        return x, np.argmax(x @ w, axis=1).astype(np.int64)

    return [draw(40, 0.0), draw(60, 0.5)], draw(50, 0.2)


CONFIG = {"client": {"epochs": 2, "lr": 0.05, "momentum": 0.0}, "server": {"min_fit_clients": 2}}


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_served_user_model_equals_the_simulation(tmp_path: Path, strategy: str) -> None:
    clients, test = _parts()
    simulated = fedloom.simulate(
        model=TwoLayer,
        clients=clients,
        test=test,
        strategy=strategy,
        rounds=3,
        config=CONFIG,
        out=tmp_path / "sim",
    )

    def server(on_listening: Callable[[int], None]) -> dict[str, Any]:
        return fedloom.serve(
            model=TwoLayer,
            num_clients=2,
            address="127.0.0.1:0",
            out=tmp_path / "served",
            test=test,
            strategy=strategy,
            rounds=3,
            config=CONFIG,
            on_listening=on_listening,
        )

    def site(i: int) -> Callable[[str], int]:
        return lambda address: fedloom.connect(
            server=address,
            model=TwoLayer,
            train=clients[i],
            client_id=i,
            name=f"site-{i}",
            state_dir=tmp_path / f"state-{i}",
            max_wait_s=120,
        )

    summary, _ = federate_in_threads(server, [site(0), site(1)])
    assert summary["rounds_completed"] == 3
    np.testing.assert_allclose(
        final_weights(tmp_path / "served"), final_weights(tmp_path / "sim"), atol=1e-5
    )
    assert summary["final"]["accuracy"] == pytest.approx(simulated["final"]["accuracy"], abs=1e-6)
