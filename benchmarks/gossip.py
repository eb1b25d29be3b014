"""Serverless gossip against FedAvg: the same 16 digits clients, the same local work.

FedAvg (a server averages every round) beside decentralized local SGD over a complete
graph, an exponential graph, a torus and a ring (Metropolis–Hastings weights). Prints
the average model's accuracy, each peer's own accuracy (mean and worst), and the
consensus distance at several rounds; ``--plot FILE`` draws accuracy and consensus
distance per round.

    .venv/bin/python benchmarks/gossip.py [--rounds 60] [--plot gossip.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation

BASE = ["data.num_clients=16", "client.epochs=1", "strategy=fedavg"]
VARIANTS: dict[str, list[str]] = {
    "FedAvg (server)": ["mode=sync"],
    "gossip, complete": ["mode=gossip", "gossip.topology=complete"],
    "gossip, exponential": ["mode=gossip", "gossip.topology=exponential"],
    "gossip, torus 4x4": ["mode=gossip", "gossip.topology=torus"],
    "gossip, ring": ["mode=gossip", "gossip.topology=ring"],
}


def run(overrides: list[str]) -> list[dict[str, Any]]:
    cfg = load_config(None, [*BASE, *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        return list(run_simulation(cfg, Path(tmp) / "run")["history"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    common = [f"rounds={args.rounds}", f"eval.every={args.eval_every}"]
    runs = {name: run([*common, *extra]) for name, extra in VARIANTS.items()}
    checkpoints = sorted({args.rounds // 4, args.rounds // 2, args.rounds})
    print(
        f"{'run':<22} {'final acc (avg model)':>21} {'peer acc mean':>13} {'peer acc min':>12} "
        + " ".join(f"{f'consensus r{c}':>14}" for c in checkpoints)
    )
    fedavg = runs["FedAvg (server)"][-1]["accuracy"]
    for name, history in runs.items():
        last = history[-1]
        peer_mean = last.get("peer_accuracy_mean")
        peer_min = last.get("peer_accuracy_min")
        dist = [history[c - 1].get("consensus_distance") for c in checkpoints]
        print(
            f"{name:<22} {last['accuracy']:>14.4f} ({last['accuracy'] - fedavg:+.3f}) "
            f"{peer_mean if peer_mean is not None else last['accuracy']:>13.4f} "
            f"{peer_min if peer_min is not None else last['accuracy']:>12.4f} "
            + " ".join(f"{d:>14.4g}" if d is not None else f"{'-':>14}" for d in dist)
        )
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=2))
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for (name, history), color in zip(
            runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False
        ):
            evaluated = [r for r in history if r["accuracy"] is not None]
            ax1.plot(
                [r["round"] for r in evaluated],
                [r["accuracy"] for r in evaluated],
                label=name,
                color=color,
            )
            if history[0].get("consensus_distance") is not None:
                rounds = [r["round"] for r in history]
                ax2.semilogy(
                    rounds,
                    [max(r["consensus_distance"], 1e-12) for r in history],
                    label=name,
                    color=color,
                )
        ax1.set(xlabel="round", ylabel="test accuracy (average model)", title="accuracy")
        ax2.set(xlabel="round", ylabel="(1/n) sum ||x_i - mean||^2", title="consensus distance")
        ax1.legend()
        ax2.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
