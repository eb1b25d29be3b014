"""Anomaly detection against sign-flip attackers: precision and recall of the flagged set
in every round, from the run records (``flagged_clients``) and the known attackers.

A stop-gap attacker until the attack clients are merged: the first ``--attackers``
clients train honestly and upload the negated update. What the README quotes:

    .venv/bin/python benchmarks/anomaly_sign_flip.py [--rounds 10] [--attackers 4]
        [--partition dirichlet] [--method sign] [--rule robust_z] [--epochs 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fedloom.algorithms.base import AlgorithmSettings, ClientContext, ClientUpdate, StageContext
from fedloom.algorithms.sgd import LocalSGD
from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation
from fedloom.messages import DELTA
from fedloom.registry import CLIENT_ALGORITHMS


class SignFlip:
    """Honest local SGD; malicious clients upload −Δ."""

    def __init__(self, malicious: set[int]) -> None:
        self.inner, self.malicious = LocalSGD(), malicious

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        update = self.inner.fit(ctx)
        if ctx.client_id in self.malicious:
            return ClientUpdate({DELTA: -update.vectors[DELTA]}, update.metrics)
        return update

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        return self.inner.evaluate(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--partition", default="dirichlet")
    parser.add_argument("--method", default="sign")
    parser.add_argument("--rule", default="robust_z")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    truth = set(range(args.attackers))

    def make(settings: AlgorithmSettings, context: StageContext) -> SignFlip:
        return SignFlip(truth)

    CLIENT_ALGORITHMS.add("bench-sign-flip", make, replace=True)
    cfg = load_config(
        None,
        [
            f"rounds={args.rounds}",
            f"data.partition='{args.partition}'",
            f"client.epochs={args.epochs}",
            "client.algorithm='bench-sign-flip'",
            "anomaly.enabled=true",
            f"anomaly.method='{args.method}'",
            f"anomaly.rule='{args.rule}'",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_simulation(cfg, Path(tmp) / "run")
    print(
        f"digits, 20 clients, {args.partition}, {args.epochs} epochs, clients "
        f"0..{args.attackers - 1} sign-flip, anomaly.method = {args.method}, rule = {args.rule}"
    )
    print(f"{'round':>5}{'flagged':>9}{'precision':>11}{'recall':>8}{'accuracy':>10}")
    for r in summary["history"]:
        flagged = set(r["flagged_clients"])
        hit = len(flagged & truth)
        precision = hit / len(flagged) if flagged else float("nan")
        recall = hit / len(truth) if truth else float("nan")
        print(
            f"{r['round']:>5}{len(flagged):>9}{precision:>11.2f}{recall:>8.2f}"
            f"{r['accuracy']:>10.3f}"
        )


if __name__ == "__main__":
    main()
