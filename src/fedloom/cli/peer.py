"""``fedloom peer``: one gossip peer process (``mode = "gossip"`` with no simulator).

Wiring only (gRPC, torch and the engine are imported when the command runs): the
peer's data partition, model and client runtime (as a deployed client builds them), its
TLS credentials and identity check (the deployment's rules: mutual-TLS certificate name
or bearer token), then :class:`~fedloom.gossip.peer.GossipPeer`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from math import nan
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from fedloom.cli.common import EXIT_INTERRUPTED, add_credential_arguments, config_and_run_dir
from fedloom.config import ConfigError

if TYPE_CHECKING:
    import grpc
    import numpy as np

log = logging.getLogger("fedloom.gossip.peer")


def add_peer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", dest="peer_id", type=int, required=True, help="this peer's id")
    p.add_argument(
        "--peers",
        required=True,
        help="every peer of the run: a file of 'ID HOST:PORT [IDENTITY]' lines, or "
        "0=HOST:PORT,1=HOST:PORT,... (identity default: peer-ID)",
    )
    p.add_argument("--listen", help="HOST:PORT to bind (default: this peer's address in --peers)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/NAME-peer-ID-TIMESTAMP)")
    add_credential_arguments(
        p,
        serving=True,
        omit=("--client-ca",),
        help={
            "--tls-cert": "certificate this peer serves with (PEM)",
            "--tls-key": "its private key (PEM)",
            "--tokens": "hashed tokens of the peers (see 'fedloom token')",
        },
    )
    add_credential_arguments(
        p,
        serving=False,
        help={
            "--root-cert": "CA that signed every peer's certificates",
            "--cert": "this peer's identity certificate (CN = identity)",
            "--key": "its private key",
            "--token-file": "this peer's own bearer token",
        },
    )
    p.add_argument(
        "--server-name",
        help="the name the peers' serving certificate is issued for, if not "
        "their host (e.g. 'localhost')",
    )
    p.add_argument("--insecure", action="store_true", help="plaintext (loopback trials)")
    p.add_argument(
        "--round-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a live neighbour's model in a round (default 60)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the neighbours to listen before round 1 (default 120)",
    )
    p.add_argument("-v", "--verbose", action="store_true")


def _identify(
    args: argparse.Namespace,
) -> Callable[[grpc.ServicerContext], str | None]:
    """Who is calling: the certificate's common name (mutual TLS), or the token's name;
    with both configured, both must name the same peer."""
    from fedloom.engine.grpc.auth import TokenStore

    tokens = TokenStore(args.tokens) if args.tokens is not None else None
    mtls = args.cert is not None

    def identify(context: grpc.ServicerContext) -> str | None:
        names: list[str | None] = []
        if mtls:
            cns = context.auth_context().get("x509_common_name") or []
            names.append(cns[0].decode() if len(cns) == 1 else None)
        if tokens is not None:
            bearer = dict(context.invocation_metadata()).get("authorization", "")
            token = str(bearer).removeprefix("Bearer ")
            names.append(tokens.check(token) if token else None)
        return names[0] if names and all(n == names[0] for n in names) else None

    return identify


def _credentials(
    args: argparse.Namespace, listen: str
) -> tuple[grpc.ServerCredentials | None, grpc.ChannelCredentials | None, str | None]:
    import grpc

    from fedloom.engine.deploy import ServerSecurity, is_loopback, server_credentials

    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert and --key go together; pass both")
    if args.cert is not None and args.root_cert is None:
        raise ConfigError("--cert needs --root-cert (the CA that signed the peers' certificates)")
    if args.cert is None and args.tokens is None:
        raise ConfigError(
            "a peer must prove who it is: pass --cert/--key (mutual TLS, CN = its identity) "
            "or --tokens FILE with --token-file"
        )
    for path in (args.cert, args.key, args.root_cert, args.tokens, args.token_file):
        if path is not None and not path.is_file():
            raise ConfigError(f"file '{path}' does not exist; check the path")
    if args.tokens is not None and args.token_file is None:
        raise ConfigError("--tokens checks the other peers' tokens; pass --token-file for its own")
    sec = ServerSecurity(
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        client_ca=args.root_cert if args.cert is not None else None,
        insecure=args.insecure,
    )
    server = server_credentials(listen, sec)
    token = args.token_file.read_text().strip() if args.token_file is not None else None
    if args.root_cert is None:
        if not (args.insecure or is_loopback(listen)):
            raise ConfigError("pass --root-cert to reach the other peers over TLS, or --insecure")
        return server, None, token
    channel = grpc.ssl_channel_credentials(
        root_certificates=args.root_cert.read_bytes(),
        private_key=args.key.read_bytes() if args.key is not None else None,
        certificate_chain=args.cert.read_bytes() if args.cert is not None else None,
    )
    return server, channel, token


def cmd_peer(
    args: argparse.Namespace,
    console: Console,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Run one peer to its last round; ``on_round`` sees each stored record (tests hold a
    peer there to kill it mid-run)."""
    import numpy as np
    import torch

    from fedloom import __version__
    from fedloom.client_store import ClientState
    from fedloom.data import build_federated_dataset
    from fedloom.gossip.peer import GossipPeer, PeerSettings, neighbour_check
    from fedloom.gossip.transport import (
        Inbox,
        MessageLedger,
        Neighbours,
        PeerService,
        parse_peers,
        start_peer_server,
    )
    from fedloom.messages import DELTA, DROP_STRAGGLERS, GLOBAL, FitTask
    from fedloom.report import summarize_history
    from fedloom.store import RunStore
    from fedloom.strategies import build_client_runtime, build_learner, check_composition

    args.resume = None
    cfg, default_dir = config_and_run_dir(args)
    if cfg.mode != "gossip":
        raise ConfigError('fedloom peer runs gossip experiments; set mode = "gossip"')
    check_composition(cfg)
    try:
        peers = parse_peers(args.peers)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    me = args.peer_id
    if me not in peers:
        raise ConfigError(f"--id {me} is not in --peers (ids 0..{len(peers) - 1})")
    torch.set_num_threads(cfg.engine.torch_threads)
    data = build_federated_dataset(cfg.data, cfg.seed)
    if data.num_clients != len(peers):
        raise ConfigError(
            f"--peers lists {len(peers)} peers but the data has {data.num_clients} partitions; "
            f"set data.num_clients = {len(peers)}"
        )
    listen = args.listen or peers[me].address
    server_creds, channel_creds, token = _credentials(args, listen)
    learner = build_learner(cfg, data)
    runtime = build_client_runtime(
        cfg, learner, lambda cid: data.clients[cid], num_clients=data.num_clients
    )
    dimension = learner.binding.spec.size
    state = ClientState()

    def train(rnd: int, model: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        task = FitTask(
            client_id=me,
            round=rnd,
            model_version=rnd - 1,
            config={DROP_STRAGGLERS: cfg.server.drop_stragglers},
        )
        result = runtime.fit(task, {GLOBAL: model}, state)
        delta = result.vectors.get(DELTA)
        if delta is None or delta.shape != model.shape or not np.all(np.isfinite(delta)):
            log.warning(
                "peer %d: round %d's training gave no usable update; kept its model", me, rnd
            )
            return model.copy(), {}
        return (model + delta).astype(np.float32), dict(result.metrics)

    out_dir = args.out or default_dir.with_name(
        f"{cfg.name}-peer-{me}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    ledger = MessageLedger()
    inbox = Inbox(lookahead=4)
    settings = PeerSettings(
        peer_id=me,
        num_peers=len(peers),
        rounds=cfg.rounds,
        topology=cfg.gossip.topology,
        seed=cfg.seed,
        edge_probability=cfg.gossip.edge_probability,
        time_varying=cfg.gossip.time_varying,
        round_timeout_s=args.round_timeout,
        start_timeout_s=args.start_timeout,
    )
    service = PeerService(
        peer_id=me,
        dimension=dimension,
        inbox=inbox,
        ledger=ledger,
        peers=peers,
        identify=_identify(args),
        is_neighbour=neighbour_check(settings),
    )
    try:
        server, port = start_peer_server(listen, service, server_creds)
    except OSError as err:
        raise ConfigError(f"{err}; choose another --listen address") from None
    print(f"peer {me} listening on {listen.rsplit(':', 1)[0]}:{port}", flush=True)
    try:
        store = RunStore.create(out_dir, cfg.to_dict(), __version__)
    except BaseException:
        server.stop(grace=None)
        raise
    store.set_meta(
        "gossip_peer",
        {"peer_id": me, "address": peers[me].address, "peers": len(peers)},
    )
    neighbours = Neighbours(
        peers,
        own_id=me,
        credentials=channel_creds,
        token=token,
        server_name=args.server_name,
        dimension=dimension,
    )

    def announce(record: dict[str, Any]) -> None:
        print(
            f"peer {me} round {record['round']}: accuracy {record.get('accuracy', nan):.4f}"
            f" heard {record['neighbours_heard']}/{record['neighbours']}"
            f" missing {record['neighbours_missing']}",
            flush=True,
        )
        if on_round is not None:
            on_round(record)

    peer = GossipPeer(
        settings=settings,
        neighbours=neighbours,
        inbox=inbox,
        ledger=ledger,
        train=train,
        evaluate=lambda v: learner.evaluate(v, data.test, cfg.eval.batch_size),
        store=store,
        initial=learner.initial_vector(),
        on_round=announce,
    )
    started = time.perf_counter()
    try:
        history = peer.run()
    except KeyboardInterrupt:
        print(
            f"fedloom: peer {me} interrupted; its rounds so far are in {out_dir}", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    finally:
        server.stop(grace=None)
        neighbours.close()
    summary = {
        **summarize_history(history, cfg.target_accuracy),
        "partial": False,
        "outcome": "completed",
        "wall_s": time.perf_counter() - started,
        "gossip_peer": {"peer_id": me, "rejected": ledger.snapshot()},
    }
    store.write_summary(summary)
    store.write_history_csv(history)
    store.close()
    final = history[-1] if history else {}
    print(
        f"peer {me} finished {len(history)} rounds: accuracy {final.get('accuracy', nan):.4f}"
        f"; run directory {out_dir}",
        flush=True,
    )
    return 0
