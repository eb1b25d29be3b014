"""Cost of the privacy ledger per round, against the number of rounds so far.

Run: ``python benchmarks/accounting.py`` (a few minutes: 1,000 PLD rounds).

The ledger is driven as central DP drives it (``fedloom.privacy.central``): before each
round ε(T + 1) (the ``privacy.max_epsilon`` check), then the round is counted and ε(T)
is recorded. Printed per accountant: seconds per round averaged over rounds T-9..T, for
T = 10, 100, 1000 (one continuous ledger), the one-time setup (building one round's
PLD or RDP vector), and for the PLD the cost the ledger had before it composed
incrementally: rebuilding a fresh ``PLDAccountant`` for T rounds (one call at each T).
Exits non-zero if an incremental PLD ε differs from a fresh accountant's by more than
1e-6 relative.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
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
        f"z = {args.noise:g}, delta = {args.delta:g}, {args.rounds} rounds",
        flush=True,
    )
    results: dict[str, dict[str, object]] = {}
    status = 0
    for name in ("rdp", "pld"):
        acc = PrivacyAccountant(name, sampling, args.noise, args.delta)
        t0 = time.perf_counter()
        # One-time setup (one round's PLD or RDP vector), timed apart from the rounds.
        _ = acc._one_round_pld if name == "pld" else acc._rdp_per_round
        setup = time.perf_counter() - t0
        times = ledger_round_times(acc, args.rounds)
        per_round = {t: sum(times[t - 10 : t]) / 10 for t in marks}
        row: dict[str, object] = {
            "setup_s": setup,
            "s_per_round_at": per_round,
            "mean_s_per_round": sum(times) / len(times),
            "epsilon": acc.epsilon(),
        }
        if name == "pld":
            rebuild, check = {}, {}
            for t in marks:
                t1 = time.perf_counter()
                fresh = compute_epsilon("pld", sampling, args.noise, t, args.delta)
                rebuild[t] = time.perf_counter() - t1
                check[t] = abs(acc.epsilon(t) - fresh) / fresh
            row["rebuild_s_at"] = rebuild
            row["relative_difference_at"] = check
            if max(check.values()) > 1e-6:
                status = 1
        results[name] = row
        print(f"{name} done", flush=True)

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
    print(f"final epsilon: rdp {results['rdp']['epsilon']:.4f}, pld {pld['epsilon']:.4f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if status:
        print("ERROR: the incremental PLD epsilon differs from a fresh accountant's")
    return status


if __name__ == "__main__":
    sys.exit(main())
