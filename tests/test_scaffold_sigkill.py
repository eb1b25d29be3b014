"""A SCAFFOLD run killed with SIGKILL and resumed ends with exactly the model of an
uninterrupted run: the global model, the server control variate and every client's
control variate all come back from the checkpoint (issue: stage seams, item 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedloom.registry import CLIENT_ALGORITHMS
from tests.helpers import latest_checkpoint

ROUNDS = 30
ARGS = [
    "--set",
    "strategy='scaffold'",
    "--set",
    f"rounds={ROUNDS}",
    "--set",
    "data.num_clients=6",
    "--set",
    "server.fraction_fit=0.5",
    "--set",
    "client.epochs=1",
    "--set",
    "client.momentum=0.0",
    "--set",
    "client.lr=0.05",
]


def _fedloom(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedloom.cli", *args]


def _checkpointed_rounds(run: Path) -> list[int]:
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("round_*.safetensors"))


@pytest.mark.slow
@pytest.mark.skipif("scaffold" not in CLIENT_ALGORITHMS, reason="SCAFFOLD is not registered")
def test_scaffold_killed_and_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_fedloom("run", *ARGS, "--out", str(whole)), env=env, check=True, timeout=300)

    run = tmp_path / "killed"
    # The event to act on is a checkpoint on disk (never a sleep): stdout carries one
    # line per round with -v, and the checkpoint of round 3 exists once that line is out.
    proc = subprocess.Popen(
        _fedloom("run", *ARGS, "--out", str(run), "-v"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for _line in proc.stdout:
            if any(r >= 3 for r in _checkpointed_rounds(run)):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before the kill arrived")
    assert proc.returncode == -signal.SIGKILL
    assert max(_checkpointed_rounds(run)) < ROUNDS

    done = subprocess.run(
        _fedloom("run", "--resume", str(run)), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr

    a, b = latest_checkpoint(whole), latest_checkpoint(run)
    assert a.round == b.round == ROUNDS
    for key in ("global", "algo/control"):
        assert a.tensors[key].tobytes() == b.tensors[key].tobytes(), key
    np.testing.assert_array_equal(a.tensors["participation"], b.tensors["participation"])
