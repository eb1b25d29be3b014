"""report: plot, tables and `fedloom report DIR` over a synthetic run directory."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.table import Table

from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation
from fedloom.report import (
    format_bytes,
    format_duration,
    format_float,
    format_percent,
    history_table,
    plot_accuracy,
    redraw,
    summarize_history,
    summary_table,
)
from fedloom.server.metrics import run_metrics
from fedloom.store import SUMMARY_FILE, RunStore, RunStoreError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SRC = Path(__file__).resolve().parents[1] / "src"


def _history(n: int = 6) -> list[dict[str, Any]]:
    return [
        {
            "round": r,
            "accuracy": None if r % 2 else 0.5 + r / 20,  # evaluated every other round
            "loss": None if r % 2 else 1.0 / r,
            "fed_accuracy": None,
            "fed_loss": None,
            "train_loss": 0.9 / r,
            "clients_sampled": 20,
            "clients_succeeded": 19,
            "clients_failed": 1,
            "stragglers_dropped": 0,
            "bytes_up": 1536 * r,
            "bytes_down": 3 * 1024 * 1024,
            "epsilon": None if r < 3 else 0.25 * r,
            "round_s": 0.42,
        }
        for r in range(1, n + 1)
    ]


def _render(table: Table) -> str:
    console = Console(record=True, width=150)
    console.print(table)
    return console.export_text()


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


# ---------------------------------------------------------------------------- plot


def test_plot_accuracy_writes_png(tmp_path: Path) -> None:
    out = plot_accuracy(
        _history(), tmp_path / "acc.png", baseline_accuracy=0.97, target_accuracy=0.8, title="t"
    )
    assert out == tmp_path / "acc.png"
    assert _is_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["acc.png"]  # no temp file left


def test_plot_handles_no_evaluations_and_empty_history(tmp_path: Path) -> None:
    no_eval: list[dict[str, Any]] = [{"round": 1, "accuracy": None, "loss": None}, {"round": 2}]
    assert _is_png(plot_accuracy(no_eval, tmp_path / "a.png"))
    assert _is_png(plot_accuracy([], tmp_path / "b.png", baseline_accuracy=0.9))


def test_plot_leaves_callers_backend_alone(tmp_path: Path) -> None:
    """A notebook's backend must survive a report; fresh interpreter so state is known."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(SRC)!r})
        import matplotlib
        matplotlib.use("svg")
        from pathlib import Path
        from fedloom.report import plot_accuracy
        plot_accuracy([{{"round": 1, "accuracy": 0.5}}], Path({str(tmp_path / "a.png")!r}))
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert _is_png(tmp_path / "a.png")


# -------------------------------------------------------------------------- tables


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert format_bytes(5 * 1024**3) == "5.0 GiB"
    assert format_bytes(None) == "—"


def test_number_formats_and_the_dash_for_what_is_missing() -> None:
    assert format_duration(42.06) == "42.1s"
    assert format_duration(125.5) == "2m 05.5s"
    assert format_duration(7300) == "2h 01m 40s"
    assert format_float(0.93124) == "0.9312" and format_float(1.23456, 2) == "1.23"
    assert format_percent(0.625) == "62.5%"
    for fmt in (format_duration, format_float, format_percent):
        assert fmt(None) == fmt("n/a") == "—"


def test_history_table_contents() -> None:
    text = _render(history_table(_history()))
    lines = text.splitlines()
    row2 = next(line for line in lines if line.strip().startswith("2 "))
    assert "0.6000" in row2  # accuracy 0.5 + 2/20
    assert "0.5000" in row2  # loss 1/2
    assert "19/20" in row2
    assert "3.0 KiB" in row2  # bytes_up 1536*2
    assert "3.0 MiB" in row2
    assert "—" in row2  # epsilon None
    assert "0.42s" in row2
    row4 = next(line for line in lines if line.strip().startswith("4 "))
    assert "1.00" in row4  # epsilon 0.25 * 4
    row1 = next(line for line in lines if line.strip().startswith("1 "))
    assert row1.count("—") >= 3  # accuracy, loss, epsilon all missing


def test_history_table_custom_columns_and_elision() -> None:
    text = _render(history_table(_history(), columns=["round", "train_loss", "stragglers_dropped"]))
    assert "train_loss" in text and "0.9000" in text and "stragglers_dropped" in text
    long = _history(50)
    text = _render(history_table(long, max_rows=10))
    assert "41 of 50 rounds not shown" in text
    assert " 50 " in text and " 1 " in text and " 25 " not in text


def test_summary_table_full() -> None:
    summary = {
        "rounds_completed": 30,
        "wall_s": 125.5,
        "final": {"accuracy": 0.9312, "loss": 0.2345},
        "metrics": {
            "rounds_to_target": 17,
            "target_accuracy": 0.9,
            "participation_rate": 0.95,
            "bytes_up_total": 10 * 1024 * 1024,
            "bytes_down_total": 2048,
            "centralized_accuracy": 0.97,
            "accuracy_gap": 0.0388,
        },
    }
    text = _render(summary_table(summary))
    for expected in (
        "30",
        "0.9312",
        "0.2345",
        "17",
        "95.0%",
        "10.0 MiB",
        "2.0 KiB",
        "0.9700",
        "+0.0388",
        "2m 05.5s",
    ):
        assert expected in text, expected
    assert "—" not in text


def test_summary_table_missing_keys_render_dash() -> None:
    for summary in ({}, {"final": None, "metrics": "oops"}, {"final": {"accuracy": None}}):
        text = _render(summary_table(summary))
        assert "Final accuracy" in text and "Rounds to target" in text
        assert text.count("—") >= 10


def test_summary_table_target_missed() -> None:
    text = _render(summary_table({"metrics": {"target_accuracy": 0.99, "rounds_to_target": None}}))
    assert "not reached" in text


def test_summarize_history() -> None:
    s = summarize_history(_history(6), target_accuracy=0.7, centralized_accuracy=0.9)
    assert s["rounds_completed"] == 6
    assert s["final"] == {"accuracy": 0.8, "loss": 1 / 6}
    assert s["metrics"]["rounds_to_target"] == 4  # 0.5 + 4/20 = 0.7
    assert s["metrics"]["bytes_up_total"] == 1536 * 21
    assert s["metrics"]["accuracy_gap"] == pytest.approx(0.1)
    assert summarize_history([])["rounds_completed"] == 0


def test_summarize_history_agrees_with_the_server_on_odd_records() -> None:
    """Missing, None and bool counters count as 0 on both sides, never crash either."""
    history: list[dict[str, Any]] = _history(4)
    history[0]["bytes_up"] = None
    del history[1]["bytes_down"]
    history[2]["clients_sampled"] = True
    partial = summarize_history(history, 0.7, 0.9)["metrics"]
    server = run_metrics(history, 40, 0.7, 0.9, set(range(10)))
    assert server == partial | {"participation_rate": 0.25}
    assert partial["bytes_up_total"] == 1536 * (2 + 3 + 4)


# -------------------------------------------------------------------------- redraw


def _make_run(run_dir: Path, with_summary: bool) -> None:
    with RunStore.create(run_dir, {"rounds": 6, "target_accuracy": 0.7}, "0.1.0") as store:
        for rec in _history(6):
            store.record_round(rec)
        store.set_meta("centralized_accuracy", 0.93)
        if with_summary:
            store.write_summary(
                {
                    "rounds_completed": 6,
                    "wall_s": 3.5,
                    "final": {"accuracy": 0.8, "loss": 0.1667},
                    "metrics": {
                        "rounds_to_target": 4,
                        "target_accuracy": 0.7,
                        "participation_rate": 0.5,
                        "bytes_up_total": 32256,
                        "bytes_down_total": 6 * 3 * 1024 * 1024,
                        "centralized_accuracy": 0.93,
                        "accuracy_gap": 0.13,
                    },
                }
            )


def test_redraw_finished_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _make_run(run, with_summary=True)
    console = Console(record=True, width=150)
    summary = redraw(run, console)
    assert summary["rounds_completed"] == 6 and "partial" not in summary
    assert _is_png(run / "accuracy.png")
    with (run / "history.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["round"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert rows[0]["accuracy"] == "" and rows[1]["accuracy"] == "0.6"
    text = console.export_text()
    assert "3.5s" in text and "50.0%" in text and "18.0 MiB" in text  # from summary.json
    assert "19/20" in text and "0.8000" in text  # history table


def test_redraw_unfinished_run_derives_summary(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _make_run(run, with_summary=False)
    console = Console(record=True, width=150)
    summary = redraw(run, console)
    assert summary["partial"] is True
    assert summary["metrics"]["target_accuracy"] == 0.7  # from config
    assert summary["metrics"]["centralized_accuracy"] == 0.93  # from store meta
    assert summary["metrics"]["rounds_to_target"] == 4
    text = console.export_text()
    assert "no summary.json" in text and "0.9300" in text
    assert _is_png(run / "accuracy.png")
    assert not (run / "summary.json").exists()  # report only reads the summary


def test_redraw_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RunStoreError) as info:
        redraw(tmp_path, Console(record=True, width=150))
    assert "\n" not in str(info.value) and "not a fedloom run" in str(info.value)
    assert not (tmp_path / "accuracy.png").exists()
    with pytest.raises(RunStoreError):
        redraw(tmp_path / "missing", Console(record=True, width=150))


def test_partial_report_equals_the_servers_summary_on_a_recorded_run(tmp_path: Path) -> None:
    """Drop summary.json from a real run: ``fedloom report`` must derive the same numbers.

    Half the clients straggle and are dropped, so upload and download totals differ.
    """
    cfg = load_config(
        None,
        [
            "rounds=3",
            "data.num_clients=6",
            "client.epochs=2",
            "client.straggler_fraction=0.5",
            "server.drop_stragglers=true",
            "target_accuracy=0.3",
        ],
    )
    run = tmp_path / "run"
    server = run_simulation(cfg, run)
    (run / SUMMARY_FILE).unlink()
    partial = redraw(run, Console(record=True, width=150))
    assert partial["partial"] is True
    metrics = server["metrics"]
    assert 0 < metrics["bytes_up_total"] < metrics["bytes_down_total"]
    assert metrics == partial["metrics"] | {"participation_rate": metrics["participation_rate"]}
    assert partial["final"] == server["final"]
    assert partial["rounds_completed"] == server["rounds_completed"]
