"""The `fedloom` command end to end: run, resume, centralized baseline, report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedloom.cli import main

FAST = ["--set", "rounds=3", "--set", "client.epochs=1", "--set", "data.num_clients=5"]


def test_run_report_and_centralized(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["run", *FAST, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "Rounds completed" in out and str(run) in out

    assert main(["centralized", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "centralized accuracy" in out and "gap to centralized" in out
    summary = json.loads((run / "summary.json").read_text())
    metrics = summary["metrics"]
    assert (
        metrics["centralized_accuracy"]
        == json.loads((run / "centralized.json").read_text())["accuracy"]
    )
    assert metrics["accuracy_gap"] == pytest.approx(
        metrics["centralized_accuracy"] - summary["final"]["accuracy"]
    )

    (run / "accuracy.png").unlink()
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert (run / "accuracy.png").exists() and "Gap to centralized" in out


def test_refuses_to_overwrite_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["run", *FAST, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["run", *FAST, "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err


def test_resume_rejects_config_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--resume", str(tmp_path), "--set", "rounds=3"]) == 2
    assert "--resume cannot change 'rounds'" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "--resume continues a run" in capsys.readouterr().err


@pytest.mark.slow
def test_sigint_then_resume_in_real_processes(tmp_path: Path) -> None:
    """Interrupt a real `fedloom run` mid-run, then resume it to the same rounds."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fedloom.cli",
        "run",
        "--set",
        "rounds=40",
        "--set",
        "data.num_clients=5",
        "--out",
        str(run),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: restore the default so that how the suite was launched cannot matter.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # A bound, not a timing: on a busy machine start-up alone can take minutes.
    deadline = time.monotonic() + 600
    checkpointed = 0  # the last round checkpointed when the interrupt was sent
    try:
        while time.monotonic() < deadline and not checkpointed:
            found = (run / "checkpoints").glob("round_*.safetensors")
            checkpointed = max((int(p.stem.split("_")[1]) for p in found), default=0)
            if not checkpointed:
                assert proc.poll() is None, "the run ended before its first checkpoint"
                time.sleep(0.05)
        assert checkpointed, "the run wrote no checkpoint within 600 s"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Python turns SIGINT into KeyboardInterrupt within the round it lands in; a run that
    # still had most of its 40 rounds to go and finished anyway ignored the interrupt.
    # Only a run interrupted in its last rounds (a machine so busy that this process
    # slept through them) may have finished first.
    if proc.returncode == 0 and checkpointed >= 35:
        pytest.skip(f"the interrupt was sent after round {checkpointed} of 40")
    assert proc.returncode != 0, f"SIGINT sent after round {checkpointed} of 40 was ignored"
    assert proc.returncode == 130 and "fedloom run --resume" in err and "Traceback" not in err
    done = subprocess.run(
        [sys.executable, "-m", "fedloom.cli", "run", "--resume", str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    history = json.loads((run / "summary.json").read_text())["history"]
    assert [r["round"] for r in history] == list(range(1, 41))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--partition", "0"], "the key holder trains nothing"),
        (["--min-contributors", "0"], "--min-contributors must be at least 1"),
    ],
)
def test_key_holder_flags_are_checked(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["client", "--server", "127.0.0.1:1", "--insecure", "--key-holder", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "runner", "resume"),
    [
        (["run"], "fedloom.engine.simulation.run_simulation", "fedloom run --resume {out}"),
        (
            ["server", "--address", "127.0.0.1:0"],
            "fedloom.engine.deploy.run_server",
            "fedloom server --resume {out} --address 127.0.0.1:0 ...",
        ),
    ],
    ids=["run", "server"],
)
def test_ctrl_c_says_how_to_resume(
    argv: list[str],
    runner: str,
    resume: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both commands that write a run directory answer Ctrl-C alike: one line, exit 130."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, interrupted)
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    expected = "fedloom: interrupted; completed rounds are kept. Continue with: "
    assert err == expected + resume.format(out=out)


def test_server_on_an_address_it_cannot_bind_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for i, address in enumerate((f"127.0.0.1:{port}", "999.1.1.1:5")):
            out = str(tmp_path / f"r{i}")
            args = ["server", "--address", address, "--insecure", "--allow-anonymous"]
            assert main([*args, "--out", out]) == 2
            err = capsys.readouterr().err.strip()
            assert f"cannot listen on {address}" in err and len(err.splitlines()) == 1, err
