"""Client selection on heterogeneous devices: uniform vs power-of-choice vs Oort.

The same config, seed and device profiles for every selector (the profiles are drawn
from the seed), on the virtual clock; what differs is which clients each round asks.
Prints final accuracy, rounds and simulated seconds to the target, and the simulated
total; ``--json FILE`` keeps the numbers.

    .venv/bin/python benchmarks/selection.py [--config examples/selection_heterogeneous.toml]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation

SELECTORS = ["uniform", "power_of_choice", "oort"]


def run(config: Path, selector: str, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(config, [*overrides, f"server.selection={selector}"])
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_simulation(cfg, Path(tmp) / "run")
    history, metrics = summary["history"], summary["metrics"]
    return {
        "selection": selector,
        "final_accuracy": history[-1]["accuracy"],
        "rounds_to_target": metrics["rounds_to_target"],
        "sim_time_to_target_s": metrics["sim_time_to_target_s"],
        "sim_time_s": history[-1]["sim_time_s"],
        "participation_rate": metrics["participation_rate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=Path("examples/selection_heterogeneous.toml")
    )
    parser.add_argument("--selectors", default=",".join(SELECTORS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [run(args.config, s, args.overrides) for s in args.selectors.split(",")]
    base = rows[0]["sim_time_to_target_s"]
    print(
        f"{'selection':<16} {'final acc':>9} {'rounds to target':>16} "
        f"{'sim s to target':>15} {'vs first':>8} {'sim s total':>11} {'participation':>13}"
    )
    for r in rows:
        t = r["sim_time_to_target_s"]
        ratio = f"{t / base:.2f}x" if t is not None and base else "-"
        print(
            f"{r['selection']:<16} {r['final_accuracy']:>9.4f} "
            f"{r['rounds_to_target'] if r['rounds_to_target'] is not None else '-':>16} "
            f"{f'{t:.1f}' if t is not None else 'never':>15} {ratio:>8} "
            f"{r['sim_time_s']:>11.1f} {r['participation_rate']:>13.0%}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
