"""Pretrain the configured model centrally on a source data set and save its state dict:
the file ``model.pretrained`` starts a federated transfer-learning run from.

The model is built exactly as the run builds it (``[model]`` settings, the target data
set's input shape and classes, the seed), so the file fits by construction; training
is the Learner's own flat SGD with its own settings (not the ``[client]`` section's,
which are the federated fine-tuning's), shuffled from the run seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedloom.client.learner import Learner, SGDSettings, WorkPlan
from fedloom.client.models import build_model
from fedloom.config import ConfigError, RunConfig
from fedloom.data.base import ArrayDataset, FederatedDataset
from fedloom.seeding import SHUFFLE, derive_seed

#: ``fedloom pretrain``'s defaults: the recipe behind the README's transfer table.
DEFAULT_EPOCHS = 5
DEFAULT_SGD = SGDSettings(lr=0.1, momentum=0.9)
DEFAULT_BATCH_SIZE = 16


def pretrain_model(
    cfg: RunConfig,
    target: FederatedDataset,
    source: ArrayDataset,
    *,
    epochs: int,
    sgd: SGDSettings,
    batch_size: int,
) -> nn.Module:
    """The configured model after ``epochs`` passes of SGD over ``source``."""
    if tuple(source.x.shape[1:]) != tuple(target.input_shape):
        raise ConfigError(
            f"the source examples have shape {tuple(source.x.shape[1:])} but data "
            f"'{target.name}' has {tuple(target.input_shape)}; pretrain on matching inputs"
        )
    model = build_model(cfg.model, target, cfg.seed)
    learner = Learner(model)
    outcome = learner.train(
        start=learner.initial_vector(),
        data=source,
        plan=WorkPlan(epochs=epochs, max_steps=None, straggler=False),
        batch_size=batch_size,
        sgd=sgd,
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, SHUFFLE, 0)),
    )
    learner.binding.load(outcome.weights)
    return learner.model


def save_state(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s state dict as safetensors (``.safetensors``) or a ``.pt`` file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(p))
    else:
        torch.save(state, p)
    return p
