"""What a finished run says about itself (issue 9): a run in which no round changed the
model fails with its reason (one line, exit 1, ``summary.json``); a DP run's summary
shows ε; wall time covers every stretch of a resumed run, even a killed one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedloom.cli import main
from fedloom.engine.simulation import no_usable_round
from fedloom.report import summary_table
from fedloom.store import RunStore

TINY = ["--set", "data.num_clients=3", "--set", "client.epochs=1", "--set", "eval.every=2"]


def test_every_client_diverging_fails_the_run_with_its_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["run", *TINY, "--set", "rounds=2", "--set", "client.lr=1e30", "--out", str(run)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["outcome"] == "failed"
    assert summary["failure"].startswith("no usable round: none of the 2 rounds aggregated")
    assert "NaN or Inf" in summary["failure"]
    assert err[-1] == f"fedloom: run failed: {summary['failure']}"
    assert [r["aggregated"] for r in summary["history"]] == [False, False]


def test_a_healthy_run_completes_with_exit_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["run", *TINY, "--set", "rounds=1", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["outcome"] == "completed" and "failure" not in summary


def test_no_usable_round_reasons() -> None:
    ok = {"round": 1, "aggregated": True, "clients_succeeded": 2}
    assert no_usable_round([ok], None, []) is None
    assert no_usable_round([], "privacy budget reached: ...", []) == (
        "no usable round: privacy budget reached: ..."
    )
    noise_only = {"round": 1, "aggregated": True, "clients_succeeded": 0}
    discarded = {"round": 2, "aggregated": False, "clients_succeeded": 1, "discarded": "boom"}
    fail = [{"client_id": 3, "error": "RuntimeError: down\nmore"}]
    assert no_usable_round([noise_only, discarded], None, fail) == (
        "no usable round: none of the 2 rounds aggregated a client update; 1 discarded "
        "(last: boom); last client failure: client 3: RuntimeError: down"
    )


def _text(table: object) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_the_summary_of_a_dp_run_shows_epsilon(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = ["strategy=dp-fedavg", "privacy.noise_multiplier=1.0", "rounds=2"]
    assert main(["run", *TINY, *[a for s in sets for a in ("--set", s)], "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    eps = summary["privacy"]["epsilon"]
    assert eps > 0
    assert f"ε = {eps:.4g} at δ = 1e-05" in _text(summary_table(summary))


def test_a_failed_and_a_stopped_run_say_why_in_the_table() -> None:
    text = _text(summary_table({"failure": "no usable round: x", "stopped_reason": "budget"}))
    assert "Failed" in text and "no usable round: x" in text and "budget" in text


def test_wall_time_covers_a_killed_stretch_and_its_resume(tmp_path: Path) -> None:
    """SIGKILL (no handler runs) after the first checkpoint, then --resume: the run's
    wall time includes the killed stretch, which the store kept round by round."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fedloom.cli", "run", *TINY, "--set", "rounds=12"]
    proc = subprocess.Popen([*cmd, "--out", str(run)], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        # Round 2's checkpoint is written after round 1 was fully done (its wall time
        # stored): the checkpoint callback runs before the end-of-round bookkeeping.
        while time.monotonic() < deadline and not any(
            int(p.stem.split("_")[1]) >= 2
            for p in (run / "checkpoints").glob("round_*.safetensors")
        ):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with RunStore.open(run) as store:
        killed = float(store.get_meta("wall_s", 0.0))
        done_before = len(store.history())
    assert killed > 0.0 and done_before < 12
    resumed = subprocess.run(
        [sys.executable, "-m", "fedloom.cli", "run", "--resume", str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 12 and summary["wall_s"] > killed
