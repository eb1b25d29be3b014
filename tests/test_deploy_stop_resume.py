"""A graceful stop that resumes: SIGTERM, then ``--resume`` with the same client processes.

Every wait is on an event (a printed round, a client's log line, a process exit).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from fedloom.cli import main
from fedloom.engine.grpc.auth import add_token

from .deploy_helpers import fedloom, free_port, set_args, slow_client


@pytest.mark.slow
def test_sigterm_then_resume_completes_with_the_same_clients(procs, tmp_path: Path) -> None:
    """SIGTERM stops the server (exit 130, the run store kept) and tells the clients to
    wait; ``--resume --set rounds=5`` continues with the same client processes, which
    exit only when the run is over; every round is recorded once."""
    tokens = tmp_path / "tokens.txt"
    names = [add_token(tokens, f"site-{i}") for i in range(2)]
    port = free_port()
    out = tmp_path / "run"
    server_args = ["server", "--address", f"127.0.0.1:{port}", "--tokens", str(tokens)]
    sets = [
        "rounds=4",
        "data.num_clients=2",
        "server.min_fit_clients=2",
        "client.epochs=1",
        "deploy.heartbeat_interval_s=0.5",
        "deploy.heartbeat_timeout_s=6",
        "deploy.poll_timeout_s=1",
        "deploy.wait_for_clients_s=300",
    ]
    server = procs(fedloom(*server_args, "--out", str(out), *set_args(sets)))
    server.wait_for(r"listening on", timeout=300)
    clients = [
        procs(
            slow_client(
                0.5,
                "--server",
                f"127.0.0.1:{port}",
                "--insecure",
                "--token",
                names[i],
                "--partition",
                str(i),
            )
        )
        for i in range(2)
    ]
    server.wait_for(r"^round 1:", timeout=600)
    server.popen.send_signal(signal.SIGTERM)
    assert server.wait(300) == 130, server.output
    assert f"fedloom server --resume {out}" in server.output
    assert "Traceback" not in server.output
    for c in clients:
        c.wait_for(r"waiting for it to come back", timeout=300)
        assert c.popen.poll() is None  # waiting, not exited
    stopped_at = max(r["round"] for r in _rounds(out))
    assert stopped_at < 4

    resumed = procs(fedloom(*server_args, "--resume", str(out), *set_args(["rounds=5"])))
    assert resumed.wait(600) == 0, resumed.output
    for c in clients:
        assert c.wait(300) == 0, c.output
        assert "run over; this client completed" in c.output
    history = json.loads((out / "summary.json").read_text())["history"]
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5]
    assert all(r["clients_succeeded"] == 2 for r in history)
    assert json.loads((out / "identities.json").read_text()) == {"site-0": 0, "site-1": 1}


def _rounds(out: Path) -> list[dict]:
    from fedloom.store import RunStore

    store = RunStore.open(out)
    try:
        return store.history()
    finally:
        store.close()


def test_resume_accepts_set_only_for_settings_that_may_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["server", "--resume", str(tmp_path), "--set"]
    assert main([*args, "client.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume cannot change 'client.lr'" in err and len(err.splitlines()) == 1
    assert "rounds" in err  # it names the keys that may change
