"""`fedloom compare` on real runs: a plain one, one with central DP, one with simulated
devices, and one still running (read through SQLite's WAL while its server waits)."""

from __future__ import annotations

import json
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fedloom.cli import main
from fedloom.compare import compare_rows, compare_table, load_run, unique_labels
from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation
from fedloom.report import summary_table

FAST = ["rounds=3", "client.epochs=1", "data.num_clients=5"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    settings = {
        "plain": FAST,
        "dp": [*FAST, "privacy.mechanism=central", "privacy.noise_multiplier=1.0"],
        "sim": [*FAST, "system.enabled=true", "strategy=fedprox"],
    }
    out = {}
    for name, overrides in settings.items():
        run_simulation(load_config(None, overrides), root / name)
        out[name] = root / name
    return out


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def test_compare_table_json_and_plot(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png, numbers = tmp_path / "cmp.png", tmp_path / "cmp.json"
    argv = ["compare", *map(str, runs.values()), "--out", str(png), "--json", str(numbers)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("plain", "dp", "sim", "fedavg", "fedprox", "completed", "sim time"):
        assert name in out
    rows = {r["run"]: r for r in json.loads(numbers.read_text())}
    assert list(rows) == ["plain", "dp", "sim"]
    for name, run in runs.items():
        summary, row = _summary(run), rows[name]
        assert row["final_accuracy"] == summary["final"]["accuracy"]
        assert row["bytes_up"] == summary["metrics"]["bytes_up_total"] > 0
        assert row["bytes_down"] == summary["metrics"]["bytes_down_total"] > 0
        assert row["wall_s"] == summary["wall_s"] > 0
        assert row["rounds"] == 3 and row["status"] == "completed"
    # ε: the central-DP ledger's; the others spent none.
    assert rows["dp"]["epsilon"] == _summary(runs["dp"])["privacy"]["epsilon"] > 0
    assert rows["plain"]["epsilon"] is None and rows["sim"]["epsilon"] is None
    # Simulated time: the virtual clock's last record; only the [system] run has one.
    sim_history = _summary(runs["sim"])["history"]
    assert rows["sim"]["sim_time_s"] == sim_history[-1]["sim_time_s"] > 0
    assert rows["plain"]["sim_time_s"] is None
    # Not every run has simulated time: one panel (accuracy vs round), 8 in at 110 dpi.
    assert _png_size(png)[0] == 880


def test_rounds_to_a_common_target_and_both_panels(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history = _summary(runs["sim"])["history"]
    target = history[1]["accuracy"]  # reached at round 2 at the latest
    by_hand = next(r["round"] for r in history if r["accuracy"] >= target)
    rows = compare_rows([load_run(runs["sim"])], target=target)
    assert rows[0]["rounds_to_target"] == by_hand and rows[0]["target_accuracy"] == target
    higher = compare_rows([load_run(runs["sim"])], target=1.0)
    assert higher[0]["rounds_to_target"] is None

    png = tmp_path / "sim.png"
    assert main(["compare", str(runs["sim"]), str(runs["sim"]), "--out", str(png)]) == 0
    # Every run has simulated time: a second panel (accuracy vs simulated time), 13 in wide.
    assert _png_size(png)[0] == 1430
    out = capsys.readouterr().out
    assert "not reached" in out  # the configured target 0.95 is out of reach in 3 rounds
    assert "sim #2" in out


def test_compare_reads_a_running_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The server waits inside round 2's callback while compare reads the run."""
    run = tmp_path / "live"
    paused, resume = threading.Event(), threading.Event()

    def on_round(record: dict[str, Any]) -> None:
        if record["round"] == 2:
            paused.set()
            assert resume.wait(timeout=300)

    cfg = load_config(None, FAST)
    worker = threading.Thread(target=run_simulation, args=(cfg, run), kwargs={"on_round": on_round})
    worker.start()
    try:
        assert paused.wait(timeout=300)
        view = load_run(run)
        row = compare_rows([view])[0]
        assert not view.finished and row["status"] == "running" and row["rounds"] == 2
        assert row["final_accuracy"] == view.history[1]["accuracy"]
        assert row["bytes_up"] == sum(r["bytes_up"] for r in view.history) > 0
        assert row["wall_s"] is not None and row["wall_s"] > 0
        assert main(["compare", str(run), "--out", str(tmp_path / "live.png")]) == 0
        assert "running" in capsys.readouterr().out
    finally:
        resume.set()
        worker.join(timeout=300)
    assert load_run(run).finished


def test_compare_refuses_a_path_that_is_not_a_run(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "x.png"
    for bad in (tmp_path, tmp_path / "missing"):
        assert main(["compare", str(runs["plain"]), str(bad), "--out", str(png)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err
    assert not png.exists()
    assert main(["compare", str(runs["plain"]), "--out", str(tmp_path / "x.txt")]) == 2
    assert ".png" in capsys.readouterr().err
    assert main(["compare", str(runs["plain"]), "--out", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_worst10_client_accuracy_is_shown_when_a_run_has_it(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Read generically: a summary that carries ``client_accuracy_worst10`` gets the column."""
    run = tmp_path / "plain"
    shutil.copytree(runs["plain"], run)
    summary = _summary(run)
    summary["metrics"]["client_accuracy_worst10"] = 0.4321
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["compare", str(runs["dp"]), str(run), "--out", str(tmp_path / "w.png")]) == 0
    out = capsys.readouterr().out
    assert "worst-10% acc" in out and "0.4321" in out
    assert main(["compare", str(runs["dp"]), "--out", str(tmp_path / "w.png")]) == 0
    assert "worst-10%" not in capsys.readouterr().out


def test_times_read_as_fedloom_report_shows_them() -> None:
    """One duration format for both commands: a run's wall time in ``fedloom compare``
    is the text its ``fedloom report`` summary shows."""
    row = {"run": "r", "strategy": "fedavg", "status": "completed", "rounds": 3}
    row |= {"final_accuracy": 0.93124, "wall_s": 125.5, "sim_time_s": 7300.0}
    console = Console(record=True, width=200)
    console.print(compare_table([row]))
    console.print(summary_table({"wall_s": 125.5}))
    text = console.export_text()
    assert text.count("2m 05.5s") == 2, text
    assert "2h 01m 40s" in text and "0.9312" in text


def test_unique_labels() -> None:
    paths = [Path("/a/x/run"), Path("/b/x/run"), Path("/a/other"), Path("/a/other")]
    assert unique_labels(paths) == ["a/x/run", "b/x/run", "other", "other #2"]
