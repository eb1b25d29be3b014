"""Shared test settings.

One torch thread per process: the suite runs on 2-core CI machines next to pool-engine
worker processes, and oversubscribed OpenMP threads spin instead of working.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.deploy_helpers import Proc

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the project; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _client_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployed clients with local DP keep their privacy ledger under ``$XDG_STATE_HOME``
    by default (``fedloom.engine.grpc.client_state``): point it into the test's own folder,
    so no test writes to the real home or resumes a ledger an earlier test left there.
    Child processes inherit it."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture
def procs() -> Iterator[Callable[[list[str]], Proc]]:
    """Start child processes (servers, clients) that are killed when the test ends,
    whatever its outcome, so no test leaves a process holding a port."""
    started: list[Proc] = []

    def start(args: list[str]) -> Proc:
        p = Proc(args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
