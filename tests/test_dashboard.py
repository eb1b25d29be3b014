"""The dashboard without a browser: snapshots from the run store, the registry's status
seam, access control (loopback, token, Host) and the live event stream."""

from __future__ import annotations

import http.client
import json
import math
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.cli import main
from fedloom.engine.grpc.server import OpenTask, Registry
from fedloom.messages import FitTask
from fedloom.store import Checkpoint, RunStore

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from fedloom.dashboard.app import DashboardServer
from fedloom.dashboard.data import RunView

TOKEN = "s3cret-token-for-the-dashboard-tests"
CONFIG: dict[str, Any] = {
    "rounds": 5,
    "strategy": "fedavg",
    "target_accuracy": 0.9,
    "data": {"num_clients": 4},
    "privacy": {"mechanism": "central", "max_epsilon": 3.0, "delta": 1e-5},
}


def _record(rnd: int, **extra: Any) -> dict[str, Any]:
    return {
        "round": rnd,
        "accuracy": 0.5 + 0.1 * rnd,
        "fed_accuracy": 0.4 + 0.1 * rnd,
        "personalized_accuracy": 0.6 + 0.1 * rnd,
        "loss": 1.0 / rnd,
        "epsilon": 0.7 * rnd,
        "bytes_up": 1000,
        "bytes_down": 2000,
        "clients_sampled": 4,
        **extra,
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    with RunStore.create(out, CONFIG, "test") as store:
        store.record_round(_record(1, excluded_clients=[1], flagged_clients=[]))
        store.record_round(
            _record(
                2,
                loss=math.nan,
                excluded_clients=[1],
                flagged_clients=[2],
                client_accuracies={"0": 0.5, "1": 0.95, "3": 0.75},
                contribution={"0": 0.25, "1": -0.5},
            )
        )
        store.record_failure(2, 3, "ValueError: bad batch", "Traceback ...\nValueError: bad batch")
        store.save_checkpoint(
            Checkpoint(round=2, tensors={"participation": np.array([2, 0, 2, 1], dtype=np.int64)})
        )
    return out


def test_snapshot_shows_curves_privacy_clients_failures_and_events(run_dir: Path) -> None:
    view = RunView(run_dir, key="0")
    snap = view.snapshot()
    view.close()
    json.dumps(snap, allow_nan=False)  # what the page's JSON.parse accepts
    assert snap["state"] == "running" and snap["round"] == 2 and snap["rounds"] == 5
    assert snap["eta_s"] is not None and snap["eta_s"] >= 0
    assert snap["rounds_x"] == [1, 2]
    series = snap["series"]
    for key in ("accuracy", "fed_accuracy", "personalized_accuracy", "loss", "epsilon"):
        assert key in series
    assert series["loss"] == [1.0, None]  # NaN is sent as null
    assert "clients_sampled" not in series
    assert (snap["target"], snap["epsilon_budget"], snap["delta"]) == (0.9, 3.0, 1e-5)
    assert snap["events"] == [
        {"round": 1, "excluded": [1], "flagged": [], "discarded": None},
        {"round": 2, "excluded": [1], "flagged": [2], "discarded": None},
    ]
    assert snap["failures"][0]["client_id"] == 3 and "Traceback" in snap["failures"][0]["traceback"]
    assert snap["client_accuracies"] == {"round": 2, "values": {"0": 0.5, "1": 0.95, "3": 0.75}}
    assert snap["contribution"] == {"rounds": 1, "total": {"0": 0.25, "1": -0.5}}
    rows = {r["id"]: r for r in snap["clients"]["rows"]}
    assert rows[3]["state"] == "failed" and "bad batch" in rows[3]["detail"]
    assert rows[1]["flags"] == ["excluded"] and rows[1]["excluded_rounds"] == 2
    assert rows[2]["flags"] == ["flagged"] and rows[2]["participation"] == 2
    assert rows[0]["state"] == "participated" and rows[0]["accuracy"] == 0.5
    assert snap["clients"]["total"] == 4 and snap["clients"]["participation_round"] == 2


def test_registry_status_snapshot_names_each_clients_state() -> None:
    reg = Registry(5, 3, "{}")
    sessions = [reg.add_session(c, f"site-{c}") for c in range(5)]
    task = FitTask(client_id=1, round=1, model_version=0, config={})
    with reg.lock:
        reg.open_tasks["t1"] = OpenTask("t1", task, sessions[1].session_id, [])
    reg.task_finished(2, late=True, ok=False)
    reg.reject("malformed", "test", client_id=3)
    reg.deregister(sessions[0], "its data file vanished")
    before = {s.client_id: s.tasks_done for s in reg.status_snapshot()}
    states = {s.client_id: (s.state, s.detail) for s in reg.status_snapshot()}
    assert states[0] == ("dropped", "left: its data file vanished")
    assert states[1][0] == "training"
    assert states[2] == ("straggling", "missed the round deadline")
    assert states[3][0] == "rejected"
    assert states[4] == ("connected", "")
    reg.task_finished(3, late=False, ok=True)  # an accepted result clears the refusal
    after = {s.client_id: s for s in reg.status_snapshot()}
    assert after[3].state == "connected" and after[3].tasks_done == before[3] + 1
    assert after[3].rejected == 1


def test_dashboard_refuses_a_non_loopback_address_without_a_token(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDLOOM_DASHBOARD_TOKEN", raising=False)
    assert main(["dashboard", str(run_dir), "--address", "0.0.0.0:0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not loopback" in err and "token" in err
    assert main(["dashboard", str(run_dir.parent / "nope"), "--address", "127.0.0.1:0"]) == 2
    assert "not a fedloom run directory" in capsys.readouterr().err


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_token_guards_every_route_and_the_page_sets_a_cookie(run_dir: Path) -> None:
    with DashboardServer([RunView(run_dir, key="0")], "127.0.0.1:0", token=TOKEN) as dash:
        for path in ("", "static/dashboard.js", "api/snapshot", "events"):
            assert _get(dash.url + path)[0] == 401
        assert _get(dash.url + "?token=wrong-token-of-enough-length")[0] == 401
        status, headers, body = _get(dash.url + f"?token={TOKEN}")
        assert status == 200 and b"dashboard.js" in body
        assert "HttpOnly" in headers["set-cookie"] and "script-src 'self'" in str(headers)
        cookie = headers["set-cookie"].split(";")[0]
        assert _get(dash.url + "static/dashboard.js", {"Cookie": cookie})[0] == 200
        status, _, body = _get(dash.url + "api/snapshot", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["runs"][0]["round"] == 2


def test_loopback_dashboard_answers_only_loopback_host_names(run_dir: Path) -> None:
    with DashboardServer([RunView(run_dir, key="0")], "127.0.0.1:0", token=None) as dash:
        assert _get(dash.url)[0] == 200
        assert _get(dash.url, {"Host": "attacker.example:80"})[0] == 403  # DNS rebinding


def test_event_stream_pushes_a_new_round_without_reconnecting(run_dir: Path) -> None:
    with DashboardServer(
        [RunView(run_dir, key="0")], "127.0.0.1:0", token=None, interval_s=0.2
    ) as dash:
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=60)
        conn.request("GET", "/events")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")

        def next_event() -> dict[str, Any]:
            while True:
                line = resp.readline().decode()
                if line.startswith("data: "):
                    return dict(json.loads(line[6:]))

        assert next_event()["runs"][0]["round"] == 2
        with RunStore.open(run_dir) as store:
            store.record_round(_record(3))
        assert next_event()["runs"][0]["round"] == 3  # same connection, new round
        conn.close()
