"""Robust aggregators against scaled, sign-flipped updates, next to the mean, same runs.

A stop-gap for the attack grid the robustness issue asks for (attack clients are not
built yet): the first ``--attackers`` clients' rows are multiplied by ``--factor`` at the
server, just before the aggregator sees them, so every aggregator faces exactly the same
attack. It measures what the README quotes: final central test accuracy on digits,
clean and attacked, IID and Dirichlet(0.5).

    .venv/bin/python benchmarks/robust_scaled.py [--rounds 10] [--factor -10] [--attackers 4]
        [--defenses NAME ...]

FLTrust's accuracy is on the test set minus its 100 root examples (reserved from it).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation
from fedloom.registry import AGGREGATORS
from fedloom.server.aggregators import AggregationInput

DEFENSES = ["mean", "median", "trimmed_mean", "krum", "multi_krum", "rfa", "centered_clipping"]
DEFENSES += ["norm_bound", "fltrust", "flame"]


class ScaledRows:
    """Wraps an aggregator: rows of ``attackers`` are scaled by ``factor`` first."""

    def __init__(self, inner: Any, attackers: set[int], factor: float) -> None:
        self.inner, self.attackers, self.factor = inner, attackers, factor
        self.needs_individual_updates = True
        self.aggregates_every_round = inner.aggregates_every_round

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        if inp.updates is not None:
            rows = inp.updates.copy()
            for i, cid in enumerate(inp.client_ids):
                if cid in self.attackers:
                    rows[i] *= self.factor
            inp = AggregationInput(
                round=inp.round,
                dimension=inp.dimension,
                updates=rows,
                weights=inp.weights,
                metrics=inp.metrics,
                client_ids=inp.client_ids,
                count=inp.count,
                global_weights=inp.global_weights,
            )
        return self.inner.aggregate(inp)

    def state(self) -> dict[str, Any]:
        return dict(self.inner.state())

    def load_state(self, state: Any) -> None:
        self.inner.load_state(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--factor", type=float, default=-10.0)
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument(
        "--defenses", nargs="+", choices=DEFENSES, default=DEFENSES, help="a subset to run"
    )
    args = parser.parse_args()
    attackers = set(range(args.attackers))
    for name in args.defenses:
        inner = AGGREGATORS.get(name)
        AGGREGATORS.add(
            f"attacked-{name}",
            lambda options, context, inner=inner: ScaledRows(
                inner(options, context), attackers, args.factor
            ),
            replace=True,
        )
    print(
        f"digits, 20 clients, {args.rounds} rounds; clients 0..{args.attackers - 1} send "
        f"{args.factor:g}x their update\n"
    )
    head = f"{'aggregator':<20}{'clean IID':>11}{'clean Dir':>11}"
    print(head + f"{'attacked IID':>14}{'attacked Dir':>14}")
    for name in args.defenses:
        cells = []
        for attacked in (False, True):
            for partition in ("iid", "dirichlet"):
                cfg = load_config(
                    None,
                    [
                        f"rounds={args.rounds}",
                        f"data.partition='{partition}'",
                        f"server.aggregator='{'attacked-' + name if attacked else name}'",
                    ],
                )
                with tempfile.TemporaryDirectory() as tmp:
                    summary = run_simulation(cfg, Path(tmp) / "run")
                cells.append(summary["final"]["accuracy"])
        print(
            f"{name:<20}"
            + "".join(f"{c:>11.3f}" for c in cells[:2])
            + "".join(f"{c:>14.3f}" for c in cells[2:])
        )


if __name__ == "__main__":
    main()
