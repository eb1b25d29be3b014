"""Compressed uploads against dense FedAvg: bytes up per round, final accuracy, rounds to
target, on digits and on MNIST, same data, seed and client work for every method.

    .venv/bin/python benchmarks/compression.py [--dataset digits|mnist|both]
        [--rounds-digits 30] [--rounds-mnist 30] [--mnist-path ../shared/data/mnist]
        [--methods dense,topk,int8,qsgd4,sign] [--json results.json]

Digits: fedloom's default experiment (20 clients, Dirichlet(0.5) label skew, MLP with 64
hidden units, 5 local epochs, target 95 %). MNIST: the t10k files beside the project,
split 80/20 by the loader, 20 clients with Dirichlet(0.5) label skew, MLP with 64 hidden
units, 1 local epoch, target 90 %. Every client takes part in every round, so every
method sees the same clients. "bytes up/round" is the round record's ``bytes_up`` (the
uploads as encoded) averaged over rounds; "x fewer" is dense's divided by it.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation

#: name → (label, config overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense FedAvg (float32)", []),
    "topk": ("top-k 1 % + EF", ["compression.kind='topk'", "compression.ratio=0.01"]),
    "randk": ("random-k 10 % + EF", ["compression.kind='randk'", "compression.ratio=0.1"]),
    "int8": ("8-bit QSGD", ["compression.kind='qsgd'", "compression.bits=8"]),
    "qsgd4": ("4-bit QSGD", ["compression.kind='qsgd'", "compression.bits=4"]),
    "qsgd4max": (
        "4-bit QSGD, max-norm buckets",
        ["compression.kind='qsgd'", "compression.bits=4", "compression.norm='max'"],
    ),
    "sign": ("signSGD + EF", ["compression.kind='sign'"]),
    "int8down": (
        "8-bit QSGD, int8 downlink",
        ["compression.kind='qsgd'", "compression.bits=8", "compression.downlink='int8'"],
    ),
    "f16down": ("dense, float16 downlink", ["compression.downlink='float16'"]),
}


def dataset_overrides(name: str, args: argparse.Namespace) -> list[str]:
    if name == "digits":
        return [f"rounds={args.rounds_digits}", "target_accuracy=0.95"]
    return [
        f"rounds={args.rounds_mnist}",
        "data.name='mnist'",
        f"data.path='{args.mnist_path}'",
        "data.num_clients=20",
        "model.hidden=[64]",
        "client.epochs=1",
        "client.batch_size=16",
        "client.lr=0.05",
        "target_accuracy=0.90",
    ]


def run_one(overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(None, overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_simulation(cfg, Path(tmp) / "run")
    history = summary["history"]
    return {
        "bytes_up_per_round": sum(r["bytes_up"] for r in history) / len(history),
        "bytes_down_per_round": sum(r["bytes_down"] for r in history) / len(history),
        "final_accuracy": summary["final"]["accuracy"],
        "rounds_to_target": summary["metrics"]["rounds_to_target"],
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "mnist", "both"], default="both")
    parser.add_argument("--rounds-digits", type=int, default=30)
    parser.add_argument("--rounds-mnist", type=int, default=30)
    parser.add_argument("--mnist-path", default="../shared/data/mnist")
    parser.add_argument("--methods", default="dense,topk,int8,qsgd4,sign")
    parser.add_argument("--set", action="append", default=[], help="extra overrides, k=v")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    datasets = ["digits", "mnist"] if args.dataset == "both" else [args.dataset]
    results: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        results[ds] = {}
        for m in methods:
            label, extra = METHODS[m]
            results[ds][m] = run_one([*dataset_overrides(ds, args), *extra, *args.set])
            results[ds][m]["label"] = label
        dense = results[ds].get("dense")
        print(f"\n{ds}")
        print(
            "| method | bytes up/round | x fewer | bytes down/round | final accuracy | "
            "vs dense | rounds to target | wall s |\n|---|---:|---:|---:|---:|---:|---:|---:|"
        )
        for m in methods:
            r = results[ds][m]
            fewer = dense["bytes_up_per_round"] / r["bytes_up_per_round"] if dense else None
            reached = r["rounds_to_target"]
            diff = (r["final_accuracy"] - dense["final_accuracy"]) * 100 if dense else None
            print(
                f"| {r['label']} | {r['bytes_up_per_round']:,.0f} | "
                + (f"{fewer:.1f}" if fewer is not None else "-")
                + f" | {r['bytes_down_per_round']:,.0f}"
                + f" | {r['final_accuracy'] * 100:.2f} % | "
                + (f"{diff:+.2f}" if diff is not None else "-")
                + f" | {reached if reached is not None else 'not reached'}"
                f" | {r['wall_s']:.0f} |",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
