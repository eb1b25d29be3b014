"""TLS failures name their cause at once (not "unreachable" after --max-wait)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from fedloom.engine.grpc.certs import make_dev_certs
from fedloom.engine.grpc.client import BuiltinApp, ClientRefusedError, Credentials, run_client
from fedloom.engine.grpc.server import (
    DeployOptions,
    FederationServicer,
    Registry,
    start_grpc_server,
)
from fedloom.engine.grpc.tls_check import diagnose_tls

from .deploy_helpers import free_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tls")
    make_dev_certs(base / "ok", ["localhost", "127.0.0.1"], ["site-a"])
    make_dev_certs(base / "other", ["localhost", "127.0.0.1"], ["site-x"])
    make_dev_certs(base / "named", ["server.example"], [])
    make_dev_certs(base / "old", ["localhost", "127.0.0.1"], [], days=0)  # expires at once
    return base


@contextmanager
def _server(pki: Path, which: str | None, client_ca: bool = False) -> Iterator[int]:
    """A server with ``which``'s certificate (None: plaintext) on a loopback port."""
    creds = None
    if which is not None:
        d = pki / which
        creds = grpc.ssl_server_credentials(
            [((d / "server.key").read_bytes(), (d / "server.pem").read_bytes())],
            root_certificates=(d / "ca.pem").read_bytes() if client_ca else None,
            require_client_auth=client_ca,
        )
    registry = Registry(1, 4, "{}")
    servicer = FederationServicer(registry, DeployOptions(), None)
    server, port = start_grpc_server(servicer, "127.0.0.1:0", creds, max_workers=4)
    try:
        yield port
    finally:
        server.stop(0).wait(5)


@pytest.mark.parametrize(
    ("server", "client_ca", "host", "creds", "cause"),
    [
        (None, False, "localhost", {"root": "ok"}, "server speaks plaintext, not TLS"),
        ("ok", False, "localhost", {"insecure": True}, "server speaks TLS, not plaintext"),
        ("ok", False, "localhost", {"root": "other"}, "not trusted by --root-cert"),
        ("old", False, "localhost", {"root": "old"}, "certificate has expired"),
        ("named", False, "localhost", {"root": "named"}, "not issued for 'localhost'"),
        ("ok", True, "localhost", {"root": "ok"}, "requires a client certificate"),
        ("ok", True, "localhost", {"root": "ok", "cert": "other"}, "refused the client cert"),
        ("ok", True, "localhost", {"root": "ok", "mismatch": True}, "do not belong together"),
        ("ok", True, "localhost", {"root": "ok", "cert": "ok"}, None),
        ("ok", False, "127.0.0.1", {"root": "ok"}, None),
    ],
)
def test_tls_failures_name_their_cause(
    pki: Path, server: str | None, client_ca: bool, host: str, creds: dict, cause: str | None
) -> None:
    if server == "old":
        time.sleep(1.1)  # the certificate's last valid second is over (days=0)
    cert = key = None
    if "cert" in creds:
        cert, key = pki / creds["cert"] / "site-a.pem", pki / creds["cert"] / "site-a.key"
        if creds["cert"] == "other":
            cert, key = pki / "other" / "site-x.pem", pki / "other" / "site-x.key"
    if creds.get("mismatch"):
        cert, key = pki / "ok" / "site-a.pem", pki / "other" / "site-x.key"
    with _server(pki, server, client_ca) as port:
        found = diagnose_tls(
            f"{host}:{port}",
            insecure=creds.get("insecure", False),
            root_cert=pki / creds["root"] / "ca.pem" if "root" in creds else None,
            cert=cert,
            key=key,
        )
    if cause is None:
        assert found is None
    else:
        assert found is not None and cause in found, found


def test_nothing_listening_is_not_a_tls_failure() -> None:
    assert diagnose_tls(f"127.0.0.1:{free_port()}", insecure=False) is None


def test_client_names_the_tls_cause_well_within_max_wait(pki: Path) -> None:
    """The client gives up on a TLS failure with its cause, not "unreachable" after
    --max-wait (that would be a ConnectionError)."""
    with (
        _server(pki, "ok") as port,
        pytest.raises(ClientRefusedError, match="not trusted by --root-cert"),
    ):
        run_client(
            f"localhost:{port}",
            BuiltinApp,
            Credentials(root_cert=pki / "other" / "ca.pem"),
            partition=0,
            max_wait_s=120,
        )
