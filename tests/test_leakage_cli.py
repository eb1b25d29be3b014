"""`fedloom leakage` end to end, and the options it shares with benchmarks/leakage.py.

The attack runs at tiny settings (2 targets, no defence and a secure-aggregation sum of
16, a token DLG×K budget: about 2 s). The ordering asserted is the one tests/test_leakage.py
already relies on, with its thresholds: DLG recovers every target without a defence
(> 30 dB; seed 0 measures 100 and 64 dB) and gets at least 50 dB less from the sum
(measured 12 dB on average).
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fedloom.attacks.leakage import DEFAULT_CONDITIONS, QUICK_CONDITIONS
from fedloom.attacks.leakage_settings import FULL_SETTINGS, QUICK_SETTINGS
from fedloom.cli import main

TINY = ["--targets", "2", "--secagg-clients", "16", "--batch-iterations", "20"]


def _numbers(value: Any) -> list[float]:
    """Every number in a JSON value, however deep."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [n for item in items for n in _numbers(item)]


def test_leakage_command_writes_json_png_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "leak"
    # Written out of order on purpose: the report keeps none before secagg.
    assert main(["leakage", *TINY, "--conditions", "secagg,none", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "no defense" in stdout and "secure aggregation K=16" in stdout
    assert "baseline: mean digit" in stdout and str(out / "leakage.json") in stdout
    assert (out / "leakage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((out / "leakage.json").read_text())
    assert summary["settings"]["targets"] == 2
    assert summary["settings"]["kinds"] == ["none", "secagg"]
    assert len(summary["targets"]) == 2
    none, secagg = summary["conditions"]
    assert (none["name"], secagg["name"]) == ("no defense", "secure aggregation K=16")
    numbers = _numbers(summary)
    assert numbers and all(math.isfinite(n) for n in numbers)
    for condition in (none, secagg):
        assert 0.0 <= condition["label_accuracy"] <= 1.0
        assert len(condition["attacks"]["dlg"]["psnr_db"]) == 2
    assert none["attacks"]["batch"] is None and secagg["attacks"]["batch"] is not None

    clear, summed = none["attacks"]["dlg"], secagg["attacks"]["dlg"]
    assert min(clear["psnr_db"]) > 30.0
    assert summed["psnr_db_mean"] < clear["psnr_db_mean"] - 50.0
    assert summed["mse_mean"] > clear["mse_mean"]
    assert clear["psnr_db_mean"] == pytest.approx(statistics.fmean(clear["psnr_db"]))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--targets", "0"], "--targets must be at least 1"),
        (["--targets", "two"], "--targets takes a whole number"),
        (["--targets", "100000"], "--targets must be at most 1797"),
        (["--noise-multiplier", "0.1,-1"], "--noise-multiplier values must be positive"),
        (["--clip-norm", "nan"], "--clip-norm must be positive"),
        (["--secagg-clients", "1"], "--secagg-clients values must be at least 2"),
        (["--conditions", "none,fancy"], "--conditions takes some of none, clip, dp, secagg"),
    ],
)
def test_bad_values_end_in_one_line_and_exit_2(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["leakage", *args, "--out", str(tmp_path / "leak")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedloom: error: ")
    assert needle in err
    assert captured.out == ""
    assert not (tmp_path / "leak" / "leakage.json").exists()


def test_an_out_path_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    assert main(["leakage", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err


def test_defaults_are_the_quick_settings_and_the_benchmark_keeps_its_conditions() -> None:
    """The conditions now built from settings are the ones the benchmark always ran."""
    assert [c.name for c in DEFAULT_CONDITIONS] == [
        "no defense",
        "clipping alone (C=0.1)",
        "clip + DP noise z=0.001",
        "clip + DP noise z=0.01",
        "clip + DP noise z=0.1",
        "clip + DP noise z=1",
        "secure aggregation K=4",
        "secure aggregation K=16",
    ]
    assert [c.name for c in QUICK_CONDITIONS] == [
        c.name for c in DEFAULT_CONDITIONS if c.noise_multiplier not in (0.001, 0.1)
    ]
    assert (FULL_SETTINGS.targets, FULL_SETTINGS.batch_iterations) == (20, 1000)
    assert (QUICK_SETTINGS.targets, QUICK_SETTINGS.batch_iterations) == (3, 300)


def _benchmark() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "leakage.py"
    spec = importlib.util.spec_from_file_location("benchmark_leakage", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_reads_the_same_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    benchmark = _benchmark()
    png = tmp_path / "grid.png"
    tiny = ["--targets", "1", "--iterations", "5", "--conditions", "none"]
    assert benchmark.main(["--quick", *tiny, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "1 digit targets" in out and "no defense" in out and png.exists()
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--targets", "0"])
    assert exit_info.value.code == 2
    assert "--targets must be at least 1" in capsys.readouterr().err
