"""``fedloom pretrain``: make the file a transfer-learning run's ``model.pretrained`` names.

The configured model is trained centrally on MNIST rendered as 8x8 digits
(:mod:`fedloom.data.mnist_digits`) and saved where the config's ``model.pretrained``
points (or ``--out``); the zero-shot accuracy on the config's own test set is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from fedloom.cli.common import add_overrides_argument
from fedloom.config import ConfigError, load_config


def add_pretrain_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain the configured model on MNIST as 8x8 digits (for model.pretrained)",
    )
    p.add_argument("config", nargs="?", type=Path, help="TOML config (default: embedded digits)")
    add_overrides_argument(p, help="override a config key (repeatable)")
    p.add_argument("--mnist", type=Path, required=True, help="directory with MNIST IDX files")
    p.add_argument("--out", type=Path, help="where to write it (default: model.pretrained)")
    p.add_argument("--epochs", type=int, default=5, help="passes over MNIST (default 5)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")


def cmd_pretrain(args: argparse.Namespace, console: Console) -> int:
    import torch

    from fedloom.client.learner import Learner, SGDSettings
    from fedloom.client.pretrain import pretrain_model, save_state
    from fedloom.data import build_federated_dataset
    from fedloom.data.mnist_digits import load_mnist_as_digits

    cfg = load_config(args.config, args.overrides)
    out = args.out or (Path(cfg.model.pretrained) if cfg.model.pretrained else None)
    if out is None:
        raise ConfigError("say where to write the model: --out PATH or model.pretrained")
    if args.epochs < 1 or args.batch_size < 1:
        raise ConfigError("--epochs and --batch-size must be at least 1")
    if not (args.lr > 0 and 0 <= args.momentum < 1):
        raise ConfigError("--lr must be positive and --momentum in [0, 1)")
    if cfg.data.name != "digits":
        raise ConfigError(
            f"fedloom pretrain renders MNIST as 8x8 digits for data.name = 'digits', not "
            f"'{cfg.data.name}'; set data.name = 'digits'"
        )
    torch.set_num_threads(cfg.engine.torch_threads)
    target = build_federated_dataset(cfg.data, cfg.seed)
    source = load_mnist_as_digits(args.mnist)
    model = pretrain_model(
        cfg,
        target,
        source,
        epochs=args.epochs,
        sgd=SGDSettings(lr=args.lr, momentum=args.momentum),
        batch_size=args.batch_size,
    )
    path = save_state(model, out)
    learner = Learner(model)
    zero_shot = learner.evaluate(learner.binding.vector(), target.test)
    console.print(
        f"pretrained {cfg.model.name} on {len(source)} MNIST images as 8x8 digits for "
        f"{args.epochs} epochs; zero-shot accuracy on the digits test set "
        f"{zero_shot['accuracy']:.4f}",
        soft_wrap=True,
    )
    console.print(f"wrote {path}", soft_wrap=True)
    return 0
