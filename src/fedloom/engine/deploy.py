"""``fedloom server``: the same run as the simulation, with clients in other processes.

The run itself (store, rounds, checkpoints, resume, outputs) is
:func:`fedloom.engine.simulation.run_federation`; this module only supplies the
executor: a gRPC service that connected clients pull tasks from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedloom.client.trainer import LocalTrainer
from fedloom.config import ConfigError, RunConfig
from fedloom.engine.grpc import max_message_bytes
from fedloom.engine.grpc.auth import TokenStore
from fedloom.engine.grpc.server import (
    DeployOptions,
    FederationServicer,
    GrpcExecutor,
    Registry,
    start_grpc_server,
)
from fedloom.engine.simulation import RoundCallback, run_federation
from fedloom.messages import ClientFailure, EvalResult, EvalTask, FitResult, FitTask
from fedloom.privacy.secagg import SecAggConfig
from fedloom.privacy.secagg.transport import SecureSum

log = logging.getLogger("fedloom.deploy")


@dataclass
class ServerSecurity:
    """TLS material and client authentication for ``fedloom server``."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    tokens: Path | None = None
    insecure: bool = False
    #: CKKS runs: the authenticated name (token owner or certificate common name) the
    #: key holder must register under; anyone else asking for the role is refused.
    key_holder_name: str = "key-holder"


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


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
    """Owns the gRPC server for the duration of the run; delegates to :class:`GrpcExecutor`."""

    def __init__(
        self,
        cfg: RunConfig,
        trainer: LocalTrainer,
        address: str,
        sec: ServerSecurity,
        on_listening: Callable[[int], None] | None = None,
    ) -> None:
        self.options = DeployOptions.from_config(cfg.deploy)
        self.min_clients = cfg.server.min_fit_clients
        ckks = cfg.privacy.secure_aggregation == "ckks"
        self.registry = Registry(
            trainer.data.num_clients,
            trainer.num_parameters,
            cfg.model_dump_json(),
            key_holder_name=sec.key_holder_name if ckks else None,
        )
        tokens = TokenStore(sec.tokens) if sec.tokens is not None else None
        servicer = FederationServicer(self.registry, self.options, tokens)
        self.server, self.port = start_grpc_server(
            servicer,
            address,
            server_credentials(address, sec),
            max_workers=cfg.deploy.max_workers,
            max_message_bytes=max_message_bytes(cfg.deploy.chunk_bytes),
        )
        log.info("listening on port %d", self.port)
        if on_listening is not None:
            on_listening(self.port)
        self.inner = GrpcExecutor(self.registry, self.options, cfg.privacy.secure_aggregation)

    def available_clients(self) -> Sequence[int]:
        self.inner.wait_for_clients(self.min_clients)
        return self.inner.available_clients()

    def connected_clients(self) -> Sequence[int]:
        return self.inner.available_clients()

    def fit(
        self, tasks: Sequence[FitTask], global_vector: np.ndarray
    ) -> list[FitResult | ClientFailure]:
        return self.inner.fit(tasks, global_vector)

    def evaluate(
        self, tasks: Sequence[EvalTask], global_vector: np.ndarray
    ) -> list[EvalResult | ClientFailure]:
        return self.inner.evaluate(tasks, global_vector)

    def round_metrics(self) -> dict[str, Any]:
        return self.inner.round_metrics()

    def client_state(self) -> dict[str, Any]:
        """Deployed clients keep their own state on their machines."""
        return {}

    def restore_client_state(self, state: dict[str, Any]) -> None:
        return None

    def secure_sum(
        self, rnd: int, client_ids: Sequence[int], vector_length: int, config: SecAggConfig
    ) -> SecureSum:
        return self.inner.secure_sum(rnd, client_ids, vector_length, config)

    def close(self) -> None:
        """Tell every client the run is over (their next poll), then stop serving."""
        self.inner.close(wait=True)
        self.server.stop(grace=2.0).wait(5.0)


def run_server(
    cfg: RunConfig,
    out_dir: Path,
    address: str,
    sec: ServerSecurity,
    resume: bool = False,
    on_round: RoundCallback | None = None,
    on_listening: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Serve the experiment to connecting clients until its last round; write the run dir."""

    def factory(run_cfg: RunConfig, trainer: LocalTrainer) -> DeploymentExecutor:
        return DeploymentExecutor(run_cfg, trainer, address, sec, on_listening)

    return run_federation(cfg, out_dir, factory, resume=resume, on_round=on_round)
