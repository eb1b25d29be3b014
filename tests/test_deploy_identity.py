"""One identity per credential, one live session per identity, sessions that end.

Real server and client processes on 127.0.0.1; every wait is on an event (a log line, a
process exit), never on a sleep.
"""

from __future__ import annotations

import csv
import json
import logging
import stat
import threading
from pathlib import Path

import grpc
import pytest

from fedloom.cli import main
from fedloom.config import ConfigError, load_config
from fedloom.engine.deploy import (
    ServerSecurity,
    check_client_authentication,
    is_loopback,
    warn_anonymous,
)
from fedloom.engine.grpc import PROTOCOL_VERSION
from fedloom.engine.grpc import fedloom_pb2 as pb
from fedloom.engine.grpc.auth import TokenFileError, TokenStore, add_token, revoke_token
from fedloom.engine.grpc.client import (
    BuiltinApp,
    ClientRefusedError,
    Credentials,
    _heartbeat_loop,
    _Stub,
    run_client,
)
from fedloom.engine.grpc.server import DeployOptions, IdentityBook, Refusal, Registry
from fedloom.store import RunStore

from .deploy_helpers import (
    Proc,
    dev_certs,
    fedloom,
    free_port,
    mtls_client_args,
    mtls_server_args,
    serving,
    set_args,
)

FAST = [
    "rounds=1",
    "data.num_clients=2",
    "server.min_fit_clients=2",
    "client.epochs=1",
    "deploy.heartbeat_interval_s=0.5",
    "deploy.heartbeat_timeout_s=6",
    "deploy.poll_timeout_s=1",
    "deploy.wait_for_clients_s=300",
]


def _port(server: Proc) -> int:
    return int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+)", timeout=300).group(1))


def _register(port: int, token: str, partition: int) -> pb.RegisterReply:
    request = pb.RegisterRequest(protocol_version=PROTOCOL_VERSION, partition=partition)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        raw = _Stub(channel, token).register(request.SerializeToString())
    return pb.RegisterReply.FromString(raw)


@pytest.mark.slow
def test_duplicate_token_identity_is_refused_in_real_processes(procs, tmp_path: Path) -> None:
    """A token names one identity: a second process with it is refused with one line,
    whatever partition it asks for, and no token takes another identity's client id."""
    tokens = tmp_path / "tokens.txt"
    files = {}
    for name in ("hospital-a", "hospital-b"):
        assert main(["token", name, "--tokens", str(tokens), "--out", str(tmp_path / name)]) == 0
        files[name] = tmp_path / name
    server = procs(
        fedloom(
            "server",
            "--address",
            "127.0.0.1:0",
            "--tokens",
            str(tokens),
            "--out",
            str(tmp_path / "run"),
            "-v",
            *set_args(FAST),
        )
    )
    port = _port(server)

    def client(name: str, *extra: str) -> Proc:
        args = ["--server", f"127.0.0.1:{port}", "--insecure", "--token-file", str(files[name])]
        return procs(fedloom("client", *args, *extra))

    first = client("hospital-a", "--partition", "0")
    server.wait_for(r"client 0 registered as 'hospital-a'", timeout=300)
    dup = client("hospital-a", "--partition", "0")
    assert dup.wait(300) == 2, dup.output
    lines = [line for line in dup.lines if line.strip()]
    assert len(lines) == 1 and "identity 'hospital-a' already has a live session" in lines[0]
    thief = client("hospital-b", "--partition", "0")
    assert thief.wait(300) == 2
    assert "client id 0 belongs to identity 'hospital-a'" in thief.output, thief.output
    token_a = files["hospital-a"].read_text().strip()
    for partition, message in [
        (-1, "identity 'hospital-a' already has a live session"),
        (1, "identity 'hospital-a' is client 0 of this run"),
    ]:
        reply = _register(port, token_a, partition)
        assert not reply.accepted and message in reply.reason
    second = client("hospital-b", "--partition", "1")
    assert server.wait(600) == 0, server.output
    for c in (first, second):
        assert c.wait(300) == 0, c.output
    ids = json.loads((tmp_path / "run" / "identities.json").read_text())
    assert ids == {"hospital-a": 0, "hospital-b": 1}


@pytest.mark.slow
def test_duplicate_certificate_identity_is_refused_with_mutual_tls(procs, tmp_path: Path) -> None:
    certs = dev_certs(tmp_path / "certs", ["site-a", "site-b"])
    server = procs(
        fedloom(
            "server",
            "--address",
            "127.0.0.1:0",
            *mtls_server_args(certs),
            "--out",
            str(tmp_path / "run"),
            *set_args(FAST),
        )
    )
    port = _port(server)

    def client(name: str, partition: int) -> Proc:
        return procs(
            fedloom(
                "client",
                "--server",
                f"localhost:{port}",
                *mtls_client_args(certs, name),
                "--partition",
                str(partition),
                "-v",
            )
        )

    first = client("site-a", 0)
    first.wait_for(r"registered as client 0", timeout=300)
    dup = client("site-a", 1)
    assert dup.wait(300) == 2
    assert "identity 'site-a' is client 0 of this run" in dup.output, dup.output
    dup = client("site-a", 0)
    assert dup.wait(300) == 2
    assert "identity 'site-a' already has a live session" in dup.output, dup.output
    second = client("site-b", 1)
    assert server.wait(600) == 0, server.output
    for c in (first, second):
        assert c.wait(300) == 0, c.output


def test_revoking_a_certificate_ends_its_session_and_refuses_it(procs, tmp_path: Path) -> None:
    """``fedloom certs --revoke`` while the server runs with ``--revoked``: the revoked
    site's live session ends at its next heartbeat, and its client, registering again,
    is refused in one line (exit 2); a site started later with that certificate too."""
    certs = dev_certs(tmp_path / "certs", ["site-a", "site-b"])
    server = procs(
        fedloom(
            "server",
            "--address",
            "127.0.0.1:0",
            *mtls_server_args(certs),
            "--revoked",
            str(certs / "revoked.txt"),  # absent until the first revocation
            "--out",
            str(tmp_path / "run"),
            *set_args(FAST),
        )
    )
    port = _port(server)

    def site_a() -> Proc:
        return procs(
            fedloom(
                "client",
                "--server",
                f"localhost:{port}",
                *mtls_client_args(certs, "site-a"),
                "--partition",
                "0",
                "-v",
            )
        )

    live = site_a()
    live.wait_for(r"registered as client 0", timeout=300)
    assert main(["certs", str(certs), "--revoke", "site-a"]) == 0
    assert live.wait(300) == 2, live.output
    assert "the credential of identity 'site-a' is revoked" in live.output, live.output
    server.wait_for(r"\(site-a\) left: its credential was revoked", timeout=240)
    later = site_a()
    assert later.wait(300) == 2, later.output
    assert "the credential of identity 'site-a' is revoked" in later.output, later.output


def _drop_column(src: Path, dst: Path, column: str) -> None:
    rows = list(csv.reader(src.open()))
    keep = [i for i, name in enumerate(rows[0]) if name != column]
    with dst.open("w", newline="") as f:
        csv.writer(f).writerows([r[i] for i in keep] for r in rows)


def _site(rows: list[list[str]], site: str, path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0])
        w.writerows(r for r in rows[1:] if r[0] == site)
    return path


@pytest.mark.slow
def test_client_failing_on_its_data_deregisters_and_rounds_go_on(procs, tmp_path: Path) -> None:
    """The failing site says why and leaves; the server logs it and never samples it, so
    no round waits for it (the round timeout is 10 minutes: a wait would fail the test)."""
    root = Path(__file__).parents[1]
    rows = list(csv.reader((root / "examples/data/hospitals.csv").open()))
    north, south = (_site(rows, s, tmp_path / f"{s}.csv") for s in ("north", "south"))
    broken = tmp_path / "broken.csv"
    _drop_column(_site(rows, "east", tmp_path / "east.csv"), broken, "mean_radius")
    sets = [
        "rounds=2",
        "server.min_fit_clients=2",
        "client.epochs=1",
        "deploy.round_timeout_s=600",
        "deploy.heartbeat_interval_s=0.5",
        "deploy.poll_timeout_s=1",
        "deploy.wait_for_clients_s=300",
    ]
    server = procs(
        fedloom(
            "server",
            "examples/csv_hospitals.toml",
            "--address",
            "127.0.0.1:0",
            "--out",
            str(tmp_path / "run"),
            *set_args(sets),
        )
    )
    port = _port(server)

    def client(data: Path) -> Proc:
        args = ["--server", f"127.0.0.1:{port}", "--insecure", "--data", str(data)]
        return procs(fedloom("client", *args))

    good = [client(north)]
    bad = client(broken)
    assert bad.wait(300) == 2, bad.output
    left = server.wait_for(r"client (\d+) \(client (\d+)\) left: (.+)", timeout=300)
    assert "parameters" in left.group(3) or "column" in left.group(3), left.group(0)
    good.append(client(south))
    assert server.wait(600) == 0, server.output
    for c in good:
        assert c.wait(300) == 0, c.output
    history = json.loads((tmp_path / "run" / "summary.json").read_text())["history"]
    assert [r["round"] for r in history] == [1, 2]
    # Round 1 may have started while the failing site was still registered (it counted
    # towards min_fit_clients): its task then failed the moment it left, with its
    # reason. It is never sampled after it left.
    with RunStore.open(tmp_path / "run") as store:
        failures = store.failures()
    assert all(f["round"] == 1 and left.group(3) in f["error"] for f in failures), failures
    assert history[0]["clients_succeeded"] + len(failures) == history[0]["clients_sampled"]
    assert history[1]["clients_sampled"] == history[1]["clients_succeeded"] == 2


def test_identity_keeps_its_client_id_across_server_restarts(tmp_path: Path) -> None:
    """Ids are bound to identities in the run directory: a restarted server gives each
    identity its id again, whichever order they reconnect in."""
    book_path = tmp_path / "identities.json"
    first = Registry(3, 4, "{}", book=IdentityBook(book_path))
    for who in ("b", "a", "c"):
        opened = first.open_session(identity=who, requested=-1, name=who, peer="")
        assert not isinstance(opened, Refusal)
    assert {w: first.book.id_of(w) for w in "abc"} == {"b": 0, "a": 1, "c": 2}
    restarted = Registry(3, 4, "{}", book=IdentityBook(book_path))
    for who in ("c", "a", "b"):
        opened = restarted.open_session(identity=who, requested=-1, name=who, peer="")
        assert not isinstance(opened, Refusal) and opened.client_id == first.book.id_of(who)
    intruder = restarted.open_session(identity="d", requested=-1, name="d", peer="")
    assert isinstance(intruder, Refusal) and "belong to other identities" in intruder.line


def test_a_heartbeat_on_a_channel_closed_under_it_ends_quietly() -> None:
    """The session ended between the heartbeat thread's wait and its call, and the
    channel closed: gRPC raises ValueError (not an RpcError); the thread ends quietly
    instead of printing a traceback at every client shutdown."""

    class ClosedChannelStub:
        def heartbeat(self, request: bytes, timeout: float | None = None) -> bytes:
            raise ValueError("Cannot invoke RPC on closed channel!")

    _heartbeat_loop(ClosedChannelStub(), "session", 0.001, threading.Event())  # type: ignore[arg-type]


def test_reconnect_of_the_same_process_and_replace_stale() -> None:
    """The process holding a session may reconnect (it proves so with its old session
    id); another process takes over only a session whose heartbeats stopped, and only
    when asked to."""
    registry = Registry(2, 4, "{}", options=DeployOptions(heartbeat_interval_s=0.01))
    live = registry.open_session(identity="a", requested=0, name="a", peer="p1")
    assert not isinstance(live, Refusal)
    again = registry.open_session(
        identity="a", requested=0, name="a", peer="p1", previous=live.session_id
    )
    assert not isinstance(again, Refusal) and not live.alive and again.alive
    live = again
    live.last_seen = 0.0  # its heartbeats stopped long ago
    refused = registry.open_session(identity="a", requested=0, name="a", peer="p2")
    assert isinstance(refused, Refusal) and "already has a live session" in refused.line
    taken = registry.open_session(
        identity="a", requested=0, name="a", peer="p2", replace_stale=True
    )
    assert not isinstance(taken, Refusal) and not live.alive
    fresh = registry.open_session(
        identity="a", requested=0, name="a", peer="p3", replace_stale=True
    )
    assert isinstance(fresh, Refusal)  # a live session is never replaced


def test_revoked_token_is_refused_at_the_next_registration(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    token = add_token(path, "hospital-a")
    keep = add_token(path, "hospital-b")
    cfg = load_config(None, ["data.num_clients=2"])
    registry = Registry(2, 4, cfg.model_dump_json())
    with serving(registry, tokens=TokenStore(path)) as port:
        assert _register(port, token, 0).accepted
        assert main(["token", "--revoke", "hospital-a", "--tokens", str(path)]) == 0
        with pytest.raises(ClientRefusedError, match="token refused"):
            run_client(f"127.0.0.1:{port}", BuiltinApp, Credentials(token=token, insecure=True))
    assert TokenStore(path).check(keep) == "hospital-b"
    assert registry.rejections["bad_token"] == 1


def test_token_command_one_identity_one_token_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pki" / "tokens.txt"
    out = tmp_path / "pki" / "a.token"
    assert main(["token", "hospital-a", "--tokens", str(path), "--out", str(out)]) == 0
    for p in (path, out):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert TokenStore(path).check(out.read_text().strip()) == "hospital-a"
    capsys.readouterr()
    assert main(["token", "hospital-a", "--tokens", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already has a token" in err and len(err.splitlines()) == 1
    assert main(["token", "--list", "--tokens", str(path)]) == 0
    assert capsys.readouterr().out.split() == ["hospital-a"]
    assert main(["token", "--revoke", "nobody", "--tokens", str(path)]) == 2
    assert "has no token" in capsys.readouterr().err
    assert main(["token", "--tokens", str(path)]) == 2
    assert "name the identity" in capsys.readouterr().err
    with pytest.raises(TokenFileError, match="has no token"):
        revoke_token(path, "hospital-b")


def test_certs_command_names_identities_and_revokes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert main(["certs", str(out), "--clients", "site-a,site-b"]) == 0
    printed = capsys.readouterr().out
    assert "identity 'site-a'" in printed and "identity 'site-b'" in printed
    assert main(["certs", str(out), "--clients", "site-a,site-a"]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(["certs", str(out), "--revoke", "site-a"]) == 0
    assert (out / "revoked.txt").read_text().split() == ["site-a"]
    assert main(["certs", str(out), "--revoke", "site-z"]) == 2
    assert "no certificate for identity 'site-z'" in capsys.readouterr().err


def test_loopback_is_parsed_not_matched_by_prefix() -> None:
    for address in ("127.0.0.1:1", "127.5.6.7:1", "localhost:1", "[::1]:1"):
        assert is_loopback(address), address
    for address in ("127.evil.example.com:1", "0.0.0.0:1", "10.0.0.1:1", "[::]:1", "example:1"):
        assert not is_loopback(address), address


def test_no_client_authentication_warns_and_needs_a_flag_off_loopback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert check_client_authentication("127.0.0.1:1", ServerSecurity())
    with pytest.raises(ConfigError, match="--allow-anonymous"):
        check_client_authentication("127.evil.example.com:1", ServerSecurity())
    assert check_client_authentication("0.0.0.0:1", ServerSecurity(allow_anonymous=True))
    assert not check_client_authentication("0.0.0.0:1", ServerSecurity(tokens=Path("t")))
    with caplog.at_level(logging.WARNING, logger="fedloom.deploy"):
        warn_anonymous("127.0.0.1:1")
    assert "NO CLIENT AUTHENTICATION" in caplog.text


def test_second_server_on_a_bound_port_exits_2_in_one_line(procs, tmp_path: Path) -> None:
    port = free_port()
    args = ["server", "--address", f"127.0.0.1:{port}", *set_args(FAST)]
    first = procs(fedloom(*args, "--out", str(tmp_path / "one")))
    _port(first)
    second = procs(fedloom(*args, "--out", str(tmp_path / "two")))
    assert second.wait(300) == 2
    lines = [line for line in second.lines if line.strip()]
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], second.output
    assert first.popen.poll() is None  # the first server is untouched


def test_token_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The token comes from --token-file or FEDLOOM_TOKEN: never needs the command line."""
    import argparse

    from fedloom.cli.deploy import _token

    token_file = tmp_path / "a.token"
    token_file.write_text("fl_from-file\n")
    monkeypatch.setenv("FEDLOOM_TOKEN", "fl_from-env")
    ns = argparse.Namespace
    assert _token(ns(token=None, token_file=token_file)) == "fl_from-file"
    assert _token(ns(token=None, token_file=None)) == "fl_from-env"
    assert _token(ns(token="fl_arg", token_file=None)) == "fl_arg"
    for args, message in [
        (ns(token=None, token_file=tmp_path / "missing"), "does not exist"),
        (ns(token="fl_arg", token_file=token_file), "not both"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _token(args)
    monkeypatch.delenv("FEDLOOM_TOKEN")
    base = ["client", "--server", "127.0.0.1:1", "--insecure", "--partition", "0"]
    assert main([*base, "--token-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


def test_silent_session_is_evicted_before_sampling() -> None:
    """A session whose heartbeats stopped is never offered for sampling, even before
    the reaper's next pass."""
    registry = Registry(2, 4, "{}", options=DeployOptions(heartbeat_timeout_s=5))
    for who, cid in (("a", 0), ("b", 1)):
        assert not isinstance(
            registry.open_session(identity=who, requested=cid, name=who, peer=""), Refusal
        )
    assert registry.alive_clients() == [0, 1]
    silent = registry.session_for(1)
    assert silent is not None
    silent.last_seen -= 6  # six seconds without a heartbeat
    assert registry.alive_clients() == [0] and not silent.alive
