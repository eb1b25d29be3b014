"""The revocation file: read fresh at registration, at most ``max_age_s`` stale at heartbeats."""

from __future__ import annotations

import os
from pathlib import Path

from fedloom.engine.grpc.server import RevocationList


def _write(path: Path, text: str, mtime: float) -> None:
    path.write_text(text)
    os.utime(path, (mtime, mtime))  # a distinct mtime whatever the filesystem's resolution


def test_heartbeat_view_is_cached_for_max_age_and_registration_reads_fresh(
    tmp_path: Path,
) -> None:
    now = [100.0]
    path = tmp_path / "revoked.txt"
    revoked = RevocationList(path, clock=lambda: now[0])
    assert not revoked.has("a", max_age_s=1.0)  # no file yet: nobody is revoked

    _write(path, "a\n", 1_000.0)
    now[0] += 0.5
    assert not revoked.has("a", max_age_s=1.0)  # checked 0.5 s ago: the cached answer
    now[0] += 0.5
    assert revoked.has("a", max_age_s=1.0)  # 1 s old: the file is looked at again

    _write(path, "b\n  \n", 2_000.0)
    assert revoked.has("a", max_age_s=1.0)  # just checked: still the old list
    assert not revoked.has("a")  # registration's fresh look
    assert revoked.has("b")

    path.unlink()
    assert not revoked.has("b")  # the file removed: nobody is revoked any more
