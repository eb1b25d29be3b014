"""Split learning (Vepakomma et al. 2018): a step's gradients are the centralized
model's on the concatenated columns, and the batch schedule covers every row."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fedloom.config import VerticalConfig, VerticalOptimizerConfig
from fedloom.vertical.runner import JointModel, build_models
from fedloom.vertical.split import BatchSchedule, FeatureParty, LabelParty, SplitTrainer

SGD = VerticalOptimizerConfig(name="sgd", lr=0.1)


def _setup() -> tuple[list[np.ndarray], np.ndarray, list[nn.Sequential], nn.Sequential]:
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(12, 3)).astype(np.float32), rng.normal(size=(12, 5)).astype(np.float32)]
    y = rng.integers(0, 3, size=12)
    v = VerticalConfig(bottom_hidden=[4], embedding_dim=3, top_hidden=[6])
    bottoms, top = build_models(v, [3, 5], 3, seed=1, top_parties=2)
    return xs, y, bottoms, top


def test_split_step_gradients_equal_the_centralized_models() -> None:
    xs, y, bottoms, top = _setup()
    joint = JointModel(copy.deepcopy(bottoms), copy.deepcopy(top), [3, 5])
    rows = np.array([0, 3, 4, 7, 9])

    label = LabelParty(y, top, SGD)
    features = [FeatureParty(x, b, SGD) for x, b in zip(xs, bottoms, strict=True)]
    grads, loss = label.step(rows, [f.forward(rows) for f in features])
    for f, g in zip(features, grads, strict=True):
        f.backward(g)

    x_all = torch.as_tensor(np.concatenate(xs, axis=1)[rows])
    central_loss = nn.functional.cross_entropy(joint(x_all), torch.as_tensor(y[rows]))
    central_loss.backward()
    assert loss == central_loss.item()
    split_params = [*bottoms[0].parameters(), *bottoms[1].parameters(), *top.parameters()]
    central_params = [*joint.bottoms.parameters(), *joint.top.parameters()]
    assert len(split_params) == len(central_params) == 12
    for s, c in zip(split_params, central_params, strict=True):
        assert s.grad is not None and c.grad is not None
        torch.testing.assert_close(s.grad, c.grad, rtol=1e-6, atol=1e-7)
        # and the SGD step the parties took is the centralized one
        torch.testing.assert_close(s.detach(), (c - 0.1 * c.grad).detach(), rtol=1e-6, atol=1e-7)


def test_gradient_sent_down_by_hand_for_a_linear_top() -> None:
    # Top = one linear layer W (2 classes × 2 inputs, no bias): ∂L/∂h = (softmax(Wh) − e_y) W / B.
    top = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        top[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
    label = LabelParty(np.array([1, 0]), top, SGD)  # its step does not change the gradient
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    (g,), _ = label.step(np.array([0, 1]), [h])
    w = np.array([[1.0, -1.0], [0.5, 2.0]])
    z = h.numpy() @ w.T  # logits [[1, 0.5], [-1, 2]]
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    expected = (p - np.eye(2)[[1, 0]]) @ w / 2
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-6)


def test_schedule_covers_each_row_once_per_epoch_and_streams_steps() -> None:
    s = BatchSchedule(10, batch_size=4, shuffle=True, seed=0)
    epoch = s.round(None)
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(10))
    t = BatchSchedule(10, batch_size=4, shuffle=False, seed=0)
    steps = t.round(4)  # 3 batches of epoch 1, then the first of epoch 2
    assert [b.tolist() for b in steps] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


def test_trainer_round_counts_bytes_and_measures_leakage_on_binary_labels() -> None:
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(40, 2)).astype(np.float32), rng.normal(size=(40, 3)).astype(np.float32)]
    y = (xs[0][:, 0] + xs[1][:, 0] > 0).astype(np.int64)
    v = VerticalConfig(bottom_hidden=[4], embedding_dim=3, top_hidden=[4])
    bottoms, top = build_models(v, [2, 3], 2, seed=0, top_parties=2)
    trainer = SplitTrainer(
        LabelParty(y, top, SGD),
        [FeatureParty(x, b, SGD) for x, b in zip(xs, bottoms, strict=True)],
        train_rows=np.arange(30),
        test_rows=np.arange(30, 40),
        schedule=BatchSchedule(30, batch_size=8, shuffle=True, seed=0),
        steps_per_round=None,
    )
    out = trainer.run_round()
    assert out["steps"] == 4
    assert out["bytes_up"] == 2 * 30 * 3 * 4  # two parties' activations, float32
    assert out["bytes_down"] == 2 * 30 * 3 * 4 + 2 * 30 * 4  # gradients + row indices
    assert 0.0 <= out["leak_norm_auc"] <= 1.0 and 0.0 <= out["leak_cosine_auc"] <= 1.0
    assert set(trainer.evaluate()) == {"loss", "accuracy"}
