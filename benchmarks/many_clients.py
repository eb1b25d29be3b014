"""Many clients in bounded memory: Synthetic(1, 1) with 1,000 to 1,000,000 devices.

Run: ``python benchmarks/many_clients.py`` (``--devices 1000 100000`` picks the rows;
``--json FILE`` also writes the results).

Workload (the simulation benchmark's): Synthetic(1, 1) of Li et al. 2020, one client
per device, 100 clients sampled per round, each one epoch of plain SGD (B = 10,
lr = 0.01) on multinomial logistic regression (60 -> 10), FedAvg, 5 rounds, the
in-process engine, a real run directory (run store, a checkpoint every round, client
state store). Nothing is evaluated in the rounds, so round time is training and
aggregation.

Rows: the 1,000-device run as it is made by default (every device's data generated up
front), and runs with ``data.on_demand = true`` (each device made from its own seed when
sampled and forgotten after) at each ``--devices`` count. Device sizes are the same
first draw in every row, so the 1,000-device rows train the same clients on the same
number of examples.

Each row runs in a fresh Python process and reports its own peak resident memory
(``ru_maxrss``: everything, including the interpreter and PyTorch), its start-up
(process start to the first round), and its round times. The sampled clients differ
between rows with different device counts, and device sizes are heavy-tailed
(lognormal), so the examples trained per round are printed beside the round times.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PER_ROUND = 100
ROUNDS = 5


def _config(devices: int, on_demand: bool) -> list[str]:
    return [
        "data.name=synthetic",
        "data.partition=natural",
        f"data.num_clients={devices}",
        f"data.on_demand={'true' if on_demand else 'false'}",
        "model.name=logreg",
        "client.epochs=1",
        "client.batch_size=10",
        "client.lr=0.01",
        "client.momentum=0.0",
        "client.weight_decay=0.0",
        "strategy=fedavg",
        f"server.fraction_fit={PER_ROUND / devices!r}",
        "server.min_fit_clients=1",
        f"rounds={ROUNDS}",
        "eval.centralized=false",
    ]


def child(devices: int, on_demand: bool) -> dict[str, Any]:
    """One row, in this (fresh) process."""
    started = time.perf_counter()
    from fedloom.config import load_config
    from fedloom.engine.simulation import run_simulation
    from fedloom.seeding import SAMPLING, derive_rng
    from fedloom.server.sampling import select_clients

    cfg = load_config(None, _config(devices, on_demand))
    first_round: list[float] = []
    sizes: list[Any] = []

    def on_start(_cfg: Any, data: Any, _done: int) -> None:
        sizes.append(data.client_sizes())
        first_round.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="fl-many-") as out:
        summary = run_simulation(cfg, Path(out) / "run", on_start=on_start)
    rounds = [float(r["round_s"]) for r in summary["history"]]
    examples = [
        int(sizes[0][select_clients(cfg.server, devices, derive_rng(cfg.seed, SAMPLING, r))].sum())
        for r in range(1, ROUNDS + 1)
    ]
    assert all(r["clients_succeeded"] == PER_ROUND for r in summary["history"])
    return {
        "devices": devices,
        "on_demand": on_demand,
        "startup_s": first_round[0] - started,
        "round_s": rounds,
        "examples_per_round": examples,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_row(devices: int, on_demand: bool) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(devices), "1" if on_demand else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1] == "1")))
        return
    rows = [run_row(1000, False)] + [run_row(n, True) for n in args.devices]
    base = statistics.mean(rows[0]["round_s"])
    print(f"Synthetic(1,1), {PER_ROUND} clients per round, {ROUNDS} rounds, in-process engine\n")
    print(
        "| devices | data | start-up s | mean round s | median round s | vs 1,000 made up front "
        "| examples per round (mean) | ms per 1,000 examples | peak memory MB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        mean = statistics.mean(row["round_s"])
        examples = statistics.mean(row["examples_per_round"])
        per_k = 1e6 * sum(row["round_s"]) / sum(row["examples_per_round"])
        print(
            f"| {row['devices']:,} | {'on demand' if row['on_demand'] else 'up front'} "
            f"| {row['startup_s']:.1f} | {mean:.3f} | {statistics.median(row['round_s']):.3f} "
            f"| {mean / base:.2f}x | {examples:,.0f} | {per_k:.1f} "
            f"| {row['peak_rss_mb']:,.0f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
