"""FedBuff and FedAsync against synchronous FedAvg on the same simulated devices.

All runs share the config, seed and device profiles (drawn from the seed); they differ
only in ``mode`` and the ``async`` table. Synchronous rounds wait for their slowest
client; asynchronous ones step as updates arrive. Compared on simulated seconds to the
target and on client updates used (the work the fleet did).

    .venv/bin/python benchmarks/async_vs_sync.py [--config examples/async_heterogeneous.toml]
        [--plot docs/img/async_time_to_accuracy.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation

VARIANTS: dict[str, list[str]] = {
    "sync FedAvg": ["mode=sync", "system.enabled=true", "rounds=40"],
    "FedBuff": ["mode=async", "async.algorithm=fedbuff"],
    "FedAsync": ["mode=async", "async.algorithm=fedasync", "rounds=400"],
}


def run(config: Path, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_simulation(cfg, Path(tmp) / "run")
    history, metrics = summary["history"], summary["metrics"]
    return {
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in history if r["accuracy"] is not None),
        "server_steps": len(history),
        "rounds_to_target": metrics["rounds_to_target"],
        "sim_time_to_target_s": metrics["sim_time_to_target_s"],
        "sim_time_s": history[-1]["sim_time_s"],
        "updates_used": metrics["clients_succeeded_total"],
        "curve": [(r["sim_time_s"], r["accuracy"]) for r in history if r["accuracy"] is not None],
        "target": cfg.target_accuracy,
    }


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy against simulated seconds, one line per mode: the time-to-accuracy view
    (a synchronous round costs its slowest client's time; an async step does not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, r in rows.items():
        times, accs = zip(*r["curve"], strict=True)
        ax.plot(times, accs, label=name)
    target = next(iter(rows.values()))["target"]
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label="target")
    ax.set_xlabel("simulated seconds")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.5, 1.0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("examples/async_heterogeneous.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="write accuracy vs simulated time (PNG)")
    args = parser.parse_args()
    rows = {name: run(args.config, [*extra, *args.overrides]) for name, extra in VARIANTS.items()}
    base = rows["sync FedAvg"]["sim_time_to_target_s"]
    print(
        f"{'mode':<12} {'steps':>6} {'final acc':>9} {'best acc':>8} {'steps to target':>15} "
        f"{'sim s to target':>15} {'vs sync':>8} {'updates used':>12}"
    )
    for name, r in rows.items():
        t = r["sim_time_to_target_s"]
        ratio = f"{t / base:.2f}x" if t is not None and base else "-"
        steps = r["rounds_to_target"] if r["rounds_to_target"] is not None else "-"
        print(
            f"{name:<12} {r['server_steps']:>6} {r['final_accuracy']:>9.4f} "
            f"{r['best_accuracy']:>8.4f} {steps:>15} "
            f"{f'{t:.1f}' if t is not None else 'never':>15} {ratio:>8} {r['updates_used']:>12}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot is not None:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
