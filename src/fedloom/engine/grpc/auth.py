"""Client authentication by bearer token, stored hashed on the server.

The tokens file holds one ``NAME sha256:HEX`` line per client identity: NAME is the
identity the token carries, and one identity has one token (a second is refused; revoke
the first). The server never sees a plaintext token on disk; it hashes what a client
presents and compares in constant time. Removing a line revokes the token
(``fedloom token --revoke NAME``): the file is re-read when it changes.
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


def _owner_only(path: Path) -> int:
    """A file descriptor for appending to ``path``, which only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to a new file only its owner can read (a token for a client)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with os.fdopen(_owner_only(path), "w") as f:
        f.write(text)


def identities(path: Path) -> list[str]:
    """The identities that hold a token in ``path``, in file order."""
    if not path.exists():
        return []
    return [
        line.split()[0]
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def add_token(path: Path, name: str) -> str:
    """Create the token of identity ``name``, append its hash to ``path``, return it once."""
    if not name or any(c.isspace() for c in name):
        raise TokenFileError(f"token name '{name}' must be non-empty and contain no spaces")
    if name in identities(path):
        raise TokenFileError(
            f"identity '{name}' already has a token in '{path}'; revoke it first with "
            f"'fedloom token --revoke {name} --tokens {path}'"
        )
    token = new_token()
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(_owner_only(path), "a") as f:
        f.write(f"{name} {hash_token(token)}\n")
    return token


def revoke_token(path: Path, name: str) -> None:
    """Remove identity ``name``'s token from ``path``; a running server stops accepting it."""
    if name not in identities(path):
        raise TokenFileError(f"identity '{name}' has no token in '{path}'; nothing to revoke")
    kept = [
        line
        for line in path.read_text().splitlines()
        if not (line.strip() and not line.startswith("#") and line.split()[0] == name)
    ]
    tmp = path.with_name(path.name + ".tmp")
    write_secret(tmp, "".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


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
