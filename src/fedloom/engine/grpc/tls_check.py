"""Why a connection to the server fails at the TLS layer, in one line.

gRPC reports every TLS failure as "unavailable" with a detail string that does not name
the cause, and retries it like a network fault. When a connection fails, the client
opens one TLS connection itself with the same trust settings (Python's ``ssl``, which
reports the verification result) and names the cause: plaintext against TLS (either
way round), an untrusted CA, an expired certificate, a hostname mismatch, a client
certificate that is missing or refused. No answer (None) means TLS is not the problem:
the server is down or unreachable, and the client retries as before.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

#: The HTTP/2 connection preface: a TLS server that accepts us answers it with SETTINGS.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def diagnose_tls(
    address: str,
    *,
    insecure: bool,
    root_cert: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    timeout_s: float = 5.0,
) -> str | None:
    """The cause of a TLS failure talking to ``address``, or None if TLS is not it."""
    try:
        host, port = split_address(address)
    except ValueError:
        return None
    if insecure:
        return _plaintext_against_tls(host, port, timeout_s)
    ctx = ssl.create_default_context(cafile=str(root_cert) if root_cert else None)
    ctx.set_alpn_protocols(["h2"])
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except ssl.SSLError:
            return f"--cert '{cert}' and --key '{key}' do not belong together; pass a matching pair"
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return None  # not listening: a network fault, not TLS
    try:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(_PREFACE)
            answer = tls.recv(16)
    except ssl.SSLCertVerificationError as err:
        return _verification(err, host)
    except ssl.SSLError as err:
        text = str(err)
        if "WRONG_VERSION_NUMBER" in text:
            return (
                "the server speaks plaintext, not TLS: pass --insecure for a loopback trial, "
                "or start the server with --tls-cert and --tls-key"
            )
        return _client_certificate(cert, detail=err.reason or text)
    except TimeoutError:
        return None  # a busy server; nothing learned
    except OSError:
        return _client_certificate(cert, detail="connection closed")
    finally:
        raw.close()
    return None if answer else _client_certificate(cert, detail="connection closed")


def _verification(err: ssl.SSLCertVerificationError, host: str) -> str:
    why = str(err.verify_message or err)
    if "expired" in why:
        return (
            "TLS handshake failed: the server's certificate has expired; the operator must renew it"
        )
    if "not yet valid" in why:
        return "TLS handshake failed: the server's certificate is not valid yet (check the clocks)"
    if "Hostname mismatch" in why or "IP address mismatch" in why:
        return (
            f"TLS handshake failed: the server's certificate is not issued for '{host}'; "
            "connect with a name it was issued for (fedloom certs --hosts)"
        )
    return (
        f"TLS handshake failed: the server's certificate is not trusted by --root-cert ({why}); "
        "pass the CA certificate that signed it"
    )


def _client_certificate(cert: Path | None, *, detail: str) -> str:
    if cert is None:
        return (
            "TLS handshake failed: the server requires a client certificate (pass --cert and "
            f"--key) [{detail}]"
        )
    return (
        f"TLS handshake failed: the server refused the client certificate '{cert}' (not "
        f"signed by the CA it trusts) [{detail}]"
    )


def _plaintext_against_tls(host: str, port: int, timeout_s: float) -> str | None:
    """With ``--insecure``: does the server speak TLS? (Then plaintext cannot reach it.)"""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            ctx.wrap_socket(raw, server_hostname=host),
        ):
            pass
    except (OSError, ssl.SSLError):
        return None
    return (
        "the server speaks TLS, not plaintext: drop --insecure and pass --root-cert "
        "with the CA certificate that signed the server's"
    )
