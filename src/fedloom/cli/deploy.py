"""The deployment half of the ``fedloom`` command: server, client, certs, token.

Each command imports gRPC and the deployment engine when it runs, so the simulation
commands never import them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from rich.console import Console

from fedloom.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    config_and_run_dir,
    interrupted,
    run_outcome,
)
from fedloom.config import AttackConfig, ConfigError, parse_overrides

if TYPE_CHECKING:
    from fedloom.config import RunConfig
    from fedloom.engine.grpc.client import ParticipantApp

#: The role name CKKS's key holder registers under (``--key-holder``, ``--key-holder-name``).
KEY_HOLDER_ROLE = "key-holder"


def run_deploy_command(args: argparse.Namespace, console: Console) -> int:
    # gRPC's own logging (TLS handshake failures, ...) would leak raw lines to stderr; the
    # errors that matter reach the user as fedloom's one-line messages. Read at import.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    if args.command == "server":
        return _cmd_server(args, console)
    if args.command == "client":
        return _cmd_client(args)
    if args.command == "certs":
        return _cmd_certs(args, console)
    return _cmd_token(args)


def _cmd_server(args: argparse.Namespace, console: Console) -> int:
    from fedloom.cli.dashboard import ServerDashboard
    from fedloom.engine.deploy import ServerSecurity, run_server
    from fedloom.engine.grpc import RESUMABLE_SETTINGS
    from fedloom.engine.grpc.auth import TokenFileError
    from fedloom.report import summary_table

    cfg, out_dir = config_and_run_dir(args, resumable=RESUMABLE_SETTINGS)
    if args.resume is None and (
        cfg.privacy.mechanism == "central" and "secure_noise" not in cfg.privacy.model_fields_set
    ):
        # Real people's data: DP noise from the OS CSPRNG unless explicitly turned off.
        cfg.privacy.secure_noise = True
        logging.getLogger("fedloom.deploy").info("privacy.secure_noise = true (deployment)")
    sec = ServerSecurity(
        args.tls_cert,
        args.tls_key,
        args.client_ca,
        args.tokens,
        args.insecure,
        # The roles a strategy may need, by the name that may take each (CKKS's key holder).
        role_names={KEY_HOLDER_ROLE: args.key_holder_name},
        allow_anonymous=args.allow_anonymous,
        revoked=args.revoked,
    )
    host = args.address.rsplit(":", 1)[0]

    def listening(port: int) -> None:
        print(f"fedloom server listening on {host}:{port}", flush=True)

    started = time.monotonic()
    last = [started]
    first_round: list[int] = []

    def round_done(record: dict[str, object]) -> None:
        acc = record.get("accuracy")
        acc_text = f"accuracy {acc:.4f}" if isinstance(acc, float) else "accuracy —"
        rnd = int(str(record["round"]))
        now = time.monotonic()
        took, last[0] = now - last[0], now
        first_round[:] = first_round or [rnd]
        per_round = (now - started) / (rnd - first_round[0] + 1)
        total = _rounds_of(out_dir, cfg)
        eta = f", ETA {per_round * max(0, total - rnd):.0f} s" if total > rnd else ""
        print(
            f"round {rnd}: {acc_text}, clients "
            f"{record['clients_succeeded']}/{record['clients_sampled']}, "
            f"rejected messages {record.get('rejected_messages', 0)}; "
            f"took {took:.1f} s, {rnd} of {total} rounds{eta}",
            flush=True,
        )

    # SIGTERM (systemd, docker stop) stops the server as Ctrl-C does: completed rounds
    # are kept and clients are told to wait for the server to be resumed.
    # Whom the server waits for, while it waits (rate-limited lines; see GrpcExecutor).
    logging.getLogger("fedloom.progress").setLevel(logging.INFO)
    dashboard = (
        ServerDashboard(out_dir, args.dashboard, args.dashboard_token_file)
        if args.dashboard
        else None
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run_server(
            cfg,
            out_dir,
            args.address,
            sec,
            resume=args.resume is not None,
            resume_overrides=args.overrides if args.resume is not None else (),
            on_round=round_done,
            on_listening=listening,
            on_registry=dashboard.on_registry if dashboard is not None else None,
        )
    except (TokenFileError, TimeoutError, OSError) as err:
        # One line and exit 2, as for any error the user can fix (fedloom.cli.main).
        raise ConfigError(str(err)) from None
    except KeyboardInterrupt:
        return interrupted(f"fedloom server --resume {out_dir} --address {args.address} ...")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if dashboard is not None:
            dashboard.stop()
    console.print(summary_table(summary))
    console.print(f"run directory: {out_dir}")
    return run_outcome(summary)


def _rounds_of(out_dir: Path, cfg: RunConfig) -> int:
    """The run's planned rounds: the stored config's (a resume may have changed them)."""
    try:
        return int(json.loads((out_dir / "config.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return cfg.rounds


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _token(args: argparse.Namespace) -> str:
    """The bearer token: from --token-file, --token or FEDLOOM_TOKEN (in that order)."""
    if args.token_file is not None:
        if args.token is not None:
            raise ConfigError("pass either --token or --token-file, not both")
        if not args.token_file.is_file():
            raise ConfigError(f"--token-file '{args.token_file}' does not exist; check the path")
        token = args.token_file.read_text().strip()
        if not token:
            raise ConfigError(f"--token-file '{args.token_file}' is empty")
        return token
    return args.token or os.environ.get("FEDLOOM_TOKEN", "")


def _cmd_client(args: argparse.Namespace) -> int:
    from fedloom.engine.grpc.client import (
        AppFactory,
        BuiltinApp,
        ClientRefusedError,
        Credentials,
        OwnDataApp,
        run_client,
    )
    from fedloom.engine.grpc.client_state import site_name

    if args.key_holder:
        if args.partition >= 0 or args.data is not None:
            raise ConfigError("the key holder trains nothing: drop --partition and --data")
        if args.min_contributors < 1:
            raise ConfigError(f"--min-contributors must be at least 1, got {args.min_contributors}")
    elif (args.partition < 0) == (args.data is None):
        raise ConfigError(
            "pass either --data PATH (this machine's data) or --partition K "
            "(partition K of the experiment's built-in data, for trials)"
        )
    if args.data is not None and not args.data.exists():
        raise ConfigError(f"--data '{args.data}' does not exist; check the path")
    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert and --key go together; pass both")
    for path in (args.root_cert, args.cert, args.key):
        if path is not None and not path.is_file():
            raise ConfigError(f"file '{path}' does not exist; check the path")
    if args.state_dir is not None and args.state_dir.exists() and not args.state_dir.is_dir():
        raise ConfigError(f"--state-dir '{args.state_dir}' is not a directory; pass a folder")
    token = _token(args)
    creds = Credentials(args.root_cert, args.cert, args.key, token, args.insecure)
    if not args.insecure and args.root_cert is None:
        logging.getLogger("fedloom.client").info("verifying the server against system CAs")
    stop = threading.Event()
    try:
        make_app: AppFactory
        if args.key_holder:
            make_app = partial(_key_holder_app, min_contributors=args.min_contributors)
        elif args.data is None:
            make_app = BuiltinApp
        else:
            make_app = partial(OwnDataApp, data_path=args.data)
        if args.attack is not None:
            make_app = partial(red_team_app, make_app, _red_team_attack(args))
        if args.rehearse_profile:
            if args.key_holder:
                raise ConfigError("the key holder trains nothing: drop --rehearse-profile")
            from fedloom.system.rehearsal import rehearsal_app

            make_app = partial(rehearsal_app, make_app)
        done = run_client(
            args.server,
            make_app,
            creds,
            partition=args.partition,
            name=args.name,
            max_wait_s=args.max_wait,
            stop=stop,
            role=KEY_HOLDER_ROLE if args.key_holder else "",
            state_dir=args.state_dir,
            site=site_name(args.partition, args.data),
            replace_stale=args.replace_stale,
        )
    except ClientRefusedError as err:
        print(f"fedloom: refused by the server: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ConnectionError as err:
        raise ConfigError(str(err)) from None
    except KeyboardInterrupt:
        stop.set()
        return EXIT_INTERRUPTED
    print(f"run over; this client completed {done} tasks", flush=True)
    return 0


def _red_team_attack(args: argparse.Namespace) -> dict[str, Any]:
    """The ``[attack]`` keys ``--attack`` and ``--attack-set`` give, checked up front."""
    if args.key_holder:
        raise ConfigError("the key holder trains nothing: drop --attack")
    tree = parse_overrides(args.attack_sets)
    tree["kind"] = args.attack
    try:
        attack = AttackConfig.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"--attack/--attack-set: attack.{key}: {first['msg']}") from None
    if attack.knowledge == "omniscient":
        raise ConfigError(
            "--attack-set knowledge=omniscient: a red-team client process cannot see the "
            "other clients' updates; omniscient attacks are simulation-only, use knowledge=own"
        )
    return tree


def red_team_app(inner: Any, attack: dict[str, Any], cfg: RunConfig, client_id: int) -> Any:
    """The app ``inner`` would build, with this client alone running ``attack``: the
    server's config is not changed, the server is not told."""
    red = cfg.model_copy(deep=True)
    red.attack = AttackConfig.model_validate({**attack, "clients": [client_id]})
    return inner(red, client_id)


def _key_holder_app(
    cfg: RunConfig, participant_id: int, *, min_contributors: int
) -> ParticipantApp:
    """CKKS's key holder: makes a key pair per round and decrypts only the sum.

    ``min_contributors`` is this operator's policy: sums of fewer client contributions
    are not decrypted. The deployment engine never imports the privacy package; the
    participant is built here and the client loop only hands it exchanges.
    """
    from fedloom.engine.grpc.client import ParticipantApp
    from fedloom.privacy.stages import CKKSAggregation, KeyHolderSide

    return ParticipantApp(
        protocol=CKKSAggregation.protocol,
        participant=KeyHolderSide(min_contributors=min_contributors),
    )


def _cmd_certs(args: argparse.Namespace, console: Console) -> int:
    from fedloom.engine.grpc.certs import make_dev_certs

    if args.revoke is not None:
        revoked = args.out_dir / "revoked.txt"
        if not (args.out_dir / f"{args.revoke}.pem").is_file():
            raise ConfigError(f"'{args.out_dir}' has no certificate for identity '{args.revoke}'")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        with revoked.open("a") as f:
            f.write(f"{args.revoke}\n")
        print(f"revoked identity '{args.revoke}': serve with --revoked {revoked}")
        return 0
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if len(set(clients)) != len(clients):
        raise ConfigError("--clients names an identity twice; each client has its own")
    if any(c in ("ca", "server") or any(x.isspace() or x == "/" for x in c) for c in clients):
        raise ConfigError("client identities cannot be 'ca' or 'server' or contain spaces or '/'")
    for path in make_dev_certs(args.out_dir, hosts, clients):
        console.print(str(path))
    for name in clients:
        console.print(f"identity '{name}': {args.out_dir / name}.pem (certificate CN)")
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from fedloom.engine.grpc.auth import (
        TokenFileError,
        add_token,
        identities,
        revoke_token,
        write_secret,
    )

    try:
        if args.list:
            for name in identities(args.tokens):
                print(name)
            return 0
        if args.revoke is not None:
            revoke_token(args.tokens, args.revoke)
            print(f"revoked the token of identity '{args.revoke}'", file=sys.stderr)
            return 0
        if args.name is None:
            raise ConfigError("name the identity the token is for: 'fedloom token NAME ...'")
        token = add_token(args.tokens, args.name)
    except TokenFileError as err:
        raise ConfigError(str(err)) from None
    if args.out is not None:
        write_secret(args.out, token + "\n")
        print(f"token of identity '{args.name}' written to {args.out}", file=sys.stderr)
    else:
        print(token)
    return 0
