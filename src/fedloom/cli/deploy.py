"""The deployment half of the ``fedloom`` command: server, client, certs, token.

Each command imports gRPC and the deployment engine when it runs, so the simulation
commands never import them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from functools import partial
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
    if args.command == "server":
        return _cmd_server(args, console)
    if args.command == "client":
        return _cmd_client(args)
    if args.command == "certs":
        return _cmd_certs(args, console)
    return _cmd_token(args)


def _cmd_server(args: argparse.Namespace, console: Console) -> int:
    from fedloom.engine.deploy import ServerSecurity, run_server
    from fedloom.engine.grpc.auth import TokenFileError
    from fedloom.report import summary_table

    cfg, out_dir = config_and_run_dir(args)
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
    )
    host = args.address.rsplit(":", 1)[0]

    def listening(port: int) -> None:
        print(f"fedloom server listening on {host}:{port}", flush=True)

    def round_done(record: dict[str, object]) -> None:
        acc = record.get("accuracy")
        acc_text = f"accuracy {acc:.4f}" if isinstance(acc, float) else "accuracy —"
        print(
            f"round {record['round']}: {acc_text}, clients "
            f"{record['clients_succeeded']}/{record['clients_sampled']}, "
            f"rejected messages {record.get('rejected_messages', 0)}",
            flush=True,
        )

    try:
        summary = run_server(
            cfg,
            out_dir,
            args.address,
            sec,
            resume=args.resume is not None,
            on_round=round_done,
            on_listening=listening,
        )
    except (TokenFileError, TimeoutError, OSError) as err:
        # One line and exit 2, as for any error the user can fix (fedloom.cli.main).
        raise ConfigError(str(err)) from None
    except KeyboardInterrupt:
        return interrupted(f"fedloom server --resume {out_dir} --address {args.address} ...")
    console.print(summary_table(summary))
    console.print(f"run directory: {out_dir}")
    return run_outcome(summary)


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
    token = args.token or os.environ.get("FEDLOOM_TOKEN", "")
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
        AttackConfig.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"--attack/--attack-set: attack.{key}: {first['msg']}") from None
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

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    for path in make_dev_certs(args.out_dir, hosts, clients):
        console.print(str(path))
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from fedloom.engine.grpc.auth import TokenFileError, add_token

    try:
        print(add_token(args.tokens, args.name))
    except TokenFileError as err:
        raise ConfigError(str(err)) from None
    return 0
