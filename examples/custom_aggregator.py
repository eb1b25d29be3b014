"""Register your own aggregator and callback, then name them in a config.

    python examples/custom_aggregator.py         # through the Python API
    python examples/custom_aggregator.py cli     # through the CLI, with this module imported

The aggregator is the coordinate-wise median (Yin et al. 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", Definition 1): each
coordinate of the update is the median of that coordinate over the clients, so a
minority of wild updates cannot drag it far. The callback keeps every round's accuracy
in a list and a CSV file. Neither needs any change to fedloom: registering a factory
under a name is enough for ``server.aggregator = "example-median"`` or
``callbacks = ["example-accuracy-log"]`` to find it.

The registries live in the process that reads the config, so a plain ``fedloom run
--set server.aggregator=example-median`` does not know the name ("unknown aggregator");
the module that registers it has to be imported first: ``cli`` mode does it in Python,
and from a shell ``--import`` does it (run from this folder)::

    fedloom run --import custom_aggregator --set server.aggregator="'example-median'"
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedloom
from fedloom.algorithms.base import StageContext
from fedloom.callbacks import Callback, RunContext
from fedloom.config import DataConfig
from fedloom.data import build_federated_dataset
from fedloom.registry import AGGREGATORS, CALLBACKS
from fedloom.server.aggregators import AggregationInput


class CoordinateMedian:
    """The coordinate-wise median of the clients' updates (unweighted: one client, one vote)."""

    #: The median needs every client's update, so secure aggregation (which shows the
    #: server only the sum) is refused with this aggregator.
    needs_individual_updates = True
    #: Skip rounds with too few updates (server.min_aggregate_clients), like the mean.
    aggregates_every_round = False

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self.rounds_aggregated = 0

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        if inp.updates is None:
            raise ValueError("the median needs individual updates, not a secure sum")
        self.rounds_aggregated += 1
        median = np.median(inp.updates, axis=0).astype(np.float32)
        return median, {"median_of": int(inp.updates.shape[0])}

    def state(self) -> dict[str, Any]:
        # Saved in every checkpoint, restored by load_state on --resume.
        return {"rounds_aggregated": self.rounds_aggregated}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.rounds_aggregated = int(state.get("rounds_aggregated", 0))


@AGGREGATORS.register("example-median")
def make_median(options: dict[str, Any], context: StageContext) -> CoordinateMedian:
    """Factories get ``server.aggregator_options`` and what the run looks like."""
    return CoordinateMedian(context.dimension)


class AccuracyLog(Callback):
    """Each evaluated round's accuracy, in ``self.rows`` and (optionally) a CSV file."""

    def __init__(self, csv_path: str | None = None) -> None:
        self.rows: list[tuple[int, float]] = []
        self.csv_path = Path(csv_path) if csv_path else None

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        if record.get("accuracy") is not None:
            self.rows.append((rnd, float(record["accuracy"])))

    def on_run_end(self, run: RunContext) -> None:
        if self.csv_path is not None:
            with self.csv_path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["round", "accuracy"])
                writer.writerows(self.rows)


@CALLBACKS.register("example-accuracy-log")
def make_accuracy_log(options: dict[str, Any]) -> AccuracyLog:
    """Callback factories get ``callback_options[name]``."""
    return AccuracyLog(options.get("csv"))


def python_api(workdir: Path) -> dict[str, Any]:
    """A federation of a small MLP on the built-in digits split, aggregated by the median.

    Any data works the same way; here the data set is fedloom's own digits split across
    10 clients, passed whole to ``simulate``.
    """
    data = build_federated_dataset(DataConfig(num_clients=10, alpha=1.0), seed=0)
    in_memory = AccuracyLog()  # a callback can also be passed as an instance
    csv_path = workdir / "accuracy.csv"
    summary = fedloom.simulate(
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        ),
        clients=data,
        rounds=8,
        callbacks=[in_memory],
        config={
            "server": {"aggregator": "example-median"},  # by its registered name
            "client": {"epochs": 1},
            "callbacks": ["example-accuracy-log"],
            "callback_options": {"example-accuracy-log": {"csv": str(csv_path)}},
        },
    )
    medians = [r["median_of"] for r in summary["history"] if "median_of" in r]
    print(f"aggregator example-median ran in {len(medians)} rounds, over {medians[-1]} clients")
    print(f"accuracy per round: {', '.join(f'{a:.3f}' for _, a in in_memory.rows)}")
    print(f"final accuracy {summary['final']['accuracy']:.3f}")
    print(f"{csv_path.name}: {len(csv_path.read_text().splitlines()) - 1} rounds logged")
    return summary


def command_line(workdir: Path) -> int:
    """The CLI, in a process where this module (so the registration) is already imported.

    Equivalent to ``fedloom run --set server.aggregator=example-median`` after
    ``import custom_aggregator``; run without that import, the CLI answers
    "unknown aggregator 'example-median'".
    """
    from fedloom.cli import main

    out = workdir / "cli-run"
    code = main(
        [
            "run",
            "--out",
            str(out),
            "--set",
            "rounds=3",
            "--set",
            "client.epochs=1",
            "--set",
            "server.aggregator=example-median",
        ]
    )
    if code == 0:
        history = json.loads((out / "summary.json").read_text())["history"]
        medians = sum("median_of" in r for r in history)
        print(f"cli run: aggregator example-median ran in {medians} rounds")
    return code


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode = sys.argv[1] if len(sys.argv) > 1 else "api"
    if mode not in ("api", "cli"):
        sys.exit(f"usage: python {sys.argv[0]} [api|cli]")
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "api":
            python_api(Path(tmp))
        else:
            sys.exit(command_line(Path(tmp)))
