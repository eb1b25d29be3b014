"""Bearer tokens: stored hashed, checked in constant time, revocable by deleting a line."""

import os
from pathlib import Path

import pytest

from fedloom.engine.grpc.auth import TokenFileError, TokenStore, add_token, new_token


def test_tokens_never_look_like_command_line_options() -> None:
    tokens = [new_token() for _ in range(2000)]
    assert all(t.startswith("fl_") and len(t) > 40 for t in tokens)
    assert len(set(tokens)) == len(tokens)


def test_tokens_are_stored_hashed_and_revocable(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    a, b = add_token(path, "hospital-a"), add_token(path, "hospital-b")
    text = path.read_text()
    assert a not in text and b not in text and text.count("sha256:") == 2
    store = TokenStore(path)
    assert store.check(a) == "hospital-a" and store.check(b) == "hospital-b"
    assert store.check("fl_guess") is None
    path.write_text("".join(line + "\n" for line in text.splitlines() if "hospital-a" in line))
    os.utime(path, (1, 1))  # a new mtime, even within the filesystem's resolution
    assert store.check(a) == "hospital-a" and store.check(b) is None  # b revoked


def test_bad_tokens_file_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.txt"
    bad.write_text("hospital-a plaintext-token\n")
    with pytest.raises(TokenFileError, match="line 1 is not 'NAME sha256:HEX'"):
        TokenStore(bad)
    with pytest.raises(TokenFileError, match="does not exist"):
        TokenStore(tmp_path / "missing.txt")
