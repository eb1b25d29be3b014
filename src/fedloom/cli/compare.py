"""``fedloom compare RUN_DIR ...``: a table of several runs and an overlay of their curves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from fedloom.config import ConfigError

#: Where the overlay plot goes without ``--out``: the current directory, not a run
#: directory (a comparison belongs to none of its runs, and a run may still be writing).
DEFAULT_PLOT = Path("compare.png")

DESCRIPTION = """\
Compare finished and running runs side by side: one row per run with its strategy,
status, final accuracy (and the worst 10 % of clients' accuracy when federated
evaluation recorded it), rounds to the target accuracy, privacy budget spent (ε,
"—" without DP), bytes up and down, wall time and, for runs with simulated devices
([system] enabled), simulated time. Writes an overlay plot of accuracy against round,
and against simulated time when every run has it, to --out (default ./compare.png).
Runs that are still going are read as far as they got (status "running")."""


def add_compare_parser(sub: Any) -> None:
    """Register ``compare`` on the ``fedloom`` subcommand parsers."""
    p = sub.add_parser(
        "compare",
        help="compare runs: a table of their key numbers and an overlay accuracy plot",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_PLOT,
        metavar="FILE.png",
        help="where to write the overlay plot (default ./compare.png)",
    )
    p.add_argument(
        "--target",
        type=float,
        metavar="ACC",
        help="count rounds to this accuracy in every run (default: each run's own target)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the table's numbers")


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from fedloom.compare import compare_rows, compare_table, load_run, plot_overlay, unique_labels

    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out {args.out}: the overlay plot is a PNG; name a .png file")
    if not args.out.resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out}: folder {args.out.parent} does not exist; create it")
    if args.target is not None and not 0 <= args.target <= 1:
        raise ConfigError(f"--target {args.target}: give an accuracy between 0 and 1")
    labels = unique_labels(args.run_dirs)
    runs = [load_run(path, label) for path, label in zip(args.run_dirs, labels, strict=True)]
    rows = compare_rows(runs, target=args.target)
    if not console.is_terminal:
        console.width = max(console.width, 200)  # piped: no screen to fit, show every column
    console.print(compare_table(rows))
    plot = plot_overlay(runs, args.out, target=args.target)
    console.print(f"overlay plot: {plot}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        console.print(f"numbers: {args.json}")
    return 0
