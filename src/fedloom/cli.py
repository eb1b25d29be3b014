"""The ``fedloom`` command.

Every error a user can cause (bad config, unreadable data, a directory that is not a
run) ends with one line on stderr and exit code 2; nothing already recorded is lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedloom import __version__
from fedloom.config import ConfigError, RunConfig, load_config
from fedloom.data.base import FederatedDataset
from fedloom.privacy.leakage_settings import (
    QUICK_SETTINGS,
    LeakageSettingsError,
    add_leakage_arguments,
    leakage_settings_from_args,
)
from fedloom.store import DB_FILE, RunStore, RunStoreError

EXIT_USER_ERROR = 2
#: What a shell reports for a process ended by SIGINT (128 + 2); Ctrl-C exits with it.
EXIT_INTERRUPTED = 130
DEPLOY_COMMANDS = ("server", "client", "certs", "token")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedloom", description=__doc__)
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

    server = sub.add_parser("server", help="serve an experiment to real client processes")
    _add_config_args(server)
    server.add_argument("--address", default="127.0.0.1:8443", help="HOST:PORT (port 0: any free)")
    server.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    server.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    server.add_argument("--client-ca", type=Path, help="require client certificates from this CA")
    server.add_argument("--tokens", type=Path, help="hashed bearer tokens (see 'fedloom token')")
    server.add_argument("--insecure", action="store_true", help="allow plaintext off loopback")
    server.add_argument(
        "--key-holder-name",
        default="key-holder",
        help="CKKS runs: the token/certificate name the key holder must register with",
    )
    server.add_argument("--out", type=Path, help="run directory (default: runs/NAME-TIMESTAMP)")
    server.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR")
    server.add_argument("-v", "--verbose", action="store_true", help="log every round")

    client = sub.add_parser("client", help="train on this machine's data for a fedloom server")
    client.add_argument("--server", required=True, help="HOST:PORT of the fedloom server")
    client.add_argument("--root-cert", type=Path, help="CA certificate that signed the server's")
    client.add_argument("--token", help="bearer token (or set FEDLOOM_TOKEN)")
    client.add_argument("--cert", type=Path, help="client certificate for mutual TLS")
    client.add_argument("--key", type=Path, help="client private key for mutual TLS")
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
    client.add_argument("-v", "--verbose", action="store_true")

    certs = sub.add_parser("certs", help="make a development CA, server and client certificates")
    certs.add_argument("out_dir", type=Path)
    certs.add_argument("--hosts", default="localhost,127.0.0.1", help="server names/IPs")
    certs.add_argument("--clients", default="client-0,client-1,client-2", help="client names")

    token = sub.add_parser("token", help="create a client token and store its hash")
    token.add_argument("name")
    token.add_argument("--tokens", type=Path, required=True, help="the server's tokens file")

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


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", type=Path, help="TOML config (default: embedded digits)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set client.lr=0.05 (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=False)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "run":
            return _cmd_run(args, console)
        if args.command == "centralized":
            return _cmd_centralized(args, console)
        if args.command in DEPLOY_COMMANDS:
            from fedloom.cli_deploy import run_deploy_command

            return run_deploy_command(args, console)
        if args.command == "leakage":
            return _cmd_leakage(args, console)
        return _cmd_report(args, console)
    except (ConfigError, RunStoreError, LeakageSettingsError) as err:
        print(f"fedloom: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


def config_and_run_dir(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The config and run directory of ``run`` / ``server``: new, or ``--resume DIR``.

    A resumed run uses the config stored in its directory (the returned one is only a
    placeholder the runner replaces), so CONFIG, ``--set`` and ``--out`` are refused.
    """
    if args.resume is not None:
        if args.config is not None or args.overrides or args.out is not None:
            raise ConfigError(
                "--resume continues a run with its stored config; drop CONFIG, --set and --out"
            )
        return load_config(None), args.resume
    cfg = load_config(args.config, args.overrides)
    return cfg, args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def interrupted(resume_command: str) -> int:
    """Tell the user Ctrl-C lost nothing and how to continue; return the exit code (130).

    One wording for ``fedloom run`` and ``fedloom server``: both keep every completed
    round in the run directory, so the only thing that differs is the resume command.
    """
    print(
        f"fedloom: interrupted; completed rounds are kept. Continue with: {resume_command}",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _cmd_run(args: argparse.Namespace, console: Console) -> int:
    from fedloom.engine.simulation import run_simulation
    from fedloom.report import summary_table

    cfg, out_dir = config_and_run_dir(args)
    try:
        with _progress(console) as progress:
            summary = run_simulation(
                cfg,
                out_dir,
                resume=args.resume is not None,
                on_start=progress.start,
                on_round=progress.update,
            )
    except KeyboardInterrupt:
        return interrupted(f"fedloom run --resume {out_dir}")
    console.print(summary_table(summary))
    console.print(f"run directory: {out_dir}")
    return 0


def _cmd_centralized(args: argparse.Namespace, console: Console) -> int:
    from fedloom.config import config_from_dict
    from fedloom.engine.simulation import run_centralized, write_outputs

    store: RunStore | None = None
    run_cfg: RunConfig | None = None  # the config of the run in --out, if there is one
    if args.out is not None and (args.out / DB_FILE).exists():
        store = RunStore.open(args.out)
        run_cfg = config_from_dict(store.config())
    if args.config is None and not args.overrides and run_cfg is not None:
        cfg = run_cfg
    else:
        cfg = load_config(args.config, args.overrides)
    console.print(f"centralized baseline: {cfg.data.name}, {cfg.model.name}, pooled data ...")
    result = run_centralized(cfg)
    console.print(
        f"centralized accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
        f"({result['epochs']} epochs over {result['examples']} examples, "
        f"{result['wall_s']:.1f} s)"
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "centralized.json").write_text(json.dumps(result, indent=2) + "\n")
    if store is not None and run_cfg is not None:
        store.set_meta("centralized_accuracy", result["accuracy"])
        from fedloom.data import build_federated_dataset

        num_clients = build_federated_dataset(run_cfg.data, run_cfg.seed).num_clients
        summary = write_outputs(store, args.out, run_cfg, num_clients)
        gap = summary["metrics"]["accuracy_gap"]
        if gap is not None:
            console.print(
                f"federated final accuracy {summary['final']['accuracy']:.4f}; "
                f"gap to centralized {gap * 100:+.2f} points"
            )
        store.close()
    return 0


def _cmd_leakage(args: argparse.Namespace, console: Console) -> int:
    """Run the leakage evaluation, print its table, write leakage.json and leakage.png.

    The settings are checked and the output directory created before the attacks
    start, so a bad value or an unwritable DIR costs the user no waiting.
    """
    # Imported here, not at the top: it pulls in torch and SecAgg+ (about 2 s) that the
    # other commands' start-up should not pay for.
    from fedloom.privacy.leakage import (
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
    console.print(f"wrote {json_path} and {png_path}", markup=False, highlight=False)
    return 0


def _cmd_report(args: argparse.Namespace, console: Console) -> int:
    from fedloom.report import redraw

    redraw(args.run_dir, console)
    return 0


class _RoundProgress:
    """A live progress line on a terminal; silent otherwise (logs still go to stderr)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def start(self, cfg: RunConfig, data: FederatedDataset, done: int) -> None:
        logging.getLogger("fedloom").info(
            "%s: %d clients, %s, %d rounds (from round %d)",
            data.name,
            data.num_clients,
            cfg.strategy or "custom",
            cfg.rounds,
            done + 1,
        )
        for note in data.notes:
            logging.getLogger("fedloom").warning(note)
        if not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task("rounds", total=cfg.rounds, completed=done, status="")

    def update(self, record: dict[str, Any]) -> None:
        acc, loss = record.get("accuracy"), record.get("loss")
        status = (
            f"acc {acc:.4f} loss {loss:.4f}" if acc is not None and loss is not None else ""
        ) + f"  clients {record['clients_succeeded']}/{record['clients_sampled']}"
        logging.getLogger("fedloom").info("round %d: %s", record["round"], status.strip())
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, status=status)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@contextmanager
def _progress(console: Console) -> Iterator[_RoundProgress]:
    progress = _RoundProgress(console)
    try:
        yield progress
    finally:
        progress.stop()


if __name__ == "__main__":
    sys.exit(main())
