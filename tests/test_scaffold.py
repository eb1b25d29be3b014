"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, option II): the client's control update
and the server's, by hand on a one-parameter problem; engines agree; resume is exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.nn.functional as F
from torch import nn

from fedloom.algorithms.base import ClientContext
from fedloom.algorithms.scaffold import CONTROL, STATE_KEY, ScaffoldClient, ScaffoldServer
from fedloom.client.learner import Learner, SGDSettings, WorkPlan, WorkSettings
from fedloom.client_store import ClientState
from fedloom.config import load_config
from fedloom.data.base import ArrayDataset, ClientData
from fedloom.engine.simulation import run_simulation
from fedloom.messages import DELTA, GLOBAL, FitResult
from fedloom.strategies import build_strategy

from .helpers import final_weights, interrupt_after, latest_checkpoint


def one_weight_learner() -> Learner:
    """f(x) = w·x, squared loss: on the single example (x=2, y=1) the loss is (2w − 1)²
    and its gradient 8w − 4."""
    return Learner(nn.Linear(1, 1, bias=False), loss=F.mse_loss, metrics={})


def context(
    *, w: float, c: float, c_i: float | None, lr: float, momentum: float, steps: int
) -> ClientContext:
    learner = one_weight_learner()
    data = ArrayDataset(np.array([[2.0]], np.float32), np.array([[1.0]], np.float32))
    state = ClientState()
    if c_i is not None:
        state.tensors[STATE_KEY] = np.array([c_i], np.float32)
    return ClientContext(
        client_id=0,
        round=1,
        config={},
        broadcast={GLOBAL: np.array([w], np.float32), CONTROL: np.array([c], np.float32)},
        data=ClientData(0, "c0", data),
        learner=learner,
        state=state,
        seed=0,
        work=WorkSettings(batch_size=1),
        sgd=SGDSettings(lr=lr, momentum=momentum),
        plan=WorkPlan(epochs=1, max_steps=steps, straggler=False),
    )


def test_client_option_two_by_hand() -> None:
    """w=1, c=0.5, c_i=0.25, η=0.1, K=2. Corrected gradients (8w−4) + 0.25:
    4.25 → w=0.575; 0.85 → w=0.49. c_i⁺ = c_i − c + (x − y)/(Kη) = −0.25 + 0.51/0.2 = 2.3,
    which is the mean raw gradient (4 + 0.6)/2: the correction cancels."""
    ctx = context(w=1.0, c=0.5, c_i=0.25, lr=0.1, momentum=0.0, steps=2)
    update = ScaffoldClient().fit(ctx)
    np.testing.assert_allclose(update.vectors[DELTA], [0.49 - 1.0], atol=1e-6)
    np.testing.assert_allclose(ctx.state.tensors[STATE_KEY], [2.3], atol=1e-5)
    np.testing.assert_allclose(update.vectors[CONTROL], [2.3 - 0.25], atol=1e-5)
    assert update.metrics["steps"] == 2.0
    assert ctx.state.tensors[STATE_KEY].dtype == np.float32


def test_client_with_momentum_divides_by_the_momentum_normalizer() -> None:
    """ρ=0.5: buf 4.25 → w=0.575; buf 0.5·4.25 + 0.85 = 2.975 → w=0.2775. The steps
    count a = 1 + 1.5 = 2.5, so c_i⁺ = −0.25 + 0.7225/0.25 = 2.64, the momentum-weighted
    mean raw gradient (1.5·4 + 1·0.6)/2.5."""
    ctx = context(w=1.0, c=0.5, c_i=0.25, lr=0.1, momentum=0.5, steps=2)
    update = ScaffoldClient().fit(ctx)
    np.testing.assert_allclose(update.vectors[DELTA], [0.2775 - 1.0], atol=1e-6)
    np.testing.assert_allclose(ctx.state.tensors[STATE_KEY], [2.64], atol=1e-5)
    np.testing.assert_allclose(update.vectors[CONTROL], [2.64 - 0.25], atol=1e-5)


def test_client_without_state_starts_from_zero_control() -> None:
    """No stored c_i means c_i = 0: c=0.5 gives gradients 4.5 → w=0.55, 0.9 → w=0.46, and
    c_i⁺ = 0 − 0.5 + 0.54/0.2 = 2.2 (the mean raw gradient (4 + 0.4)/2 again)."""
    absent = context(w=1.0, c=0.5, c_i=None, lr=0.1, momentum=0.0, steps=2)
    update = ScaffoldClient().fit(absent)
    np.testing.assert_allclose(update.vectors[DELTA], [0.46 - 1.0], atol=1e-6)
    np.testing.assert_allclose(absent.state.tensors[STATE_KEY], [2.2], atol=1e-5)
    np.testing.assert_allclose(update.vectors[CONTROL], [2.2], atol=1e-5)


def test_server_control_update_by_hand() -> None:
    server = ScaffoldServer(dimension=2, num_clients=10)
    assert server.upload_sizes(2) == {DELTA: 2, CONTROL: 2}
    w = np.array([1.0, 2.0], np.float32)
    sent = server.broadcast(w)
    assert set(sent) == {GLOBAL, CONTROL}
    np.testing.assert_array_equal(sent[CONTROL], [0.0, 0.0])
    contributors = [fit_result(i, 1, {}) for i in range(4)]
    aggregate = np.array([0.5, -0.5], np.float32)
    update, fields = server.combine(
        rnd=1,
        aggregate=aggregate,
        extras={CONTROL: np.array([1.0, -2.0], np.float32)},
        contributors=contributors,
    )
    np.testing.assert_array_equal(update, aggregate)  # η_g is the server optimizer's
    np.testing.assert_allclose(server.control, [0.4, -0.8], atol=1e-7)  # c + 4/10 · mean
    server.combine(
        rnd=2,
        aggregate=aggregate,
        extras={CONTROL: np.array([-1.0, 1.0], np.float32)},
        contributors=contributors[:2],
    )
    np.testing.assert_allclose(server.control, [0.2, -0.6], atol=1e-7)  # + 2/10 · mean
    assert fields["scaffold_control_norm"] == pytest.approx(np.hypot(0.4, 0.8), abs=1e-6)
    restored = ScaffoldServer(dimension=2, num_clients=10)
    restored.load_state(server.state())
    np.testing.assert_array_equal(restored.broadcast(w)[CONTROL], server.control)


def fit_result(client_id: int, n: int, vectors: dict[str, Any]) -> FitResult:
    return FitResult(client_id=client_id, round=1, model_version=0, num_examples=n, vectors=vectors)


def test_strategy_combines_weighted_deltas_and_plain_mean_of_controls() -> None:
    """Through the composed strategy: x ← x + weighted mean Δy (lr 1), and c moves by
    |S|/N times the *unweighted* mean of Δc_i."""
    cfg = load_config(None, ["strategy=scaffold"])
    spec = one_weight_learner().binding.spec
    strategy = build_strategy(cfg, num_clients=10, spec=spec, roles_in_process=True)
    rows = [(1, 1.0, 3.0), (3, -1.0, 1.0)]  # (examples, Δy, Δc)
    outcomes = [
        fit_result(i, n, {DELTA: np.array([d], np.float32), CONTROL: np.array([dc], np.float32)})
        for i, (n, d, dc) in enumerate(rows)
    ]
    w = np.array([1.0], np.float32)

    def no_exchange(*args: Any) -> Any:
        raise AssertionError("no secure aggregation in this run")

    out = strategy.process_fit(1, outcomes, w, no_exchange)
    np.testing.assert_allclose(out.weights, [1.0 + (1 * 1.0 + 3 * -1.0) / 4], atol=1e-7)
    tensors, _ = strategy.state()
    np.testing.assert_allclose(tensors["algo/control"], [2 / 10 * (3.0 + 1.0) / 2], atol=1e-7)
    assert strategy.configure_fit(2, out.weights)[1][CONTROL][0] == pytest.approx(0.4)


SMALL = [
    "strategy=scaffold",
    "data.num_clients=6",
    "client.epochs=1",
    "client.momentum=0",
    "client.lr=0.05",
    "server.fraction_fit=0.5",
]


def test_inprocess_and_pool_engines_agree(tmp_path: Path) -> None:
    base = [*SMALL, "rounds=3"]
    run_simulation(load_config(None, base), tmp_path / "inprocess")
    run_simulation(
        load_config(None, [*base, "engine.name=pool", "engine.workers=2"]), tmp_path / "pool"
    )
    a, b = latest_checkpoint(tmp_path / "inprocess"), latest_checkpoint(tmp_path / "pool")
    np.testing.assert_allclose(a.tensors["global"], b.tensors["global"], atol=1e-6)
    np.testing.assert_allclose(a.tensors["algo/control"], b.tensors["algo/control"], atol=1e-6)
    assert np.any(a.tensors["algo/control"] != 0)


@pytest.mark.parametrize("checkpoint_every", [1, 2])
def test_resume_is_bit_exact(tmp_path: Path, checkpoint_every: int) -> None:
    """Cut after round 3 (with checkpoint_every=2 the resume redoes round 3 from the
    round-2 checkpoint, so client state written in round 3 must be ignored)."""
    overrides = [*SMALL, "rounds=5", f"checkpoint_every={checkpoint_every}"]
    run_simulation(load_config(None, overrides), tmp_path / "whole")
    interrupt_after(load_config(None, overrides), tmp_path / "cut", 3)
    summary = run_simulation(load_config(None), tmp_path / "cut", resume=True)
    assert [r["round"] for r in summary["history"]] == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(
        final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole")
    )
    np.testing.assert_array_equal(
        latest_checkpoint(tmp_path / "cut").tensors["algo/control"],
        latest_checkpoint(tmp_path / "whole").tensors["algo/control"],
    )
