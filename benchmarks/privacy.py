"""Privacy benchmarks: what privacy costs in accuracy (and, later, in time and bytes).

Run as a script: ``python benchmarks/privacy.py`` prints one section per benchmark.
Each section is a function that returns its rows and a printer for them, so more
sections (secure aggregation, CKKS) slot into :func:`main` beside the existing ones.

Section "central DP": accuracy against ε on the embedded digits, DP-FedAvg (McMahan et
al. 2018) with user-level ε at δ = 1e-5:

* 700 clients with about 2 training examples each (IID split of the 1,437 training
  digits), so that a round can sample over a hundred clients, as user-level DP needs;
* Poisson sampling with q = 0.15 (105 clients per round expected), 100 rounds;
* multinomial logistic regression, one local epoch of SGD (lr 0.3, momentum 0.9);
* clients clip their update to C = 1; the server adds N(0, (zC)²) to the sum, divides
  by qN and takes a server step with lr 2;
* z is calibrated before training so that the 100 rounds cost at most the target ε
  (RDP accountant); the "∞" row is the same run without DP (no clipping, no noise,
  example-weighted mean).

Accuracy is on the held-out 360 test digits, averaged over seeds.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fedloom.config import RunConfig, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.privacy.accounting import ClientSampling, calibrate_noise_multiplier

#: The central-DP digits experiment; the target ε is added per row.
DIGITS_DP: tuple[str, ...] = (
    "strategy=dp-fedavg",
    "data.name=digits",
    "data.partition=iid",
    "data.num_clients=700",
    "model.name=logreg",
    "client.epochs=1",
    "client.lr=0.3",
    "server.fraction_fit=0.15",
    "server.lr=2.0",
    "privacy.clipping_norm=1.0",
    "privacy.delta=1e-5",
    "rounds=100",
    "eval.every=100",
)

DEFAULT_EPSILONS: tuple[float, ...] = (math.inf, 16.0, 8.0, 4.0, 2.0)


@dataclass
class DpRow:
    """One target ε: what the accountant reached and what the model learned."""

    target_epsilon: float
    epsilon: float | None
    noise_multiplier: float | None
    accuracies: list[float]
    rounds: int
    clients_per_round: float
    wall_s: float

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def accuracy_sd(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def digits_dp_config(target_epsilon: float, seed: int, extra: Sequence[str] = ()) -> RunConfig:
    """The section's experiment at one target ε (∞: the same run without DP)."""
    overrides = [*DIGITS_DP, f"seed={seed}", *extra]
    if math.isinf(target_epsilon):
        overrides.append("privacy.mechanism=none")
    else:
        overrides.append(f"privacy.target_epsilon={target_epsilon}")
    return load_config(None, overrides)


def central_dp_tradeoff(
    epsilons: Sequence[float], seeds: Sequence[int], extra: Sequence[str] = ()
) -> list[DpRow]:
    """Train the digits experiment once per (ε, seed); return one row per ε."""
    rows: list[DpRow] = []
    for target in epsilons:
        accs: list[float] = []
        eps = z = None
        rounds, sampled, wall = 0, 0.0, 0.0
        for seed in seeds:
            cfg = digits_dp_config(target, seed, extra)
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                summary = run_simulation(cfg, Path(tmp) / "run")
            wall += time.perf_counter() - started
            accs.append(float(summary["final"]["accuracy"]))
            history = summary["history"]
            rounds = len(history)
            sampled = statistics.fmean(r["clients_sampled"] for r in history)
            ledger = summary.get("privacy")
            if ledger is not None:
                eps, z = float(ledger["epsilon"]), float(ledger["noise_multiplier"])
        rows.append(DpRow(target, eps, z, accs, rounds, sampled, wall / len(seeds)))
    return rows


def print_dp_rows(rows: Sequence[DpRow], seeds: int) -> None:
    print("## Central DP (DP-FedAvg) on digits: accuracy vs ε")
    print()
    print(
        "700 clients (~2 examples each), Poisson q = 0.15 (105 clients/round expected), "
        "100 rounds, logistic regression, C = 1, δ = 1e-5, RDP accountant; "
        f"accuracy = mean ± sd over {seeds} seed(s)."
    )
    print()
    print("| target ε | ε reached | noise multiplier z | test accuracy | rounds | s/run |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        target = "∞ (no DP)" if math.isinf(r.target_epsilon) else f"{r.target_epsilon:g}"
        eps = "∞" if r.epsilon is None else f"{r.epsilon:.2f}"
        z = "–" if r.noise_multiplier is None else f"{r.noise_multiplier:.3f}"
        acc = f"{100 * r.accuracy:.1f} % ± {100 * r.accuracy_sd:.1f}"
        print(f"| {target} | {eps} | {z} | {acc} | {r.rounds} | {r.wall_s:.1f} |")
    print()


@dataclass
class AccountantRow:
    target_epsilon: float
    z_rdp: float
    z_pld: float
    calibrate_s_rdp: float
    calibrate_s_pld: float


def accountant_comparison(epsilons: Sequence[float]) -> list[AccountantRow]:
    """The noise multiplier each accountant needs for the same (ε, δ) over the same run."""
    sampling = ClientSampling("poisson", 700, 105)
    rows: list[AccountantRow] = []
    for target in epsilons:
        if math.isinf(target):
            continue
        t0 = time.perf_counter()
        z_rdp = calibrate_noise_multiplier("rdp", sampling, 100, target, 1e-5)
        t1 = time.perf_counter()
        z_pld = calibrate_noise_multiplier("pld", sampling, 100, target, 1e-5)
        t2 = time.perf_counter()
        rows.append(AccountantRow(target, z_rdp, z_pld, t1 - t0, t2 - t1))
    return rows


def print_accountant_rows(rows: Sequence[AccountantRow]) -> None:
    print("## Accountants: noise multiplier for the same guarantee")
    print()
    print("Poisson q = 0.15, 100 rounds, δ = 1e-5. PLD's tighter bound needs less noise.")
    print()
    print("| target ε | z (RDP) | z (PLD) | PLD noise saved | calibration s (RDP / PLD) |")
    print("|---|---|---|---|---|")
    for r in rows:
        saved = 100 * (1 - r.z_pld / r.z_rdp)
        print(
            f"| {r.target_epsilon:g} | {r.z_rdp:.3f} | {r.z_pld:.3f} | {saved:.1f} % | "
            f"{r.calibrate_s_rdp:.1f} / {r.calibrate_s_pld:.1f} |"
        )
    print()


Section = Callable[[argparse.Namespace], None]


def section_central_dp(args: argparse.Namespace) -> None:
    seeds = list(range(args.seeds))
    print_dp_rows(central_dp_tradeoff(args.epsilons, seeds, args.set), len(seeds))


def section_accountants(args: argparse.Namespace) -> None:
    print_accountant_rows(accountant_comparison(args.epsilons))


#: Sections in print order; add new benchmarks here (name → function).
SECTIONS: dict[str, Section] = {
    "central-dp": section_central_dp,
    "accountants": section_accountants,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), metavar="NAME"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (default 3)")
    parser.add_argument(
        "--epsilons",
        type=float,
        nargs="+",
        default=list(DEFAULT_EPSILONS),
        help="target ε values; inf = no DP (default: inf 16 8 4 2)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in args.sections:
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
