"""``fedloom report RUN_DIR --html [--out FILE]``: the run as one self-contained HTML file."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from fedloom.config import ConfigError


def add_html_arguments(report: argparse.ArgumentParser) -> None:
    """Add ``--html`` and ``--out`` to the ``report`` subcommand."""
    report.add_argument(
        "--html",
        action="store_true",
        help="write one self-contained HTML file (summary, plots, every round, failures, "
        "config) instead of redrawing the run's plots",
    )
    report.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="with --html: where to write it (default RUN_DIR/report.html)",
    )


def cmd_report_html(args: argparse.Namespace, console: Console) -> int:
    from fedloom.report import summary_table
    from fedloom.report_html import HTML_FILE, render_html
    from fedloom.store import atomic_write

    if not args.html:
        raise ConfigError("--out names the HTML file of --html; add --html")
    out: Path = args.out if args.out is not None else args.run_dir / HTML_FILE
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; name the HTML file to write")
    if not out.resolve().parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist; create it")
    html, summary = render_html(args.run_dir)
    atomic_write(out, html)
    console.print(summary_table(summary))
    console.print(f"HTML report: {out}")
    return 0
