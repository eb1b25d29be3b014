"""``fedloom party``: vertical FL between real party processes (``fedloom.vertical.party``).

    fedloom party --role label CONFIG --address HOST:PORT --tls-cert ... --client-ca ...
    fedloom party --role features --party K --server HOST:PORT --root-cert ... --cert ...
    fedloom party --export-tables DIR CONFIG     (the config's data as each party's CSV)

The label party serves and records the run (a run directory as ``fedloom run`` writes);
each feature party dials it, as ``fedloom client`` dials ``fedloom server``, with the
same credentials: ``fedloom certs`` certificates (the common name is the party's
identity) or ``fedloom token`` tokens. gRPC and the deployment's TLS helpers are
imported only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from fedloom import __version__
from fedloom.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILED,
    EXIT_USER_ERROR,
    add_credential_arguments,
    add_overrides_argument,
)
from fedloom.config import ConfigError, load_config

if TYPE_CHECKING:
    import grpc

#: Where the label party keeps which identity holds which party slot (kept with the run).
PARTIES_FILE = "parties.json"


def add_party_parser(sub: Any) -> None:
    p = sub.add_parser(
        "party",
        help="take part in a vertical FL run (mode = 'vertical') as the label or a feature party",
    )
    p.add_argument(
        "config", nargs="?", type=Path, help="label party / --export-tables: TOML config"
    )
    p.add_argument("--role", choices=("label", "features"), help="which party this process is")
    p.add_argument(
        "--party", type=int, default=-1, help="features: this party's slot K (0, 1, ...)"
    )
    p.add_argument(
        "--data",
        type=Path,
        help="this party's own CSV (id, then label or its feature columns); "
        "default: its share of the config's built-in data set (trials)",
    )
    add_overrides_argument(p, help="label party: override a config key (repeatable)")
    p.add_argument(
        "--out", type=Path, help="run directory (label) / where to save the bottom model"
    )
    p.add_argument("--export-tables", type=Path, metavar="DIR", help="write each party's CSV, exit")
    # label party: serving
    p.add_argument("--address", default="127.0.0.1:8444", help="label: HOST:PORT (port 0: any)")
    add_credential_arguments(
        p,
        serving=True,
        help={
            "--tls-cert": "label: server certificate (PEM)",
            "--tls-key": "label: server private key (PEM)",
            "--client-ca": "label: require party certificates of this CA",
            "--tokens": "label: hashed bearer tokens ('fedloom token')",
        },
    )
    p.add_argument(
        "--parties",
        help="label: NAME0,NAME1,...: the identity that may take each feature-party slot "
        "(default: the first identity to claim a slot keeps it for the run)",
    )
    p.add_argument("--wait-for-parties", type=float, default=600.0, metavar="S")
    p.add_argument(
        "--step-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="stop the run when a party sends no reply for S seconds (default 300)",
    )
    # feature party: dialling
    p.add_argument("--server", help="features: HOST:PORT of the label party")
    add_credential_arguments(
        p,
        serving=False,
        help={
            "--root-cert": "features: CA that signed the label party's",
            "--cert": "features: this party's certificate (mutual TLS)",
            "--key": "features: this party's private key",
            "--token-file": "features: read the bearer token here",
        },
    )
    p.add_argument("--max-wait", type=float, default=300.0, help="features: reach the label party")
    p.add_argument("--insecure", action="store_true", help="plaintext (loopback trials)")
    p.add_argument("-v", "--verbose", action="store_true")


def cmd_party(args: argparse.Namespace, console: Console) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    logging.getLogger("fedloom.vertical").setLevel(logging.INFO)
    if args.export_tables is not None:
        from fedloom.vertical.party import write_tables

        if args.config is None:
            raise ConfigError("--export-tables needs the run's CONFIG")
        cfg = load_config(args.config, args.overrides)
        _check_mode(cfg.mode)
        for path in write_tables(cfg, args.export_tables):
            console.print(str(path))
        return 0
    if args.role == "label":
        return _label(args, console)
    if args.role == "features":
        return _features(args)
    raise ConfigError("pass --role label or --role features (or --export-tables DIR CONFIG)")


def _check_mode(mode: str) -> None:
    if mode != "vertical":
        raise ConfigError(f"fedloom party runs mode = 'vertical' configs; this one is '{mode}'")


def _label(args: argparse.Namespace, console: Console) -> int:
    import numpy as np

    from fedloom.engine.deploy import (
        ServerSecurity,
        check_client_authentication,
        server_credentials,
        warn_anonymous,
    )
    from fedloom.engine.grpc.auth import TokenFileError, TokenStore
    from fedloom.engine.simulation import write_outputs
    from fedloom.report import summary_table
    from fedloom.store import RunStore
    from fedloom.vertical.party import LabelRun, builtin_data, read_table, run_label_party
    from fedloom.vertical.transport import HubSettings, PartyDroppedError, PartyHub

    if args.config is None:
        raise ConfigError("the label party needs the run's CONFIG")
    cfg = load_config(args.config, args.overrides)
    _check_mode(cfg.mode)
    v = cfg.vertical
    if args.data is not None:
        table = read_table(args.data, label=True)
        assert table.labels is not None
        num_classes = int(table.labels.max()) + 1 if len(table.labels) else 0
    else:
        data = builtin_data(cfg)
        table, num_classes = data.label_party, data.num_classes
    pinned: dict[int, str] = {}
    if args.parties:
        names = [n.strip() for n in args.parties.split(",")]
        if len(names) != v.feature_parties or len(set(names)) != len(names) or "" in names:
            raise ConfigError(
                f"--parties names {len(names)} identities; give {v.feature_parties} distinct ones"
            )
        pinned = dict(enumerate(names))
    sec = ServerSecurity(args.tls_cert, args.tls_key, args.client_ca, args.tokens, args.insecure)
    anonymous = check_client_authentication(args.address, sec)
    creds = server_credentials(args.address, sec)
    try:
        tokens = TokenStore(args.tokens) if args.tokens is not None else None
    except TokenFileError as err:
        raise ConfigError(str(err)) from None
    authenticate = _authenticator(mtls=args.client_ca is not None, tokens=tokens)
    out_dir = args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    store = RunStore.create(out_dir, cfg.to_dict(), __version__)
    config_json = cfg.model_dump_json()
    hub = PartyHub(
        HubSettings(
            parties=v.feature_parties,
            welcome=lambda k: {"config": config_json, "party": k},
            authenticate=authenticate,
            pinned=pinned,
            book=out_dir / PARTIES_FILE,
        )
    )
    try:
        port = hub.start(args.address, creds)
    except OSError as err:
        raise ConfigError(str(err)) from None
    host = args.address.rsplit(":", 1)[0]
    print(f"fedloom label party listening on {host}:{port}", flush=True)
    if anonymous:
        warn_anonymous(args.address)

    def round_done(record: dict[str, Any]) -> None:
        print(
            f"round {record['round']}: accuracy {record['accuracy']:.4f}, "
            f"loss {record['loss']:.4f}, {record['steps']} steps, "
            f"{record['wire_bytes_up']} B up / {record['wire_bytes_down']} B down; "
            f"took {record['round_s']:.2f} s",
            flush=True,
        )

    status = LabelRun()
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    failure: str | None = None
    participation = None
    try:
        participation = run_label_party(
            cfg,
            store,
            hub,
            table,
            num_classes=num_classes,
            wait_s=args.wait_for_parties,
            step_timeout_s=args.step_timeout,
            status=status,
            on_round=round_done,
        )
    except PartyDroppedError as err:
        where = f"in round {status.round}" if status.round else f"during {status.stage}"
        failure = (
            f"{err} {where}; vertical FL cannot train without its columns, so the run "
            f"stopped (completed rounds are kept in {out_dir})"
        )
        store.record_failure(status.round, err.party, str(err), "")
        store.set_meta("stopped_reason", failure)
    except TimeoutError as err:
        failure = str(err)
        store.set_meta("stopped_reason", failure)
    except KeyboardInterrupt:
        store.set_meta("stopped_reason", "interrupted")
        failure = "interrupted"
    finally:
        signal.signal(signal.SIGTERM, previous)
        hub.close()
        store.set_meta("wall_s", time.perf_counter() - started)
        if hub.rejections.counts:
            store.set_meta("rejected_messages", hub.rejections.counts)
    n = 1 + v.feature_parties
    summary = write_outputs(
        store, out_dir, cfg, n, participation if participation is not None else np.zeros(n)
    )
    store.close()
    if failure == "interrupted":
        print("fedloom: interrupted; completed rounds are kept in " + str(out_dir), file=sys.stderr)
        return EXIT_INTERRUPTED
    if failure is not None:
        print(f"fedloom: run failed: {failure}", file=sys.stderr)
        return EXIT_RUN_FAILED
    console.print(summary_table(summary))
    console.print(f"run directory: {out_dir}")
    return 0


def _authenticator(*, mtls: bool, tokens: Any) -> Any:
    """The caller's identity: its certificate's common name under mutual TLS, its
    token's name with tokens (both: they must agree), "" when neither is configured."""

    def authenticate(context: grpc.ServicerContext) -> str | None:
        name: str | None = ""
        if mtls:
            names = context.auth_context().get("x509_common_name") or []
            name = names[0].decode() if names else None
            if name is None:
                return None
        if tokens is not None:
            meta = {k: v for k, v in context.invocation_metadata()}
            auth = str(meta.get("authorization", ""))
            holder = tokens.check(auth[7:]) if auth.startswith("Bearer ") else None
            if holder is None or (mtls and holder != name):
                return None
            name = holder
        return name

    return authenticate


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _features(args: argparse.Namespace) -> int:
    import grpc

    from fedloom.vertical.party import FeatureWorker, LabelPartyStoppedError, read_table
    from fedloom.vertical.transport import LabelConnection, LabelRefusedError

    if args.party < 0:
        raise ConfigError("a feature party needs --party K (its slot: 0, 1, ...)")
    if not args.server:
        raise ConfigError("a feature party needs --server HOST:PORT (the label party)")
    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert and --key go together; pass both")
    for path in (args.root_cert, args.cert, args.key, args.token_file):
        if path is not None and not path.is_file():
            raise ConfigError(f"file '{path}' does not exist; check the path")
    table = read_table(args.data, label=False) if args.data is not None else None
    token = (
        args.token_file.read_text().strip()
        if args.token_file
        else os.environ.get("FEDLOOM_TOKEN", "")
    )
    creds = None
    if not args.insecure:
        creds = grpc.ssl_channel_credentials(
            root_certificates=args.root_cert.read_bytes() if args.root_cert else None,
            private_key=args.key.read_bytes() if args.key else None,
            certificate_chain=args.cert.read_bytes() if args.cert else None,
        )
    conn = LabelConnection(args.server, creds, token=token)
    worker = FeatureWorker(
        args.party, table, args.out, on_event=lambda line: print(line, flush=True)
    )
    try:
        conn.wait_ready(args.max_wait)
        conn.serve(args.party, f"party-{args.party}", worker.answer)
    except LabelRefusedError as err:
        print(f"fedloom: refused by the label party: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except LabelPartyStoppedError as err:
        print(f"fedloom: run failed: {err}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except ConnectionError as err:
        print(f"fedloom: run failed: {err}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        conn.close()
    if worker.failure is not None:
        print(f"fedloom: run failed: this party {worker.failure}", file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0
