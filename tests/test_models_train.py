"""The built-in CNN (``model.name = "cnn"``) learns: trained with plain PyTorch on digits.

Trained directly (SGD with momentum, full passes over the pooled training set), not
through fedloom's round loop, so the test says whether the model itself can learn; the
last test trains it through the federated round loop on the real MNIST test set.
Measured on the embedded digits (1438 train / 359 test images): 0.986 held-out accuracy
after 5 epochs, about 2 s on one thread; over ten seeds of split, initialization and
batch order the lowest was 0.953 (the untrained model is near chance, about 0.1).
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedloom.client.models import MnistCNN, build_model
from fedloom.config import DataConfig, ModelConfig, load_config
from fedloom.data.base import FederatedDataset
from fedloom.data.digits import NUM_CLASSES, build_digits
from fedloom.engine.simulation import run_simulation

SIDE = 8  # digits are 8x8 images, flattened to 64 features by the data set builder
SEED = 0


def _digits() -> FederatedDataset:
    return build_digits(DataConfig(partition="iid", num_clients=5), np.random.default_rng(SEED))


def _as_images(data: FederatedDataset) -> FederatedDataset:
    """The digits data set described as (1, 8, 8) images, which ``cnn`` requires."""
    return dataclasses.replace(data, kind="image", input_shape=(1, SIDE, SIDE))


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(x).reshape(-1, 1, SIDE, SIDE), torch.from_numpy(y)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def test_build_model_cnn_on_digits_gives_logits() -> None:
    data = _digits()
    # The builder describes digits as 64 tabular features; ``cnn`` asks for image shape.
    with pytest.raises(ValueError, match="needs image data"):
        build_model(ModelConfig(name="cnn"), data, SEED)
    model = build_model(ModelConfig(name="cnn"), _as_images(data), SEED)
    assert isinstance(model, MnistCNN)
    x, _ = _tensors(data.test.x[:7], data.test.y[:7])
    logits = model(x)
    assert logits.shape == (7, NUM_CLASSES)
    assert torch.isfinite(logits).all()


def test_cnn_learns_digits() -> None:
    data = _digits()
    train = data.pooled_train()
    x, y = _tensors(train.x, train.y)
    x_test, y_test = _tensors(data.test.x, data.test.y)

    torch.manual_seed(SEED)
    model = build_model(ModelConfig(name="cnn"), _as_images(data), SEED)
    assert _accuracy(model, x_test, y_test) < 0.3  # untrained: near chance

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(SEED)
    for _epoch in range(5):
        model.train()
        for batch in torch.randperm(len(y), generator=order).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    assert _accuracy(model, x_test, y_test) > 0.93


MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.mark.skipif(
    not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="the real MNIST test set (../shared/data/mnist) is not beside the project",
)
def test_cnn_trains_through_the_federated_round_loop_on_real_mnist(tmp_path: Path) -> None:
    """The built-in CNN as fedloom trains it: flat-buffer learner, four IID clients, FedAvg."""
    cfg = load_config(
        None,
        [
            "data.name='mnist'",
            f"data.path='{MNIST_DIR}'",
            "model.name='cnn'",
            "data.num_clients=4",
            "data.partition='iid'",
            "rounds=2",
            "client.steps=20",
            "client.batch_size=32",
            "client.lr=0.05",
            "eval.max_examples=1000",
        ],
    )
    summary = run_simulation(cfg, tmp_path / "run")
    accuracy = [r["accuracy"] for r in summary["history"]]
    assert accuracy[-1] > 0.75 and accuracy[-1] > accuracy[0]
