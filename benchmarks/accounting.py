"""Cost of the privacy ledger per round, against the number of rounds so far.

Run: ``python benchmarks/accounting.py`` (a minute or two on a quiet machine).

The ledger is driven as central DP drives it (``fedloom.privacy.central``): before each
round ε(T + 1) (the ``privacy.max_epsilon`` check), then the round is counted and ε(T)
is recorded. For each T in 10, 100, 1000 a fresh ledger is brought to T − 10 rounds the
way a resumed run brings it there (``rounds`` restored, one self-composition; untimed),
then rounds T − 9 .. T are timed: the printed cost is their mean, i.e. what one round
costs when T rounds have been composed. Also printed: the one-time setup (one round's
PLD or RDP vector), and for the PLD the cost per round the ledger had before it composed
incrementally: a fresh ``PLDAccountant`` for T rounds (one call at each T). Exits
non-zero if an incremental PLD ε differs from a fresh accountant's by more than 1e-6
relative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from fedloom.privacy.accounting import ClientSampling, PrivacyAccountant, compute_epsilon


def ledger_round_times(acc: PrivacyAccountant, rounds: int) -> list[float]:
    """Seconds of each round's accounting (ε(T+1) ahead, count, ε(T) after)."""
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        acc.epsilon(acc.rounds + 1)
        acc.step()
        acc.epsilon()
        out.append(time.perf_counter() - t)
    return out


def cost_at(
    name: str, sampling: ClientSampling, noise: float, delta: float, t: int
) -> tuple[float, float, float]:
    """(setup s, mean s per round over rounds t-9..t, ε(t)) of a ledger resumed at t-10."""
    acc = PrivacyAccountant(name, sampling, noise, delta)
    t0 = time.perf_counter()
    # One-time setup (one round's PLD or RDP vector), timed apart from the rounds.
    _ = acc._one_round_pld if name == "pld" else acc._rdp_per_round
    setup = time.perf_counter() - t0
    acc.rounds = t - 10  # as a resume restores it
    acc.epsilon()
    times = ledger_round_times(acc, 10)
    return setup, sum(times) / len(times), acc.epsilon()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=1000, help="largest T (10, 100, 1000 up to it)"
    )
    parser.add_argument("--population", type=int, default=1000)
    parser.add_argument("--per-round", type=float, default=100.0)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sampling = ClientSampling("poisson", args.population, args.per_round)
    marks = [t for t in (10, 100, 1000, 10000) if t <= args.rounds]
    print(
        f"machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}; ledger: Poisson q = {sampling.rate:g}, "
        f"z = {args.noise:g}, delta = {args.delta:g}",
        flush=True,
    )
    results: dict[str, dict[str, object]] = {}
    status = 0
    for name in ("rdp", "pld"):
        setups, per_round, eps = {}, {}, {}
        for t in marks:
            setups[t], per_round[t], eps[t] = cost_at(name, sampling, args.noise, args.delta, t)
            print(f"{name} T={t}: {per_round[t]:.4f} s/round", flush=True)
        row: dict[str, object] = {
            "setup_s": max(setups.values()),
            "s_per_round_at": per_round,
            "epsilon_at": eps,
        }
        if name == "pld":
            rebuild, check = {}, {}
            for t in marks:
                t1 = time.perf_counter()
                fresh = compute_epsilon("pld", sampling, args.noise, t, args.delta)
                rebuild[t] = time.perf_counter() - t1
                check[t] = abs(eps[t] - fresh) / fresh
                print(f"pld rebuild T={t}: {rebuild[t]:.4f} s", flush=True)
            row["rebuild_s_at"] = rebuild
            row["relative_difference_at"] = check
            if max(check.values()) > 1e-6:
                status = 1
        results[name] = row

    print()
    header = f"{'accountant':<12}{'setup s':>9}" + "".join(f"{'T=' + str(t):>12}" for t in marks)
    print("seconds per round of accounting, mean over rounds T-9..T")
    print(header)
    for name, row in results.items():
        at = row["s_per_round_at"]
        assert isinstance(at, dict)
        cells = "".join(f"{at[t]:>12.4f}" for t in marks)
        print(f"{name:<12}{row['setup_s']:>9.2f}{cells}")
    pld = results["pld"]
    rebuild = pld["rebuild_s_at"]
    assert isinstance(rebuild, dict)
    cells = "".join(f"{rebuild[t]:>12.4f}" for t in marks)
    print(f"{'pld rebuild':<12}{'':>9}{cells}   (before: a fresh PLDAccountant for T rounds)")
    diff = pld["relative_difference_at"]
    assert isinstance(diff, dict)
    print(
        "incremental PLD epsilon vs a fresh PLDAccountant, relative difference: "
        + ", ".join(f"T={t}: {diff[t]:.1e}" for t in marks)
    )
    print(
        "epsilon at T: "
        + "; ".join(
            f"{name} " + ", ".join(f"{e:.4f}" for e in row["epsilon_at"].values())  # type: ignore[attr-defined]
            for name, row in results.items()
        )
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if status:
        print("ERROR: the incremental PLD epsilon differs from a fresh accountant's")
    return status


if __name__ == "__main__":
    sys.exit(main())
