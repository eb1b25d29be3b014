"""Acceptance: the dashboards of a simulation and of a deployment in a real headless
Chromium. Every wait polls the DOM or a process's output with a bound (no fixed sleeps);
the bounds are generous for a busy 2-core machine."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from fedloom.store import RunStore
from tests.browser import Browser, browser  # noqa: F401  (the fixture)
from tests.deploy_helpers import Proc, fedloom, set_args, slow_client

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

WAIT_S = 300.0
FAST = [
    "client.epochs=1",
    "deploy.heartbeat_interval_s=0.5",
    "deploy.heartbeat_timeout_s=4",
    "deploy.poll_timeout_s=1",
    "deploy.wait_for_clients_s=300",
]
# The page's displayed round and the number of points of its accuracy curve, read in one
# script call so both come from the same rendered snapshot.
SHOWN = """
const card = document.querySelector('[data-run="0"]');
const round = card && card.querySelector('.round');
const line = card && card.querySelector('svg[data-chart="accuracy"] polyline[data-key="accuracy"]');
return round && line ? [Number(round.dataset.round), Number(line.dataset.points)] : null;
"""


def _stored_rounds(run_dir: Path) -> int:
    if not (run_dir / "run.sqlite").is_file():
        return 0
    try:
        with RunStore.open(run_dir) as store:
            return len(store.history())
    except Exception:  # created this instant: no schema yet
        return 0


def _wait_round(b: Browser, done: Callable[[int, int], bool], what: str) -> tuple[int, int]:
    def probe() -> tuple[int, int] | None:
        shown = b.js(SHOWN)
        return (shown[0], shown[1]) if shown and done(shown[0], shown[1]) else None

    return b.wait_for(probe, timeout=WAIT_S, what=what)


def _no_console_errors(b: Browser) -> None:
    errors = b.console_errors()
    assert errors == [], f"browser console errors: {errors}"


@pytest.mark.slow
def test_dashboards_of_a_simulation_and_a_deployment_in_chromium(
    browser: Browser,  # noqa: F811
    procs: Callable[[list[str]], Proc],
    tmp_path: Path,
) -> None:
    b = browser
    # --- a simulation, followed live by `fedloom dashboard` ---------------------------
    sim_dir = tmp_path / "sim"
    rounds = 8
    sim = procs(
        fedloom(
            "run",
            "--out",
            str(sim_dir),
            *set_args([f"rounds={rounds}", "data.num_clients=6", "client.epochs=1"]),
        )
    )
    b.wait_for(lambda: _stored_rounds(sim_dir) >= 1, timeout=WAIT_S, what="the first round")
    dash = procs(fedloom("dashboard", str(sim_dir), "--address", "127.0.0.1:0"))
    url = dash.wait_for(r"fedloom dashboard at (http://\S+)", timeout=WAIT_S).group(1)
    b.open(url)
    b.js("window.fedloomLoaded = 'once';")  # gone if the page reloads
    assert sim.wait(WAIT_S) == 0, sim.output
    shown = _wait_round(
        b, lambda r, n: r == rounds and n == rounds, f"round {rounds} and {rounds} points"
    )
    assert shown == (rounds, rounds)
    assert b.js("return window.fedloomLoaded") == "once"  # updated by events, not reloads
    assert b.js("return document.querySelector('[data-run=\"0\"] .state').dataset.state") == (
        "completed"
    )
    b.screenshot("dashboard-simulation.png")
    _no_console_errors(b)

    # --- a deployment: fedloom server --dashboard and three client processes ----------
    dep_dir = tmp_path / "deployment"
    server = procs(
        fedloom(
            "server",
            "--address",
            "127.0.0.1:0",
            "--dashboard",
            "127.0.0.1:0",
            "--out",
            str(dep_dir),
            *set_args(["rounds=500", "data.num_clients=3", "server.min_fit_clients=2", *FAST]),
        )
    )
    dash_url = server.wait_for(r"fedloom dashboard at (http://\S+)", timeout=WAIT_S).group(1)
    port = server.wait_for(r"listening on 127\.0\.0\.1:(\d+)", timeout=WAIT_S).group(1)
    clients = [
        procs(
            slow_client(0.2, "--server", f"127.0.0.1:{port}", "--insecure", "--partition", str(i))
        )
        for i in range(3)
    ]
    b.open(dash_url)
    r, n = _wait_round(b, lambda r, n: r >= 2 and n == r, "a deployment round >= 2 drawn")
    assert n == r
    state_of = (
        "const row = document.querySelector('tr[data-client=\"2\"]');"
        "return row ? row.dataset.state : null;"
    )
    b.wait_for(
        lambda: b.js(state_of) in ("connected", "training"), timeout=WAIT_S, what="client 2 live"
    )
    os.kill(clients[2].popen.pid, signal.SIGKILL)
    b.wait_for(lambda: b.js(state_of) == "dropped", timeout=WAIT_S, what="client 2 dropped")
    # The run goes on with the two others, and the page keeps following it.
    _wait_round(b, lambda r2, n2: r2 > r and n2 == r2, "a later round after the drop")
    b.screenshot("dashboard-deployment.png")
    _no_console_errors(b)
    assert server.popen.poll() is None, server.output
