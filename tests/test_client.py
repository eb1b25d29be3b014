"""The local training loop: torch.optim.SGD semantics, FedProx, stragglers, determinism."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedloom.algorithms.sgd import proximal_correction
from fedloom.client.learner import SGDSettings, WorkPlan, WorkSettings, _sgd_step, plan_work
from fedloom.client.models import build_model
from fedloom.client_store import ClientState
from fedloom.config import RunConfig, load_config
from fedloom.messages import DROP_STRAGGLERS, GLOBAL, EvalTask
from fedloom.seeding import SHUFFLE, torch_generator
from fedloom.strategies import build_learner

from .helpers import client_runtime, fit_once, toy_dataset


def _cfg(*overrides: str) -> RunConfig:
    return load_config(None, ["model.hidden=[4]", "client.batch_size=8", *overrides])


@pytest.mark.parametrize("extra", [[], ["client.weight_decay=0.01"], ["client.momentum=0.0"]])
def test_local_sgd_matches_torch_optim_sgd(extra: list[str]) -> None:
    cfg = _cfg("client.epochs=2", *extra)
    data = toy_dataset()
    runtime = client_runtime(cfg, data)
    w0 = runtime.initial_vector()
    result = fit_once(runtime, w0, client=1, round=3)

    model = build_model(cfg.model, data, cfg.seed)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.client.lr,
        momentum=cfg.client.momentum,
        weight_decay=cfg.client.weight_decay,
    )
    train = data.clients[1].train
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    gen = torch_generator(cfg.seed, SHUFFLE, 3, 1)
    for _ in range(2):
        perm = torch.randperm(len(train), generator=gen)
        for s in range(0, len(train), 8):
            idx = perm[s : s + 8]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    ref = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    assert result.delta is not None
    np.testing.assert_allclose(w0 + result.delta, ref, rtol=1e-5, atol=1e-6)
    assert result.metrics["steps"] == 10 and result.num_examples == 40


def test_fedprox_proximal_gradient_hand_computed() -> None:
    """One step with zero data gradient contribution isolated: mu*(w - w0) term."""
    sgd = SGDSettings(lr=0.5, momentum=0.0)
    w = torch.tensor([1.0, -1.0])
    w0 = torch.tensor([0.0, 0.0])
    g = torch.tensor([0.1, 0.2])
    _sgd_step(w, g, torch.zeros(2), sgd, proximal_correction(2.0, w0))
    # g' = g + mu (w - w0) = [0.1 + 2, 0.2 - 2]; w = w - 0.5 g'
    np.testing.assert_allclose(w.numpy(), [1.0 - 0.5 * 2.1, -1.0 - 0.5 * (-1.8)], rtol=1e-6)


def test_fedprox_pulls_towards_global_model() -> None:
    data = toy_dataset()
    far = _cfg("client.epochs=5", "client.lr=0.5")
    near = _cfg("client.epochs=5", "client.lr=0.5", "client.proximal_mu=5.0")
    w0 = client_runtime(far, data).initial_vector()
    d_far = fit_once(client_runtime(far, data), w0, client=0, round=1).delta
    d_near = fit_once(client_runtime(near, data), w0, client=0, round=1).delta
    assert d_far is not None and d_near is not None
    assert np.linalg.norm(d_near) < 0.5 * np.linalg.norm(d_far)


def test_fit_is_deterministic_and_order_independent() -> None:
    cfg = _cfg()
    data = toy_dataset()
    a, b = client_runtime(cfg, data), client_runtime(cfg, data)
    w0 = a.initial_vector()
    first = fit_once(a, w0, client=1, round=2).delta
    fit_once(a, w0, client=0, round=2)  # another client in between must not leak state
    again = fit_once(a, w0, client=1, round=2).delta
    other = fit_once(b, w0, client=1, round=2).delta
    assert first is not None and again is not None and other is not None
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, other)
    different_round = fit_once(b, w0, client=1, round=3).delta
    assert different_round is not None and not np.array_equal(first, different_round)


def test_straggler_plan_follows_fedprox_systems_model() -> None:
    work = WorkSettings(epochs=20, straggler_fraction=0.9)
    plans = [plan_work(work, seed=0, round=1, client_id=c, num_examples=100) for c in range(2000)]
    stragglers = [p for p in plans if p.straggler]
    assert 0.87 < len(stragglers) / len(plans) < 0.93
    epochs = np.array([p.epochs for p in stragglers])
    assert epochs.min() == 1 and epochs.max() == 19  # uniform on 1..E-1
    assert all(p.epochs == 20 for p in plans if not p.straggler)
    one_epoch = [
        plan_work(
            WorkSettings(epochs=1, batch_size=10, straggler_fraction=1.0),
            seed=0,
            round=1,
            client_id=c,
            num_examples=100,
        )
        for c in range(50)
    ]
    assert all(p.max_steps is not None and 1 <= p.max_steps < 10 for p in one_epoch)


def test_dropped_straggler_does_no_work_and_kept_one_does_less() -> None:
    data = toy_dataset()
    keep = client_runtime(_cfg("client.epochs=4", "client.straggler_fraction=1.0"), data)
    w0 = keep.initial_vector()
    res = fit_once(keep, w0, client=0, round=1, config={DROP_STRAGGLERS: True})
    assert res.straggler and res.delta is None and not res.vectors
    res = fit_once(keep, w0, client=0, round=1, config={DROP_STRAGGLERS: False})
    assert res.straggler and res.delta is not None and res.metrics["steps"] < 4 * 5


def test_evaluate_accuracy_and_loss() -> None:
    data = toy_dataset()
    learner = build_learner(_cfg(), data)
    vec = np.zeros(learner.num_parameters, np.float32)
    metrics = learner.evaluate(vec, data.test)
    loss, acc = metrics["loss"], metrics["accuracy"]
    assert loss == pytest.approx(np.log(2), rel=1e-6)  # zero weights: uniform prediction
    assert acc == pytest.approx(float(np.mean(data.test.y == 0)))
    # What engines call: the client's own test split, through its algorithm.
    runtime = client_runtime(_cfg(), data)
    task = EvalTask(client_id=1, round=1, model_version=1)
    result = runtime.evaluate(task, {GLOBAL: vec}, ClientState())
    test = data.clients[1].test
    assert test is not None and result.num_examples == len(test) == 8
    assert result.metrics["loss"] == pytest.approx(np.log(2), rel=1e-6)
    assert result.metrics["accuracy"] == pytest.approx(float(np.mean(test.y == 0)))


def test_work_plan_batches_counts_steps_and_ends_without_data() -> None:
    """``client.steps`` repeats passes and cuts the last; a client with no data stops."""
    assert list(WorkPlan(1, 5, False).batches(lambda: [1, 2, 3])) == [1, 2, 3, 1, 2]
    assert list(WorkPlan(2, None, False).batches(lambda: [1, 2])) == [1, 2, 1, 2]
    assert list(WorkPlan(1, 5, False).batches(lambda: [])) == []  # used to loop forever
