"""Federated transfer learning on digits: from scratch, full fine-tuning of an
MNIST-pretrained model, a frozen body with a federated head, and LoRA adapters only.

Every run shares the config (``examples/transfer_digits_lora.toml`` by default: 20
digits clients, Dirichlet(0.5), an MLP 64-256-256-10, two local epochs, FedAvg) and seed;
they differ only in ``model.pretrained``, ``model.freeze`` and ``client.adapter``. The
pretrained file is made first if it does not exist (``fedloom pretrain``'s recipe:
the configured model trained centrally on MNIST rendered as 8x8 digits).

    .venv/bin/python benchmarks/transfer.py [--mnist /work/shared/data/mnist]
        [--config examples/transfer_digits_lora.toml] [--pretrain-epochs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedloom.client.pretrain import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_SGD,
    pretrain_model,
    save_state,
)
from fedloom.config import load_config
from fedloom.data import build_federated_dataset
from fedloom.data.mnist_digits import load_mnist_as_digits
from fedloom.engine.simulation import run_simulation
from fedloom.strategies import build_learner


def variants(pretrained: Path) -> dict[str, list[str]]:
    """Each run's overrides. LoRA keeps the config's lr (0.05): at 0.1 its adapters
    diverged (NaN from round 2); full fine-tuning is shown at both."""
    pre = f"model.pretrained='{pretrained}'"
    full = [pre, "client.adapter='none'"]
    return {
        "from scratch (full model), lr 0.1": [
            "model.pretrained=''",
            "client.adapter='none'",
            "client.lr=0.1",
        ],
        "from scratch (full model), lr 0.05": [
            "model.pretrained=''",
            "client.adapter='none'",
            "client.lr=0.05",
        ],
        "pretrained, full fine-tuning, lr 0.1": [*full, "client.lr=0.1"],
        "pretrained, full fine-tuning, lr 0.05": [*full, "client.lr=0.05"],
        "pretrained, frozen body + head, lr 0.1": [
            *full,
            "model.freeze=['net.1','net.3']",
            "client.lr=0.1",
        ],
        "pretrained, LoRA r=4 α=8 only, lr 0.05": [pre, "client.adapter='lora'", "client.lr=0.05"],
    }


def run(config: Path, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(config, overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_simulation(cfg, Path(tmp) / "run")
    history, metrics = summary["history"], summary["metrics"]
    return {
        "rounds_to_95": metrics["rounds_to_target"],
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in history if r["accuracy"] is not None),
        "bytes_up_per_round": history[0]["bytes_up"],
        "bytes_down_per_round": history[0]["bytes_down"],
        "rounds": len(history),
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("examples/transfer_digits_lora.toml"))
    parser.add_argument("--mnist", type=Path, default=Path("/work/shared/data/mnist"))
    parser.add_argument("--pretrain-epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    assert cfg.model.pretrained is not None, "the config names the pretrained file"
    path = Path(cfg.model.pretrained)
    target = build_federated_dataset(cfg.data, cfg.seed)
    if not path.exists():
        started = time.perf_counter()
        source = load_mnist_as_digits(args.mnist)
        model = pretrain_model(
            cfg,
            target,
            source,
            epochs=args.pretrain_epochs,
            sgd=DEFAULT_SGD,
            batch_size=DEFAULT_BATCH_SIZE,
        )
        save_state(model, path)
        print(f"pretrained on {len(source)} MNIST images in {time.perf_counter() - started:.0f} s")
    learner = build_learner(
        load_config(args.config, [*args.overrides, "client.adapter='none'"]), target
    )
    zero_shot = learner.evaluate(learner.initial_vector(), target.test)["accuracy"]
    print(f"{path}: zero-shot accuracy on the digits test set {zero_shot:.4f}")
    results: dict[str, Any] = {"zero_shot_accuracy": zero_shot}
    for name, extra in variants(path).items():
        results[name] = run(args.config, [*args.overrides, *extra])
        print(f"{name}: {results[name]}", flush=True)
    full_up = results["pretrained, full fine-tuning, lr 0.1"]["bytes_up_per_round"]
    print("\n| run | rounds to 95 % | final acc. | best acc. | bytes up/round | vs full |")
    print("|---|---|---|---|---|---|")
    for name in variants(path):
        row = results[name]
        print(
            f"| {name} | {row['rounds_to_95'] or 'not in ' + str(row['rounds'])} | "
            f"{row['final_accuracy']:.4f} | {row['best_accuracy']:.4f} | "
            f"{row['bytes_up_per_round']:,d} | {full_up / row['bytes_up_per_round']:.1f}x fewer |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
