"""Client authentication by bearer token, stored hashed on the server.

The tokens file holds one ``NAME sha256:HEX`` line per client. The server never sees a
plaintext token on disk; it hashes what a client presents and compares in constant
time. Removing a line revokes the token: the file is re-read when it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message says how to fix it."""


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


TOKEN_PREFIX = "fl_"


def new_token() -> str:
    """256 bits from the OS CSPRNG, URL-safe, behind a fixed prefix.

    The prefix makes fedloom tokens recognisable (in logs, secret scanners) and keeps a
    token from starting with '-', which a command line would read as an option.
    """
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def add_token(path: Path, name: str) -> str:
    """Create a token for ``name``, append its hash to ``path``, return the plaintext once."""
    if not name or any(c.isspace() for c in name):
        raise TokenFileError(f"token name '{name}' must be non-empty and contain no spaces")
    token = new_token()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f"{name} {hash_token(token)}\n")
    os.chmod(path, 0o600)
    return token


class TokenStore:
    """Hashed tokens from a file, reloaded when the file's modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime = -1.0
        self._hashes: dict[str, str] = {}
        self._reload()

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            raise TokenFileError(
                f"tokens file '{self.path}' does not exist; create it with 'fedloom token NAME'"
            ) from None
        if mtime == self._mtime:
            return
        hashes: dict[str, str] = {}
        for lineno, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].startswith("sha256:"):
                raise TokenFileError(
                    f"tokens file '{self.path}' line {lineno} is not 'NAME sha256:HEX'"
                )
            hashes[parts[1]] = parts[0]
        self._hashes, self._mtime = hashes, mtime

    def check(self, token: str) -> str | None:
        """The client name for a valid token, or None."""
        with self._lock:
            self._reload()
            presented = hash_token(token)
            for stored, name in self._hashes.items():
                if hmac.compare_digest(stored, presented):
                    return name
        return None
