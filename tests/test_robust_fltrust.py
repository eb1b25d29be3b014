"""FLTrust (Cao et al. 2021): trust scores and rescaling worked out by hand, the server's
own update from its root data, the bound ‖g‖ ≤ ‖g_0‖ under arbitrary attackers, the root
data set's seam (reserved from the server's examples, out of evaluation), and digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.base import StageContext
from fedloom.client.learner import Learner, SGDSettings, WorkPlan, WorkSettings
from fedloom.config import ConfigError, load_config
from fedloom.data.base import ArrayDataset
from fedloom.data.server import ServerData
from fedloom.engine.simulation import run_simulation
from fedloom.registry import AGGREGATORS
from fedloom.seeding import SERVER_TRAIN, torch_generator
from fedloom.server.aggregators import AggregationInput
from fedloom.server.robust_fltrust import FLTrust, fltrust_combine
from fedloom.strategies import build_learner

from .helpers import final_weights, interrupt_after, toy_dataset


def test_trust_scores_and_rescaling_by_hand() -> None:
    # Server update g0 = (3, 4), ‖g0‖ = 5.
    #   g1 = (6, 8):    cos = 1,                   TS = 1,   rescaled by 5/10 → (3, 4)
    #   g2 = (0, 2):    cos = 8 / (2·5) = 0.8,     TS = 0.8, rescaled by 5/2  → (0, 5)
    #   g3 = (-30,-40): cos = -1,                  TS = 0
    #   g4 = (4, -3):   cos = (12 - 12)/25 = 0,    TS = 0
    # g = (1·(3, 4) + 0.8·(0, 5)) / 1.8 = (3, 8) / 1.8.
    rows = np.array([[6, 8], [0, 2], [-30, -40], [4, -3]], dtype=np.float64)
    out, trust, scale = fltrust_combine(rows, np.array([3.0, 4.0]))
    assert trust == pytest.approx([1.0, 0.8, 0.0, 0.0])
    assert scale == pytest.approx([0.5, 2.5, 5 / 50, 1.0])
    assert out == pytest.approx([3 / 1.8, 8 / 1.8])
    assert np.linalg.norm(out) <= 5.0


def test_no_trusted_update_and_zero_updates_give_zero() -> None:
    out, trust, _ = fltrust_combine(np.array([[-1.0, 0.0], [0.0, 0.0]]), np.array([1.0, 0.0]))
    assert out.tolist() == [0.0, 0.0] and trust.tolist() == [0.0, 0.0]
    out, trust, _ = fltrust_combine(np.array([[1.0, 0.0]]), np.zeros(2))
    assert out.tolist() == [0.0, 0.0] and trust.tolist() == [0.0]


def test_output_norm_never_exceeds_the_server_update_whatever_f_attackers_send() -> None:
    # Every rescaled update has norm ‖g0‖ and the trust scores are convex weights, so
    # ‖g‖ ≤ ‖g0‖ (Cao et al. 2021, Eq. 4), and ⟨g, g0⟩ ≥ 0: no trusted update points away.
    for trial in range(60):
        rng = np.random.default_rng(300 + trial)
        d, k = int(rng.integers(2, 50)), int(rng.integers(2, 25))
        f = int(rng.integers(1, k))
        g0 = rng.normal(size=d) * rng.uniform(0.01, 3.0)
        honest = g0 + rng.normal(size=(k - f, d)) * rng.uniform(0.0, 2.0)
        bad = rng.choice([-1e6, 1e6], size=(f, d)) * rng.uniform(0.0, 1.0, size=(f, 1))
        rows = np.vstack([honest, bad])[rng.permutation(k)]
        out, trust, _ = fltrust_combine(rows, g0)
        assert np.linalg.norm(out) <= np.linalg.norm(g0) * (1 + 1e-9), trial
        assert out @ g0 >= -1e-9, trial
        assert np.all((trust >= 0) & (trust <= 1 + 1e-12)), trial


def _toy_learner() -> Learner:
    from fedloom.config import RunConfig

    return build_learner(RunConfig(model={"name": "logreg"}), toy_dataset())


def test_the_server_update_is_local_training_on_the_root_data_from_the_global_model() -> None:
    data = toy_dataset()
    root = data.clients[0].train.subset(np.arange(12))
    work = WorkSettings(epochs=2, batch_size=5)
    sgd = SGDSettings(lr=0.3, momentum=0.5)
    agg = FLTrust(root=root, learner_factory=_toy_learner, work=work, sgd=sgd, seed=4)
    start = _toy_learner().initial_vector() + 0.1
    # The same training by hand: 2 epochs of batches of 5 with the server's shuffles.
    by_hand = _toy_learner().train(
        start=start,
        data=root,
        plan=WorkPlan(2, None, straggler=False),
        batch_size=5,
        sgd=sgd,
        generator=torch_generator(4, SERVER_TRAIN, 7),
    )
    g0 = by_hand.weights.astype(np.float64) - start
    assert np.linalg.norm(g0) > 0
    assert agg.server_update(7, start) == pytest.approx(g0, abs=1e-6)
    # Clients: one along g0 at twice its length, one against it, one along at half length.
    rows = np.stack([2 * g0, -g0, 0.5 * g0]).astype(np.float32)
    inp = AggregationInput(
        round=7,
        dimension=len(start),
        updates=rows,
        weights=np.array([1.0, 1000.0, 1.0]),  # example counts are ignored
        count=3,
        client_ids=[4, 9, 12],
        global_weights=start,
    )
    out, fields = agg.aggregate(inp)
    assert out == pytest.approx(g0, abs=1e-5)  # both trusted updates rescaled to g0
    assert fields["excluded_clients"] == [9]
    assert fields["trust_scores"] == {"4": 1.0, "9": 0.0, "12": 1.0}
    assert fields["fltrust_server_norm"] == pytest.approx(np.linalg.norm(g0), rel=1e-5)


def test_the_root_data_set_is_reserved_from_the_servers_examples_and_left_out_of_evaluation() -> (
    None
):
    x = np.arange(50, dtype=np.float32).reshape(50, 1)
    examples = ArrayDataset(x, np.arange(50))
    server = ServerData(examples, seed=3)
    context = StageContext(
        num_clients=4,
        spec=_toy_learner().binding.spec,
        seed=3,
        server_data=server,
        learner_factory=_toy_learner,
    )
    agg = AGGREGATORS.create("fltrust", {"root_size": 10}, context)
    left = server.evaluation_set()
    assert len(agg.root) == 10 and len(left) == 40 and server.reserved == 10
    assert set(agg.root.y.tolist()).isdisjoint(left.y.tolist())
    # Seeded: the same run reserves the same examples (a resume), another seed others.
    again = ServerData(examples, seed=3).reserve(10, who="root_size")
    assert again.y.tolist() == agg.root.y.tolist()
    assert ServerData(examples, seed=4).reserve(10, who="root_size").y.tolist() != again.y.tolist()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"root_size": 0}, "server.aggregator_options.root_size must be an integer >= 1"),
        ({"f": 1}, "server.aggregator_options.f: unknown option for aggregator 'fltrust'"),
        ({"root_size": 50}, "server.aggregator_options.root_size = 50: the server holds 50"),
    ],
)
def test_bad_options_are_one_line(options: dict[str, Any], fragment: str) -> None:
    examples = ArrayDataset(np.zeros((50, 1), np.float32), np.zeros(50, np.int64))
    context = StageContext(
        num_clients=4,
        spec=_toy_learner().binding.spec,
        seed=0,
        server_data=ServerData(examples, seed=0),
        learner_factory=_toy_learner,
    )
    with pytest.raises(ConfigError) as info:
        AGGREGATORS.create("fltrust", options, context)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_without_server_data_fltrust_is_refused_in_one_line() -> None:
    context = StageContext(num_clients=4, spec=_toy_learner().binding.spec, seed=0)
    with pytest.raises(ConfigError, match="root data set") as info:
        AGGREGATORS.create("fltrust", {}, context)
    assert "\n" not in str(info.value)


def test_fltrust_on_digits(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        ["rounds=3", "data.partition=iid", "server.aggregator=fltrust", "client.epochs=2"],
    )
    summary = run_simulation(cfg, tmp_path / "run")
    for record in summary["history"]:
        assert set(record["trust_scores"]) == {str(c) for c in range(20)}
        assert record["fltrust_server_norm"] > 0
        # IID honest clients all point roughly where the server's own update does.
        assert record["excluded_clients"] == []
    assert summary["final"]["accuracy"] > 0.5


def test_fltrust_resumes_to_the_same_model(tmp_path: Path) -> None:
    """The root set is a seeded reservation and the server's shuffles are seeded by round,
    so a resumed run reserves the same examples and computes the same g_0."""
    overrides = ["rounds=3", "server.aggregator=fltrust", "client.epochs=1"]
    whole = run_simulation(load_config(None, overrides), tmp_path / "whole")
    interrupt_after(load_config(None, overrides), tmp_path / "cut", 2)
    resumed = run_simulation(load_config(None), tmp_path / "cut", resume=True)
    assert resumed["history"][-1]["trust_scores"] == whole["history"][-1]["trust_scores"]
    assert np.array_equal(final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole"))
