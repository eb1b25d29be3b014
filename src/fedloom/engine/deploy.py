"""``fedloom server``: the same run as the simulation, with clients in other processes.

The run itself (store, rounds, checkpoints, resume, outputs) is
:func:`fedloom.engine.simulation.run_federation`; this module only supplies the
executor: a gRPC service that connected clients pull tasks from.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fedloom.client.learner import Learner
from fedloom.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    merge_trees,
    parse_overrides,
)
from fedloom.data.base import FederatedDataset
from fedloom.engine.grpc import max_message_bytes
from fedloom.engine.grpc.auth import TokenStore
from fedloom.engine.grpc.server import (
    DeployOptions,
    FederationServicer,
    GrpcExecutor,
    IdentityBook,
    Registry,
    RevocationList,
    start_grpc_server,
)
from fedloom.engine.simulation import RoundCallback, Wiring, run_federation
from fedloom.exchange import ExchangeRequest
from fedloom.messages import Broadcast, ClientFailure, EvalResult, EvalTask, FitResult, FitTask
from fedloom.store import RunStore, atomic_write

log = logging.getLogger("fedloom.deploy")

#: In the run directory: which client id each identity holds (kept across resumes).
IDENTITIES_FILE = "identities.json"


@dataclass
class ServerSecurity:
    """TLS material and client authentication for ``fedloom server``."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    tokens: Path | None = None
    insecure: bool = False
    #: Serve clients that authenticate neither by token nor by certificate off loopback.
    allow_anonymous: bool = False
    #: Identities whose credentials are revoked (``fedloom certs --revoke``), one a line.
    revoked: Path | None = None
    #: Per role a strategy may need besides the clients (CKKS's ``key-holder``): the
    #: authenticated name (token owner or certificate common name) that may register for
    #: it; anyone else asking for the role is refused. A role not listed here may be
    #: taken only under its own name.
    role_names: dict[str, str] = field(default_factory=dict)


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` listens on loopback only: ``localhost`` or a loopback IP.

    The host is parsed as an IP address, never matched by prefix: "127.evil.example.com"
    is a name anyone can point anywhere, not loopback.
    """
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_client_authentication(address: str, sec: ServerSecurity) -> bool:
    """A server must know who its clients are, unless it listens on loopback only.

    Without tokens or a client CA anyone who reaches the port can register, take a
    client's place and read the global model. On loopback that is a trial; elsewhere
    it needs ``--allow-anonymous``. Returns whether clients are anonymous (then the
    server warns loudly once it listens: :func:`warn_anonymous`).
    """
    if sec.tokens is not None or sec.client_ca is not None:
        return False
    if not is_loopback(address) and not sec.allow_anonymous:
        raise ConfigError(
            f"address {address} is not loopback and clients would not authenticate: pass "
            "--tokens FILE (see 'fedloom token') or --client-ca, or --allow-anonymous"
        )
    return True


def warn_anonymous(address: str) -> None:
    log.warning(
        "NO CLIENT AUTHENTICATION: anyone who reaches %s can register as a client; "
        "pass --tokens or --client-ca",
        address,
    )


def server_credentials(address: str, sec: ServerSecurity) -> grpc.ServerCredentials | None:
    """TLS unless explicitly insecure; plaintext is allowed silently only on loopback."""
    if sec.tls_cert is None and sec.tls_key is None:
        loopback = is_loopback(address)
        if not (sec.insecure or loopback):
            raise ConfigError(
                f"address {address} is not loopback: pass --tls-cert and --tls-key "
                "(make them with 'fedloom certs DIR'), or --insecure to serve plaintext"
            )
        if not loopback:
            log.warning("serving PLAINTEXT on %s (--insecure)", address)
        return None
    if sec.tls_cert is None or sec.tls_key is None:
        raise ConfigError("--tls-cert and --tls-key go together; pass both")
    for path in (sec.tls_cert, sec.tls_key, sec.client_ca):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file '{path}' does not exist; check the path")
    assert sec.tls_cert is not None and sec.tls_key is not None
    return grpc.ssl_server_credentials(
        [(sec.tls_key.read_bytes(), sec.tls_cert.read_bytes())],
        root_certificates=sec.client_ca.read_bytes() if sec.client_ca else None,
        require_client_auth=sec.client_ca is not None,
    )


class DeploymentExecutor:
    """Owns the gRPC server for the duration of the run; delegates to :class:`GrpcExecutor`.

    Built from the run's :class:`~fedloom.engine.simulation.Wiring`: the experiment's
    config, model size, expected uploads and the roles the strategy needs.
    """

    def __init__(
        self,
        wiring: Wiring,
        address: str,
        sec: ServerSecurity,
        on_listening: Callable[[int], None] | None = None,
        run_dir: Path | None = None,
        on_registry: Callable[[Registry], None] | None = None,
    ) -> None:
        cfg = wiring.cfg
        self.options = DeployOptions.from_config(cfg.deploy)
        self.min_clients = cfg.server.min_fit_clients
        anonymous = check_client_authentication(address, sec)
        self.registry = Registry(
            wiring.data.num_clients,
            wiring.runtime.learner.binding.spec.size,
            cfg.model_dump_json(),
            upload_sizes=wiring.upload_sizes,
            run_id=wiring.run_id,
            roles=wiring.roles,
            authorized=sec.role_names,
            # Which client id each identity holds: kept with the run, so a resumed
            # server gives every site its id again.
            book=IdentityBook(run_dir / IDENTITIES_FILE if run_dir is not None else None),
            options=self.options,
        )
        tokens = TokenStore(sec.tokens) if sec.tokens is not None else None
        revoked = RevocationList(sec.revoked) if sec.revoked is not None else None
        servicer = FederationServicer(self.registry, self.options, tokens, revoked)
        self.server, self.port = start_grpc_server(
            servicer,
            address,
            server_credentials(address, sec),
            max_workers=cfg.deploy.max_workers,
            max_calls=cfg.deploy.max_concurrent_calls,
            max_message_bytes=max_message_bytes(cfg.deploy.chunk_bytes),
        )
        log.info("listening on port %d", self.port)
        if anonymous:
            warn_anonymous(address)
        if on_listening is not None:
            on_listening(self.port)
        if on_registry is not None:
            # An observer's seam (the dashboard reads Registry.status_snapshot); the
            # rounds never call it.
            on_registry(self.registry)
        self.inner = GrpcExecutor(self.registry, self.options)

    def available_clients(self) -> Sequence[int]:
        self.inner.wait_for_clients(self.min_clients)
        return self.inner.available_clients()

    def connected_clients(self) -> Sequence[int]:
        return self.inner.connected_clients()

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast
    ) -> list[FitResult | ClientFailure]:
        return self.inner.fit(tasks, broadcast)

    def submit_fit(self, tasks: Sequence[FitTask], broadcast: Broadcast) -> None:
        self.inner.submit_fit(tasks, broadcast)

    def fit_completed(self, *, wait_s: float) -> list[FitResult | ClientFailure]:
        return self.inner.fit_completed(wait_s=wait_s)

    def evaluate(
        self, tasks: Sequence[EvalTask], broadcast: Broadcast
    ) -> list[EvalResult | ClientFailure]:
        return self.inner.evaluate(tasks, broadcast)

    def exchange(self, request: ExchangeRequest, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        return self.inner.exchange(request, outgoing)

    def round_metrics(self) -> dict[str, Any]:
        return self.inner.round_metrics()

    def save_client_state(self) -> dict[str, Any]:
        """Deployed clients keep their own state on their machines."""
        return self.inner.save_client_state()

    def load_client_state(self, manifest: Mapping[str, Any]) -> None:
        self.inner.load_client_state(manifest)

    def close(self) -> None:
        """Tell every client the run is over (their next poll), then stop serving.

        Closed while an exception propagates (Ctrl-C, SIGTERM, a timeout), the run is
        not over: clients are told to wait for the server to be resumed instead.
        """
        paused = sys.exc_info()[0] is not None
        if paused:
            log.warning("stopping: clients are told to wait for the server to be resumed")
        self.inner.close(wait=True, pause=paused)
        self.server.stop(grace=2.0).wait(5.0)


def update_stored_config(out_dir: Path, overrides: Sequence[str]) -> None:
    """Apply ``KEY=VALUE`` overrides to the config a run directory holds (validated)."""
    store = RunStore.open(out_dir)
    try:
        tree = merge_trees(store.config(), parse_overrides(list(overrides)))
        cfg = config_from_dict(tree)
        done = max((int(r["round"]) for r in store.history()), default=0)
        if cfg.rounds < done:
            raise ConfigError(
                f"rounds={cfg.rounds} is below the {done} rounds this run already completed"
            )
        store.set_meta("config", cfg.to_dict())
        atomic_write(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    finally:
        store.close()
    log.warning("resuming with %s", ", ".join(overrides))


def deploy_federation(
    cfg: RunConfig,
    out_dir: Path,
    address: str,
    sec: ServerSecurity,
    *,
    data: FederatedDataset,
    learner_factory: Callable[[], Learner],
    on_listening: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Serve a user's own model (the Python API's ``fedloom.serve``): ``data`` names the
    clients (the server holds none of their examples) and the server's test set."""

    def factory(wiring: Wiring) -> DeploymentExecutor:
        return DeploymentExecutor(wiring, address, sec, on_listening, run_dir=out_dir)

    return run_federation(
        cfg,
        out_dir,
        factory,
        deployment=True,
        data=data,
        learner_factory=learner_factory,
    )


def run_server(
    cfg: RunConfig,
    out_dir: Path,
    address: str,
    sec: ServerSecurity,
    resume: bool = False,
    on_round: RoundCallback | None = None,
    on_listening: Callable[[int], None] | None = None,
    resume_overrides: Sequence[str] = (),
    on_registry: Callable[[Registry], None] | None = None,
) -> dict[str, Any]:
    """Serve the experiment to connecting clients until its last round; write the run dir.

    ``resume_overrides`` (``KEY=VALUE``, keys in
    :data:`~fedloom.engine.grpc.RESUMABLE_SETTINGS`) change the stored config of a
    resumed run before it continues: more rounds, other timeouts. ``on_registry`` gets
    the session registry once the server listens (for a read-only observer).
    """
    if resume and resume_overrides:
        update_stored_config(out_dir, resume_overrides)

    def factory(wiring: Wiring) -> DeploymentExecutor:
        return DeploymentExecutor(
            wiring, address, sec, on_listening, run_dir=out_dir, on_registry=on_registry
        )

    return run_federation(cfg, out_dir, factory, resume=resume, on_round=on_round, deployment=True)
