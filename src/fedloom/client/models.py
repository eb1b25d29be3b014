"""The built-in client models, chosen by ``[model] name`` in the run config.

The initial weights are drawn from a generator derived from the run seed, so the
server and every worker build the identical starting model without exchanging it.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from fedloom.config import ModelConfig
from fedloom.data.base import FederatedDataset
from fedloom.seeding import MODEL_INIT, derive_seed


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs (``hidden=[]`` is logistic regression)."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MnistCNN(nn.Module):
    """The CNN of McMahan et al. 2017 (Sec. 3): two 5x5 conv layers (32, 64), 512 FC units."""

    def __init__(self, in_channels: int, side: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(64 * (side // 4) ** 2, 512), nn.ReLU(), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CharLSTM(nn.Module):
    """Next-character model of McMahan et al. 2017 (Shakespeare): embedding, 2-layer LSTM."""

    def __init__(self, vocab_size: int, embedding_dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x.long()))
        return self.head(out[:, -1, :])


#: Model construction seeds torch's process-wide generator (layers draw their initial
#: weights from it); two threads building at once would reset each other's draws, so
#: clients run as threads of one process (deployment tests, a site's several clients)
#: got initial weights that depended on timing. One build at a time.
_BUILD_LOCK = threading.Lock()


def build_model(cfg: ModelConfig, data: FederatedDataset, seed: int) -> nn.Module:
    """Construct the configured model with deterministic initial weights."""
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, MODEL_INIT))
        return _construct(cfg, data)


def _construct(cfg: ModelConfig, data: FederatedDataset) -> nn.Module:
    in_features = int(np.prod(data.input_shape))
    if cfg.name == "logreg":
        return MLP(in_features, [], data.num_classes)
    if cfg.name == "mlp":
        return MLP(in_features, list(cfg.hidden), data.num_classes)
    if cfg.name == "cnn":
        if len(data.input_shape) != 3:
            raise ValueError(
                f"model 'cnn' needs image data (C, H, W); data '{data.name}' has shape "
                f"{data.input_shape}; choose model.name = 'mlp'"
            )
        return MnistCNN(data.input_shape[0], data.input_shape[1], data.num_classes)
    if data.kind != "sequence":
        raise ValueError(
            f"model 'char_lstm' needs sequence data; data '{data.name}' is {data.kind}; "
            "choose model.name = 'mlp'"
        )
    return CharLSTM(data.num_classes, cfg.embedding_dim, cfg.lstm_hidden, cfg.lstm_layers)
