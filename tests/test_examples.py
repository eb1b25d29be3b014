"""Every example config validates and runs a short job; the digits example is the default."""

import os
from pathlib import Path

import pytest

from fedloom.config import RunConfig, load_config
from fedloom.engine.simulation import run_simulation

from .conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
NEEDS_SHARED = {"mnist_shards.toml", "shakespeare.toml"}


def test_digits_example_is_the_embedded_default() -> None:
    assert load_config(ROOT / "examples" / "digits.toml") == load_config(None)


def _stand_in_pretrained(cfg: RunConfig, path: Path) -> Path:
    from fedloom.client.models import build_model
    from fedloom.client.pretrain import save_state
    from fedloom.data import build_federated_dataset

    data = build_federated_dataset(cfg.data, cfg.seed)
    return save_state(build_model(cfg.model, data, cfg.seed + 1), path)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_two_rounds(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path.name in NEEDS_SHARED and not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name} needs {SHARED_DATA}")
    monkeypatch.chdir(ROOT)  # example data paths are relative to the repository root
    cfg = load_config(path, ["rounds=2", "client.epochs=1"])
    if cfg.client.steps is not None:
        cfg.client.steps = 2
    if cfg.model.pretrained is not None:
        # Transfer examples name a file `fedloom pretrain` makes; a model of the same
        # shape stands in for it here (the loading and adapters are what runs).
        cfg.model.pretrained = str(_stand_in_pretrained(cfg, tmp_path / "pretrained.pt"))
    if cfg.mode == "vertical":  # a short look: PSI over 150 records, no baselines
        cfg.vertical.records = 150
        cfg.vertical.baselines = False
    summary = run_simulation(cfg, tmp_path / "run")
    assert summary["rounds_completed"] == 2
    assert summary["final"]["accuracy"] is not None
    assert os.path.exists(tmp_path / "run" / "accuracy.png")
