"""Argument parsing and dispatch of the ``fedloom`` command.

Only :mod:`fedloom.cli` imports this module. It imports the command modules
(:mod:`~fedloom.cli.run`, :mod:`~fedloom.cli.deploy`, :mod:`~fedloom.cli.leakage`,
:mod:`~fedloom.cli.watermark`, :mod:`~fedloom.cli.robustness`),
which import :mod:`~fedloom.cli.common` and never this module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from fedloom import __version__
from fedloom.attacks.leakage_settings import (
    QUICK_SETTINGS,
    LeakageSettingsError,
    add_leakage_arguments,
)
from fedloom.cli.common import (
    add_credential_arguments,
    add_overrides_argument,
    make_console,
    setup_logging,
    user_error,
)
from fedloom.cli.compare import add_compare_parser, cmd_compare
from fedloom.cli.dashboard import add_dashboard_parser, add_token_argument, cmd_dashboard
from fedloom.cli.deploy import run_deploy_command
from fedloom.cli.estimate import cmd_estimate
from fedloom.cli.leakage import cmd_leakage
from fedloom.cli.party import add_party_parser, cmd_party
from fedloom.cli.peer import add_peer_arguments, cmd_peer
from fedloom.cli.pretrain import add_pretrain_parser, cmd_pretrain
from fedloom.cli.report_html import add_html_arguments, cmd_report_html
from fedloom.cli.robustness import DESCRIPTION as ROBUSTNESS_DESCRIPTION
from fedloom.cli.robustness import add_robustness_arguments, cmd_robustness
from fedloom.cli.run import cmd_centralized, cmd_report, cmd_run
from fedloom.cli.watermark import add_watermark_parser, cmd_watermark
from fedloom.config import ConfigError
from fedloom.store import RunStoreError

#: ``fedloom --help``'s description.
DESCRIPTION = """The ``fedloom`` command.

Every error a user can cause (bad config, unreadable data, a directory that is not a
run) ends with one line on stderr and exit code 2; nothing already recorded is lost.
"""
DEPLOY_COMMANDS = ("server", "client", "certs", "token")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedloom", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"fedloom {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated simulation")
    _add_config_args(run)
    run.add_argument("--out", type=Path, help="run directory (default: runs/NAME-TIMESTAMP)")
    run.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR")
    run.add_argument("-v", "--verbose", action="store_true", help="log every round")

    central = sub.add_parser(
        "centralized", help="train the same model on pooled data (the accuracy baseline)"
    )
    _add_config_args(central)
    central.add_argument(
        "--out", type=Path, help="a run directory to record the baseline in (optional)"
    )

    report = sub.add_parser("report", help="re-draw plots and print the tables of a run")
    report.add_argument("run_dir", type=Path)
    add_html_arguments(report)

    server = sub.add_parser("server", help="serve an experiment to real client processes")
    _add_config_args(server)
    server.add_argument("--address", default="127.0.0.1:8443", help="HOST:PORT (port 0: any free)")
    add_credential_arguments(server, serving=True)
    server.add_argument("--insecure", action="store_true", help="allow plaintext off loopback")
    server.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="serve clients without tokens or client certificates off loopback",
    )
    server.add_argument(
        "--revoked", type=Path, help="revoked identities, one a line (see 'fedloom certs --revoke')"
    )
    server.add_argument(
        "--key-holder-name",
        default="key-holder",
        help="CKKS runs: the token/certificate name the key holder must register with",
    )
    server.add_argument("--out", type=Path, help="run directory (default: runs/NAME-TIMESTAMP)")
    server.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR")
    server.add_argument("-v", "--verbose", action="store_true", help="log every round")
    server.add_argument(
        "--dashboard",
        metavar="HOST:PORT",
        help="also serve the live dashboard here (e.g. 127.0.0.1:8050)",
    )
    add_token_argument(server, "--dashboard-token-file")

    client = sub.add_parser("client", help="train on this machine's data for a fedloom server")
    client.add_argument("--server", required=True, help="HOST:PORT of the fedloom server")
    add_credential_arguments(client, serving=False)
    client.add_argument(
        "--token", help="bearer token (visible in ps: prefer --token-file or FEDLOOM_TOKEN)"
    )
    client.add_argument(
        "--replace-stale",
        action="store_true",
        help="take over this identity's session on the server if its heartbeats stopped",
    )
    client.add_argument("--insecure", action="store_true", help="plaintext (loopback trials)")
    client.add_argument(
        "--partition",
        type=int,
        default=-1,
        help="train on partition K of the experiment's built-in data (trials)",
    )
    client.add_argument(
        "--data",
        type=Path,
        help="train on this local file or directory, in the experiment's data format",
    )
    client.add_argument("--name", default="client", help="a label for the server's logs")
    client.add_argument(
        "--key-holder",
        action="store_true",
        help="serve as a CKKS run's key holder (holds the secret key, trains nothing)",
    )
    client.add_argument(
        "--min-contributors",
        type=int,
        default=2,
        help="key holder: refuse to decrypt sums of fewer client updates (default 2)",
    )
    client.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where this client keeps its local DP privacy ledger across restarts "
        "(default: $XDG_STATE_HOME/fedloom or ~/.local/state/fedloom)",
    )
    client.add_argument("--max-wait", type=float, default=300.0, help="give up after S seconds")
    client.add_argument(
        "--attack",
        metavar="KIND",
        help="red team: this client runs attack KIND (sign_flip, scale, gaussian, label_flip, "
        "backdoor, ...) on its own updates, whatever the server's config says",
    )
    client.add_argument(
        "--attack-set",
        dest="attack_sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="red team: an [attack] parameter, e.g. factor=10 (repeatable)",
    )
    client.add_argument(
        "--rehearse-profile",
        action="store_true",
        help="act out the device the server's [system] section gives this client: its "
        "compute speed, bandwidth and dropouts (to check 'fedloom estimate' for real)",
    )
    _add_import_arg(client)
    client.add_argument("-v", "--verbose", action="store_true")

    peer = sub.add_parser("peer", help='run one serverless gossip peer (mode = "gossip")')
    _add_config_args(peer)
    add_peer_arguments(peer)

    certs = sub.add_parser("certs", help="make a development CA, server and client certificates")
    certs.add_argument("out_dir", type=Path)
    certs.add_argument("--hosts", default="localhost,127.0.0.1", help="server names/IPs")
    certs.add_argument(
        "--clients",
        default="client-0,client-1,client-2",
        help="client identities (each certificate's common name)",
    )
    certs.add_argument(
        "--revoke",
        metavar="NAME",
        help="revoke identity NAME's certificate: add it to OUT_DIR/revoked.txt",
    )

    token = sub.add_parser("token", help="create, list or revoke client identities' tokens")
    token.add_argument("name", nargs="?", help="the identity the new token carries")
    token.add_argument("--tokens", type=Path, required=True, help="the server's tokens file")
    token.add_argument("--out", type=Path, help="write the token to this file (mode 0600)")
    token.add_argument("--revoke", metavar="NAME", help="revoke identity NAME's token")
    token.add_argument("--list", action="store_true", help="list the identities with a token")

    leakage = sub.add_parser(
        "leakage",
        help="measure what gradient inversion (DLG/iDLG) recovers from one client's update",
        description=LEAKAGE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_leakage_arguments(leakage, QUICK_SETTINGS)
    leakage.add_argument(
        "--out",
        type=Path,
        default=Path("runs/leakage"),
        metavar="DIR",
        help="where to write leakage.json and leakage.png (default runs/leakage; "
        "existing ones are replaced)",
    )
    estimate = sub.add_parser(
        "estimate",
        help="estimate round and total training time on the [system] device profiles",
    )
    _add_config_args(estimate)
    estimate.add_argument(
        "--trajectories", type=int, default=200, help="replays of the run's timeline (200)"
    )
    target = estimate.add_mutually_exclusive_group()
    target.add_argument(
        "--rounds-to-target", type=int, help="rounds the target accuracy needs, if known"
    )
    target.add_argument(
        "--curve", type=Path, metavar="RUN_DIR", help="a run of this task that reached the target"
    )
    estimate.add_argument("--no-what-if", action="store_true", help="only the configured run")
    estimate.add_argument("--json", type=Path, metavar="FILE", help="also write the estimate")
    add_watermark_parser(sub)
    robustness = sub.add_parser(
        "robustness",
        help="run an attack x defense grid and save its table and plot",
        description=ROBUSTNESS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(robustness)
    add_robustness_arguments(robustness)
    add_pretrain_parser(sub)
    add_compare_parser(sub)
    add_dashboard_parser(sub)
    add_party_parser(sub)
    return parser


LEAKAGE_DESCRIPTION = """\
Attack one client's update the way an honest-but-curious server could: DLG (Zhu et al.
2019) and iDLG (Zhao et al. 2020) reconstruct the client's 8x8 digit and its label from
one SGD step of a small sigmoid MLP, with no defence, clipping alone, clipping plus DP
noise, and real SecAgg+ sums of K clients (also attacked as a batch of K, "DLG×K").
Prints PSNR (dB, higher leaks more) and MSE per attack and iDLG's label accuracy, and
writes DIR/leakage.json and the image grid DIR/leakage.png.

The defaults (6 conditions × 3 targets) take about 10 s on one or two CPU cores. The
benchmark's full run, --targets 20 --batch-iterations 1000 --noise-multiplier
0.001,0.01,0.1,1 (8 conditions × 20 targets), takes about 2 minutes."""


def _add_import_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a Python module first, so the stages it registers can be named in the "
        "config (e.g. --import my_aggregators; repeatable)",
    )


def _import_user_modules(names: list[str]) -> None:
    """Import the modules that register a user's own stages (``--import``)."""
    if names and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a module beside the config, as `python -m` finds it
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(
                f"--import {name}: cannot import it ({err}); check the module name and that "
                "its folder is the current directory or on PYTHONPATH"
            ) from None


def _add_config_args(p: argparse.ArgumentParser) -> None:
    _add_import_arg(p)
    p.add_argument("config", nargs="?", type=Path, help="TOML config (default: embedded digits)")
    add_overrides_argument(p)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = make_console()
    setup_logging(getattr(args, "verbose", False))
    try:
        _import_user_modules(getattr(args, "imports", []))
        if args.command == "run":
            return cmd_run(args, console)
        if args.command == "centralized":
            return cmd_centralized(args, console)
        if args.command == "peer":
            return cmd_peer(args, console)
        if args.command in DEPLOY_COMMANDS:
            return run_deploy_command(args, console)
        if args.command == "leakage":
            return cmd_leakage(args, console)
        if args.command == "estimate":
            return cmd_estimate(args, console)
        if args.command == "watermark":
            return cmd_watermark(args, console)
        if args.command == "robustness":
            return cmd_robustness(args, console)
        if args.command == "pretrain":
            return cmd_pretrain(args, console)
        if args.command == "compare":
            return cmd_compare(args, console)
        if args.command == "report" and (args.html or args.out is not None):
            return cmd_report_html(args, console)
        if args.command == "dashboard":
            return cmd_dashboard(args)
        if args.command == "party":
            return cmd_party(args, console)
        return cmd_report(args, console)
    except (ConfigError, RunStoreError, LeakageSettingsError) as err:
        return user_error(err)
