"""`fedloom run --import MODULE`: a user's registered stages are reachable from a shell."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedloom.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_import_makes_a_user_aggregator_nameable(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedloom.cli",
            "run",
            "--import",
            "custom_aggregator",
            "--set",
            "server.aggregator='example-median'",
            "--set",
            "rounds=2",
            "--set",
            "data.num_clients=5",
            "--out",
            str(out),
        ],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    history = json.loads((out / "summary.json").read_text())["history"]
    assert [r["median_of"] for r in history] == [5, 5]  # the example's median ran


def test_an_unknown_module_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--import", "no_such_module_here"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--import no_such_module_here" in err and len(err.splitlines()) == 1
