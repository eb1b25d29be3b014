"""Gradient leakage: what an honest-but-curious server recovers from one client's update.

Run as a script: ``python benchmarks/leakage.py [--quick] [--png runs/leakage.png]``.

For each target digit (8×8, the embedded scikit-learn digits) a client takes one SGD
step (η = 0.1) on that single image with a 64→64→10 sigmoid MLP at initialisation, and
the server inverts what it receives, under: no defence; clipping alone (C = 0.1, active
in every trial); clipping plus Gaussian noise of standard deviation z·C (the worst case
of central DP: the attacker sees one client's noised contribution); and real SecAgg+
rounds in which the server sees only the sum of K clients' updates. Attacks: DLG (Zhu
et al. 2019) and iDLG (Zhao et al. 2020) treating the observation as one client's
gradient, and, under secure aggregation, DLG with K dummy images ("DLG×K"), scored by
the dummy closest to the target. See :mod:`fedloom.attacks.leakage` for the details.

Prints one row per condition: PSNR in dB (mean ± sd over targets, peak 1.0, capped at
100 dB) and mean MSE of each attack against the target's true image, the share of
targets whose label iDLG's sign rule read correctly, and the mean seconds per target.
The two baselines are what an attacker who learned nothing reaches (a uniform random
image; the mean digit). Also writes a PNG grid of true images and reconstructions and
prints its path.

Full run (8 conditions × 20 targets): about 2 minutes on one core. ``--quick`` (6
conditions × 3 targets, DLG×K with 300 iterations): about 10 s. The options are those of
``fedloom leakage`` (:mod:`fedloom.attacks.leakage_settings`), which runs the quick
settings by default and also writes ``leakage.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fedloom.attacks.leakage import format_leakage_report, run_leakage, write_leakage_png
from fedloom.attacks.leakage_settings import (
    FULL_SETTINGS,
    QUICK_SETTINGS,
    LeakageSettingsError,
    add_leakage_arguments,
    leakage_settings_from_args,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="start from `fedloom leakage`'s defaults: 6 conditions × 3 targets, "
        "DLG×K with 300 iterations",
    )
    add_leakage_arguments(parser, FULL_SETTINGS)
    parser.add_argument(
        "--png", type=Path, default=Path("runs/leakage.png"), help="grid image path"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the conditions, print the table, write the PNG; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = leakage_settings_from_args(args, QUICK_SETTINGS if args.quick else FULL_SETTINGS)
        report = run_leakage(settings)
    except LeakageSettingsError as err:
        parser.error(str(err))
    print(format_leakage_report(report, settings))
    png = write_leakage_png(report, args.png)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
