"""``fedloom leakage``: the gradient-leakage attack evaluation (:mod:`fedloom.attacks.leakage`)."""

from __future__ import annotations

import argparse
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from rich.console import Console

from fedloom.attacks.leakage_settings import (
    QUICK_SETTINGS,
    LeakageSettingsError,
    leakage_settings_from_args,
)
from fedloom.cli.common import EXIT_INTERRUPTED


def cmd_leakage(args: argparse.Namespace, console: Console) -> int:
    """Run the leakage evaluation, print its table, write leakage.json and leakage.png.

    The settings are checked and the output directory created before the attacks
    start, so a bad value or an unwritable DIR costs the user no waiting.
    """
    # Imported here, not at the top: it pulls in torch and SecAgg+ (about 2 s) that the
    # other commands' start-up should not pay for.
    from fedloom.attacks.leakage import (
        format_leakage_report,
        run_leakage,
        write_leakage_json,
        write_leakage_png,
    )

    settings = leakage_settings_from_args(args, QUICK_SETTINGS)
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LeakageSettingsError(
            f"--out {out}: cannot create the directory ({err.strerror or err})"
        ) from None
    status: AbstractContextManager[object] = (
        console.status("attacking the updates ...") if console.is_terminal else nullcontext()
    )
    try:
        with status:
            report = run_leakage(settings)
    except KeyboardInterrupt:
        print("fedloom: interrupted; no results were written", file=sys.stderr)
        return EXIT_INTERRUPTED
    console.print(
        format_leakage_report(report, settings), markup=False, highlight=False, soft_wrap=True
    )
    json_path = write_leakage_json(report, settings, out / "leakage.json")
    png_path = write_leakage_png(report, out / "leakage.png")
    console.print(
        f"wrote {json_path} and {png_path}", markup=False, highlight=False, soft_wrap=True
    )
    return 0
