"""What the ``fedloom`` command modules share: exit codes, console, logging, run directory.

Imports point one way: :mod:`fedloom.cli.main` imports the command modules
(:mod:`~fedloom.cli.run`, :mod:`~fedloom.cli.deploy`, :mod:`~fedloom.cli.leakage`), and
they import this one, which imports none of them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from fedloom.config import ConfigError, RunConfig, load_config

#: The credential options of a process that serves (``fedloom server``, the label party,
#: a gossip peer), with their help as ``fedloom server`` words it.
SERVING_CREDENTIALS: dict[str, str] = {
    "--tls-cert": "server certificate (PEM)",
    "--tls-key": "server private key (PEM)",
    "--client-ca": "require client certificates from this CA",
    "--tokens": "hashed bearer tokens (see 'fedloom token')",
}
#: The credential options of a process that dials one (``fedloom client``, a feature
#: party, a gossip peer), with their help as ``fedloom client`` words it.
DIALLING_CREDENTIALS: dict[str, str] = {
    "--root-cert": "CA certificate that signed the server's",
    "--cert": "client certificate for mutual TLS",
    "--key": "client private key for mutual TLS",
    "--token-file": "read the bearer token from this file",
}

EXIT_USER_ERROR = 2
#: A run that ran but produced no model update (every round discarded or empty).
EXIT_RUN_FAILED = 1
#: What a shell reports for a process ended by SIGINT (128 + 2); Ctrl-C exits with it.
EXIT_INTERRUPTED = 130


def add_credential_arguments(
    parser: argparse.ArgumentParser,
    *,
    serving: bool,
    help: Mapping[str, str] | None = None,
    omit: Collection[str] = (),
) -> None:
    """The TLS and token options of a serving (``serving=True``) or a dialling process.

    One definition, so every command that deploys (``server``, ``client``, ``party``,
    ``peer``) names its credentials alike and reads them as paths. ``help`` rewords
    options for a command whose roles have other names (the label party); ``omit``
    leaves out options the command does not take (a gossip peer checks callers against
    its ``--root-cert``, so it has no ``--client-ca``).
    """
    options = SERVING_CREDENTIALS if serving else DIALLING_CREDENTIALS
    texts = {**options, **(help or {})}
    unknown = (set(texts) | set(omit)) - set(options)
    if unknown:
        raise ValueError(f"not a credential option here: {', '.join(sorted(unknown))}")
    for name in options:
        if name not in omit:
            parser.add_argument(name, type=Path, help=texts[name])


def add_overrides_argument(
    parser: argparse.ArgumentParser,
    *,
    help: str = "override a config key, e.g. --set client.lr=0.05 (repeatable)",
) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides`` for
    :func:`~fedloom.config.load_config`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )


def make_console() -> Console:
    """The console every command prints its results on (stdout)."""
    return Console(stderr=False)


def setup_logging(verbose: bool) -> None:
    """Log to stderr: every round with ``-v``, else warnings only."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def user_error(err: object) -> int:
    """Report an error the user can fix in one line on stderr; return the exit code (2)."""
    print(f"fedloom: error: {err}", file=sys.stderr)
    return EXIT_USER_ERROR


def run_outcome(summary: dict[str, Any]) -> int:
    """The exit code of a finished ``run`` / ``server``: 0, or 1 with the reason in one
    line on stderr when no round changed the model (``summary["failure"]``)."""
    failure = summary.get("failure")
    if summary.get("outcome") == "failed" and failure:
        print(f"fedloom: run failed: {failure}", file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def config_and_run_dir(
    args: argparse.Namespace, resumable: frozenset[str] = frozenset()
) -> tuple[RunConfig, Path]:
    """The config and run directory of ``run`` / ``server``: new, or ``--resume DIR``.

    A resumed run uses the config stored in its directory (the returned one is only a
    placeholder the runner replaces), so CONFIG and ``--out`` are refused, and ``--set``
    is refused except for the keys in ``resumable`` (the runner applies those).
    """
    if args.resume is not None:
        if args.config is not None or args.out is not None:
            raise ConfigError(
                "--resume continues a run with its stored config; drop CONFIG and --out"
            )
        for item in args.overrides or []:
            key = item.partition("=")[0].strip()
            if key not in resumable:
                allowed = ", ".join(sorted(resumable)) if resumable else "none"
                raise ConfigError(
                    f"--resume cannot change '{key}': it defines the experiment "
                    f"(keys a resume may --set: {allowed})"
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
