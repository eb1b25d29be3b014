"""Personalization (FedPer, FedRep, Ditto): the shared/personal split, the server half that
moves only shared coordinates, Ditto's regularized personal step and FedRep's freezing,
checked by hand; then whole runs on every engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.nn.functional as F
from torch import nn

from fedloom.algorithms.base import AlgorithmSettings, ClientContext, StageContext
from fedloom.algorithms.personal import (
    DITTO_STATE,
    HEAD_STATE,
    Ditto,
    FedRep,
    make_personal_server,
)
from fedloom.client.learner import Learner, SGDSettings, TrainOutcome, WorkPlan, WorkSettings
from fedloom.client_store import ClientState
from fedloom.config import ConfigError, PersonalizationConfig, RunConfig, load_config
from fedloom.data import build_federated_dataset
from fedloom.data.base import ArrayDataset, ClientData
from fedloom.engine.simulation import run_simulation
from fedloom.messages import DELTA, GLOBAL
from fedloom.params import ParamEntry, ParamSpec
from fedloom.strategies import build_learner
from tests.helpers import final_weights, toy_dataset

# net.0: 2x3 + 2 = 8 values, net.2: 2x2 + 2 = 6 values (the last layer).
SPEC = ParamSpec(
    (
        ParamEntry("net.0.weight", (2, 3)),
        ParamEntry("net.0.bias", (2,)),
        ParamEntry("net.2.weight", (2, 2)),
        ParamEntry("net.2.bias", (2,)),
    )
)


def test_mask_defaults_to_the_last_layer() -> None:
    assert SPEC.personal_mask([]).tolist() == [False] * 8 + [True] * 6


def test_mask_selects_by_module_prefix_and_by_name() -> None:
    assert SPEC.personal_mask(["net.0"]).tolist() == [True] * 8 + [False] * 6
    assert SPEC.personal_mask(["net.2.bias"]).tolist() == [False] * 12 + [True] * 2
    assert SPEC.personal_mask(["net.0.bias", "net.2."]).tolist() == (
        [False] * 6 + [True] * 2 + [True] * 6
    )


def test_mask_prefix_is_a_whole_module_name() -> None:
    spec = ParamSpec((ParamEntry("net.2.weight", (1,)), ParamEntry("net.20.weight", (3,))))
    assert spec.personal_mask(["net.2"]).tolist() == [True, False, False, False]
    # The default is the last parameter's module, net.20, not everything under "net.2".
    assert spec.personal_mask([]).tolist() == [False, True, True, True]


def test_mask_refuses_a_prefix_that_matches_nothing() -> None:
    with pytest.raises(ValueError, match=r"'net\.5' matches no parameter"):
        SPEC.personal_mask(["net.0", "net.5"])
    with pytest.raises(ValueError, match="empty"):
        SPEC.personal_mask([""])


def test_personal_server_moves_only_shared_coordinates() -> None:
    settings = AlgorithmSettings(personal=PersonalizationConfig(layers=["net.0.bias"]))
    server = make_personal_server(settings, StageContext(num_clients=2, spec=SPEC, seed=0))
    weights = np.arange(14, dtype=np.float32)
    shared = [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    assert server.broadcast(weights)[GLOBAL].tolist() == shared
    assert server.upload_sizes(14) == {DELTA: 12}
    aggregate = np.arange(1, 13, dtype=np.float32)
    pseudo, fields = server.combine(rnd=1, aggregate=aggregate, extras={}, contributors=[])
    assert pseudo.tolist() == [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12]
    assert fields == {}
    assert server.global_for_evaluation(weights) is weights


def test_split_that_federates_nothing_or_names_no_layer_is_refused() -> None:
    one_layer = ParamSpec((ParamEntry("net.1.weight", (3, 2)), ParamEntry("net.1.bias", (3,))))
    context = StageContext(num_clients=2, spec=one_layer, seed=0)
    with pytest.raises(ConfigError, match="nothing is federated"):
        make_personal_server(AlgorithmSettings(personal=PersonalizationConfig()), context)
    typo = AlgorithmSettings(personal=PersonalizationConfig(layers=["net.9"]))
    with pytest.raises(ConfigError, match=r"personal\.layers: .*'net\.9'"):
        make_personal_server(typo, context)


def _one_weight_context(
    *, v: float | None, w: float, state: ClientState, learner: Learner
) -> ClientContext:
    """One example (x=3, y=1) of a model y = v·x with squared loss; client lr 0.01."""
    data = ArrayDataset(np.array([[3.0]], np.float32), np.array([[1.0]], np.float32))
    if v is not None:
        state.tensors[DITTO_STATE] = np.array([v], np.float32)
    return ClientContext(
        client_id=0,
        round=1,
        config={},
        broadcast={GLOBAL: np.array([w], np.float32)},
        data=ClientData(0, "c0", data, data),
        learner=learner,
        state=state,
        seed=0,
        work=WorkSettings(epochs=1, batch_size=1),
        sgd=SGDSettings(lr=0.01, momentum=0.0),
        plan=WorkPlan(1, None, straggler=False),
    )


def test_ditto_personal_step_is_the_regularized_gradient_step() -> None:
    learner = Learner(nn.Linear(1, 1, bias=False), loss=F.mse_loss, metrics={})
    ditto = Ditto(settings=PersonalizationConfig(lam=0.5, personal_epochs=1, personal_lr=0.1))
    state = ClientState()
    update = ditto.fit(_one_weight_context(v=0.5, w=2.0, state=state, learner=learner))
    # Global model, FedAvg's step at lr 0.01: ∇F(2) = 2·3·(2·3 − 1) = 30, w = 2 − 0.3.
    assert update.vectors[DELTA] == pytest.approx([-0.3], abs=1e-6)
    # Personal model at lr 0.1: ∇F(0.5) + λ(v − w) = 2·3·(1.5 − 1) + 0.5·(0.5 − 2) = 2.25.
    assert state.tensors[DITTO_STATE] == pytest.approx([0.5 - 0.1 * 2.25], abs=1e-6)


def test_ditto_personal_model_starts_at_the_global_model() -> None:
    learner = Learner(nn.Linear(1, 1, bias=False), loss=F.mse_loss, metrics={})
    ditto = Ditto(settings=PersonalizationConfig(lam=0.5, personal_epochs=1, personal_lr=0.1))
    state = ClientState()
    ditto.fit(_one_weight_context(v=None, w=2.0, state=state, learner=learner))
    # v = w: the pull λ(v − w) is zero, so v = 2 − 0.1·30.
    assert state.tensors[DITTO_STATE] == pytest.approx([-1.0], abs=1e-6)


class _Recording:
    """Wraps a learner's ``train`` to keep every call's start and outcome."""

    def __init__(self, learner: Learner) -> None:
        self.calls: list[tuple[np.ndarray, TrainOutcome]] = []
        self.train = learner.train

    def __call__(self, **kwargs: Any) -> TrainOutcome:
        out = self.train(**kwargs)
        self.calls.append((np.array(kwargs["start"], copy=True), out))
        return out


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = toy_dataset(n=32, clients=1)
    cfg = load_config(None, ["model.hidden=[4]"])
    learner = build_learner(cfg, data)
    spec = learner.binding.spec
    mask = spec.personal_mask([])
    recording = _Recording(learner)
    monkeypatch.setattr(learner, "train", recording)
    fedrep = FedRep(personal=mask, settings=PersonalizationConfig(personal_epochs=2))
    w = learner.initial_vector()
    state = ClientState()
    # Weight decay and momentum would move a frozen coordinate unless its gradient is zeroed.
    ctx = ClientContext(
        client_id=0,
        round=1,
        config={},
        broadcast={GLOBAL: w[~mask]},
        data=data.clients[0],
        learner=learner,
        state=state,
        seed=0,
        work=WorkSettings(epochs=1, batch_size=8),
        sgd=SGDSettings(lr=0.1, momentum=0.9, weight_decay=0.01),
        plan=WorkPlan(1, None, straggler=False),
    )
    update = fedrep.fit(ctx)
    (head_start, head), (body_start, body) = recording.calls
    assert head.steps == 8 and body.steps == 4  # 2 head epochs, then the plan's 1 epoch
    np.testing.assert_array_equal(head_start, w)
    np.testing.assert_array_equal(head.weights[~mask], w[~mask])  # body unchanged
    assert not np.array_equal(head.weights[mask], w[mask])
    np.testing.assert_array_equal(body_start, head.weights)
    np.testing.assert_array_equal(body.weights[mask], head.weights[mask])  # head unchanged
    assert not np.array_equal(body.weights[~mask], w[~mask])
    np.testing.assert_array_equal(update.vectors[DELTA], body.weights[~mask] - w[~mask])
    np.testing.assert_array_equal(state.tensors[HEAD_STATE], head.weights[mask])


def _config(strategy: str, *extra: str) -> RunConfig:
    return load_config(
        None,
        [
            f"strategy={strategy}",
            "rounds=3",
            "data.num_clients=6",
            "data.partition=shards",
            "client.epochs=1",
            "model.hidden=[16]",
            "personal.personal_epochs=1",
            *extra,
        ],
    )


@pytest.mark.parametrize("strategy", ["fedper", "fedrep", "ditto"])
def test_runs_report_personalized_accuracy_every_round(strategy: str, tmp_path: Path) -> None:
    summary = run_simulation(_config(strategy), tmp_path / "run")
    assert len(summary["history"]) == 3
    for record in summary["history"]:
        assert 0.0 <= record["personalized_accuracy"] <= 1.0
        assert "fed_accuracy" in record and "personalized_loss" in record
    assert (
        summary["final"]["personalized_accuracy"] == summary["history"][-1]["personalized_accuracy"]
    )


def test_pool_engine_trains_the_same_personal_models(tmp_path: Path) -> None:
    local = run_simulation(_config("fedrep"), tmp_path / "inprocess")
    pool = run_simulation(
        _config("fedrep", "engine.name=pool", "engine.workers=2"), tmp_path / "pool"
    )
    np.testing.assert_array_equal(
        final_weights(tmp_path / "pool"), final_weights(tmp_path / "inprocess")
    )
    assert pool["final"] == local["final"]


def test_fedper_uploads_and_downloads_only_the_shared_part(tmp_path: Path) -> None:
    cfg = _config("fedper")
    spec = build_learner(cfg, build_federated_dataset(cfg.data, cfg.seed)).binding.spec
    shared = int((~spec.personal_mask([])).sum())
    assert 0 < shared < spec.size
    summary = run_simulation(cfg, tmp_path / "run")
    for record in summary["history"]:
        assert record["bytes_up"] == 6 * shared * 4  # six clients, float32
        assert record["bytes_down"] == 6 * shared * 4
    # The server's copy of the head never moves.
    final = final_weights(tmp_path / "run")
    initial = build_learner(cfg, build_federated_dataset(cfg.data, cfg.seed)).initial_vector()
    head = spec.personal_mask([])
    np.testing.assert_array_equal(final[head], initial[head])
    assert not np.array_equal(final[~head], initial[~head])
