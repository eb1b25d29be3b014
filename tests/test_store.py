"""RunStore: the run directory contract, durability, and bit-exact checkpoints."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedloom.store as store_mod
from fedloom.store import Checkpoint, RunStore, RunStoreError

SRC = Path(__file__).resolve().parents[1] / "src"


def _record(rnd: int, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "round": rnd,
        "accuracy": 0.5 + rnd / 100,
        "loss": 1.0 / (rnd + 1),
        "fed_accuracy": None,
        "train_loss": 0.2,
        "clients_sampled": 20,
        "clients_succeeded": 19,
        "clients_failed": 1,
        "bytes_up": 1000 * rnd,
        "bytes_down": 2000,
        "epsilon": None,
        "round_s": 0.42,
    }
    rec.update(extra)
    return rec


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = RunStore.create(tmp_path / "run", {"rounds": 5, "seed": 1}, "0.1.0")
    yield s
    s.close()


# --------------------------------------------------------------------- create / open


def test_create_writes_layout_and_open_reads_config(tmp_path: Path) -> None:
    run = tmp_path / "nested" / "run"
    config = {"rounds": 3, "strategy": {"name": "fedavg"}, "target_accuracy": 0.9}
    with RunStore.create(run, config, "1.2.3") as s:
        assert s.run_dir == run
    assert json.loads((run / "config.json").read_text()) == config
    assert (run / "run.sqlite").is_file()
    assert (run / "checkpoints").is_dir()
    with RunStore.open(run) as s:
        assert s.config() == config
        assert s.get_meta("fedloom_version") == "1.2.3"


def test_create_refuses_existing_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    RunStore.create(run, {}, "0.1.0").close()
    with pytest.raises(RunStoreError) as info:
        RunStore.create(run, {"other": 1}, "0.1.0")
    msg = str(info.value)
    assert "\n" not in msg and "--out" in msg and "--resume" in msg
    # the existing run is untouched
    assert json.loads((run / "config.json").read_text()) == {}


def test_create_accepts_existing_empty_dir_and_rejects_a_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    RunStore.create(tmp_path / "empty", {}, "0.1.0").close()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunStoreError, match="not a directory"):
        RunStore.create(tmp_path / "afile", {}, "0.1.0")


def test_create_with_unserializable_config_leaves_no_claim(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(TypeError):
        RunStore.create(run, {"bad": object()}, "0.1.0")
    RunStore.create(run, {"good": 1}, "0.1.0").close()  # not blocked by a half-made run


def test_config_and_meta_accept_numpy_values(tmp_path: Path) -> None:
    with RunStore.create(tmp_path / "r", {"lr": np.float32(0.5), "n": np.int64(3)}, "v") as s:
        assert s.config() == {"lr": 0.5, "n": 3}
        s.set_meta("arr", np.arange(3))
        assert s.get_meta("arr") == [0, 1, 2]


@pytest.mark.parametrize("kind", ["missing", "no_db", "foreign_db", "garbage_db"])
def test_open_rejects_non_run_dirs(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "x"
    if kind != "missing":
        target.mkdir()
    if kind == "foreign_db":
        import sqlite3

        conn = sqlite3.connect(target / "run.sqlite")
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
    if kind == "garbage_db":
        (target / "run.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RunStoreError) as info:
        RunStore.open(target)
    assert "\n" not in str(info.value)
    assert str(target) in str(info.value)


def test_closed_store_refuses_use(store: RunStore) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.history()


# ------------------------------------------------------------------ rounds, failures


def test_record_replace_and_history_order(store: RunStore) -> None:
    for rnd in (3, 1, 2):
        store.record_round(_record(rnd))
    store.record_round(_record(2, accuracy=0.99, extra_key="new"))
    hist = store.history()
    assert [r["round"] for r in hist] == [1, 2, 3]
    assert hist[1]["accuracy"] == 0.99 and hist[1]["extra_key"] == "new"
    assert hist[0] == _record(1)
    assert hist[0]["fed_accuracy"] is None


def test_record_round_validates_round(store: RunStore) -> None:
    with pytest.raises(KeyError):
        store.record_round({"accuracy": 0.5})
    with pytest.raises(TypeError):
        store.record_round({"round": "3"})
    with pytest.raises(ValueError):
        store.record_round({"round": -1})
    store.record_round({"round": np.int64(4), "loss": np.float64(0.25)})
    assert store.history() == [{"round": 4, "loss": 0.25}]


def test_failures_by_round(store: RunStore) -> None:
    store.record_failure(2, 7, "ValueError: boom", "Traceback...\nValueError: boom")
    store.record_failure(1, 3, "OOM", "tb1")
    store.record_failure(2, 4, "Timeout", "tb2")
    all_f = store.failures()
    assert [(f["round"], f["client_id"]) for f in all_f] == [(1, 3), (2, 7), (2, 4)]
    assert all_f[1]["traceback"] == "Traceback...\nValueError: boom"
    assert [f["client_id"] for f in store.failures(2)] == [7, 4]
    assert store.failures(9) == []


def test_meta_roundtrip_and_default(store: RunStore) -> None:
    assert store.get_meta("centralized_accuracy") is None
    assert store.get_meta("missing", default=5) == 5
    store.set_meta("centralized_accuracy", 0.97)
    store.set_meta("rounds_to_target", None)
    store.set_meta("nested", {"a": [1, 2, {"b": None}]})
    store.set_meta("centralized_accuracy", 0.98)
    assert store.get_meta("centralized_accuracy") == 0.98
    assert store.get_meta("rounds_to_target", default="x") is None  # stored None != missing
    assert store.get_meta("nested") == {"a": [1, 2, {"b": None}]}


def test_truncate_after(store: RunStore) -> None:
    for rnd in range(1, 7):
        store.record_round(_record(rnd))
        store.record_failure(rnd, 1, "e", "tb")
    store.truncate_after(4)
    assert [r["round"] for r in store.history()] == [1, 2, 3, 4]
    assert [f["round"] for f in store.failures()] == [1, 2, 3, 4]
    store.truncate_after(0)
    assert store.history() == [] and store.failures() == []


# ------------------------------------------------------------------------ durability


def test_record_visible_to_second_opener_without_close(tmp_path: Path) -> None:
    run = tmp_path / "run"
    writer = RunStore.create(run, {}, "0.1.0")
    writer.record_round(_record(1))
    writer.record_failure(1, 5, "err", "tb")
    writer.set_meta("k", 1)
    reader = RunStore.open(run)  # the writer is still open, as in a live run
    assert reader.history() == [_record(1)]
    assert reader.failures()[0]["client_id"] == 5
    assert reader.get_meta("k") == 1
    reader.close()
    writer.close()


def test_rounds_survive_sigkill(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(SRC)!r})
        from pathlib import Path
        from fedloom.store import RunStore
        s = RunStore.create(Path({str(run)!r}), {{}}, "0.1.0")
        for r in range(1, 4):
            s.record_round({{"round": r, "accuracy": r / 10}})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with RunStore.open(run) as s:
        assert [r["accuracy"] for r in s.history()] == [0.1, 0.2, 0.3]


# ------------------------------------------------------------------------ checkpoints


def _assert_bit_exact(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


def test_checkpoint_roundtrip_bit_exact(store: RunStore) -> None:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal(1000).astype(np.float32)
    # NaN, inf, signed zero, smallest subnormal
    f32[:4] = np.array([np.nan, np.inf, -0.0, 1e-45], dtype=np.float32)
    tensors: dict[str, np.ndarray] = {
        "global": f32,
        "opt/m": rng.standard_normal((7, 3)),  # float64
        "opt/step": np.array(12345678901234, dtype=np.int64),  # 0-d
        "client/17/c": np.arange(-5, 5, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    meta = {"rng": {"state": 2**100 + 7, "inc": 3}, "step": 12, "ledger": [0.1, None]}
    path = store.save_checkpoint(Checkpoint(round=12, tensors=tensors, meta=meta))
    assert path.name == "round_00012.safetensors"
    loaded = store.latest_checkpoint()
    assert loaded is not None
    assert loaded.round == 12
    assert loaded.meta == meta
    _assert_bit_exact(tensors, loaded.tensors)
    loaded.tensors["global"][0] = 1.0  # callers update optimizer state in place


def test_checkpoint_non_contiguous_and_big_endian(store: RunStore) -> None:
    base = np.arange(20, dtype=np.float64).reshape(4, 5)
    view = base[:, ::2]  # non-contiguous: must not be written as raw memory
    big = np.arange(6, dtype=">i8")
    store.save_checkpoint(Checkpoint(1, {"view": view, "big": big}))
    loaded = store.latest_checkpoint()
    assert loaded is not None
    np.testing.assert_array_equal(loaded.tensors["view"], view)
    np.testing.assert_array_equal(loaded.tensors["big"], big)


def test_checkpoint_empty_tensors(store: RunStore) -> None:
    store.save_checkpoint(Checkpoint(round=0, tensors={}, meta={"only": "meta"}))
    loaded = store.latest_checkpoint()
    assert loaded is not None
    assert loaded.round == 0 and loaded.tensors == {} and loaded.meta == {"only": "meta"}


def test_checkpoint_rejects_bad_tensors(store: RunStore) -> None:
    with pytest.raises(TypeError):
        store.save_checkpoint(Checkpoint(1, {"s": np.array(["a", "b"])}))
    with pytest.raises(ValueError, match="reserved"):
        store.save_checkpoint(Checkpoint(1, {"__fedloom__/x": np.zeros(1)}))
    with pytest.raises(ValueError):
        store.save_checkpoint(Checkpoint(1, {}), keep_last=0)
    assert store.latest_checkpoint() is None


def test_no_checkpoint_returns_none(store: RunStore) -> None:
    assert store.latest_checkpoint() is None


def test_keep_last_pruning_and_latest(store: RunStore) -> None:
    for rnd in range(1, 8):
        store.save_checkpoint(Checkpoint(rnd, {"global": np.full(3, rnd, np.float32)}), 3)
    names = sorted(p.name for p in store.checkpoint_dir.iterdir())
    assert names == [f"round_{r:05d}.safetensors" for r in (5, 6, 7)]
    latest = store.latest_checkpoint()
    assert latest is not None and latest.round == 7
    assert latest.tensors["global"].tolist() == [7.0, 7.0, 7.0]
    assert store.get_meta("latest_checkpoint_round") == 7


def test_latest_uses_numeric_not_lexical_order(store: RunStore) -> None:
    store.save_checkpoint(Checkpoint(99999, {}), keep_last=5)
    store.save_checkpoint(Checkpoint(100000, {}), keep_last=5)  # 6 digits sorts before "99999"
    latest = store.latest_checkpoint()
    assert latest is not None and latest.round == 100000


def test_saving_older_round_drops_abandoned_future(store: RunStore) -> None:
    for rnd in (4, 5, 6):
        store.save_checkpoint(Checkpoint(rnd, {}))
    store.save_checkpoint(Checkpoint(5, {"global": np.ones(2)}))  # resumed from 4, redid 5
    names = sorted(p.name for p in store.checkpoint_dir.iterdir())
    assert names == ["round_00004.safetensors", "round_00005.safetensors"]
    latest = store.latest_checkpoint()
    assert latest is not None and latest.round == 5 and "global" in latest.tensors


def test_failed_save_is_atomic(store: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save_checkpoint(Checkpoint(1, {"global": np.ones(4, np.float32)}))

    def broken_save(tensors: Any, filename: Any, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        store.save_checkpoint(Checkpoint(2, {"global": np.zeros(4, np.float32)}))
    assert [p.name for p in store.checkpoint_dir.iterdir()] == ["round_00001.safetensors"]
    latest = store.latest_checkpoint()
    assert latest is not None and latest.round == 1


def test_stale_temp_files_are_cleaned(store: RunStore) -> None:
    stale = store.checkpoint_dir / ".tmp-round_00003.deadbeef.part"
    stale.write_bytes(b"left by a killed process")
    store.save_checkpoint(Checkpoint(3, {}))
    assert [p.name for p in store.checkpoint_dir.iterdir()] == ["round_00003.safetensors"]


def test_corrupt_newest_checkpoint_falls_back(store: RunStore) -> None:
    store.save_checkpoint(Checkpoint(1, {"g": np.ones(2)}))
    store.save_checkpoint(Checkpoint(2, {"g": np.ones(2)}))
    store.checkpoint_path(2).write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning, match="round_00002"):
        latest = store.latest_checkpoint()
    assert latest is not None and latest.round == 1
    store.checkpoint_path(1).write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(RunStoreError, match="no readable checkpoint"):
        store.latest_checkpoint()


def test_resume_flow(tmp_path: Path) -> None:
    """Run 5 rounds, checkpoint at 3, 'crash', reopen: resume from 3 with rounds 4-5 gone."""
    run = tmp_path / "run"
    s = RunStore.create(run, {"rounds": 5}, "0.1.0")
    for rnd in range(1, 6):
        s.record_round(_record(rnd))
        if rnd == 3:
            s.save_checkpoint(Checkpoint(rnd, {"global": np.full(2, rnd, np.float32)}))
    # no close: the process died
    resumed = RunStore.open(run)
    ckpt = resumed.latest_checkpoint()
    assert ckpt is not None and ckpt.round == 3
    resumed.truncate_after(ckpt.round)
    assert [r["round"] for r in resumed.history()] == [1, 2, 3]
    resumed.close()
    s.close()


# ------------------------------------------------------------------------- exports


def test_history_csv(store: RunStore) -> None:
    store.record_round({"round": 1, "accuracy": None, "loss": 0.5, "clients_sampled": 3})
    store.record_round({"loss": 0.25, "round": 2, "accuracy": 0.75, "epsilon": 1.5, "tags": [1]})
    path = store.write_history_csv()
    assert path == store.run_dir / "history.csv"
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["round", "accuracy", "loss", "clients_sampled", "epsilon", "tags"]
    assert rows[1] == ["1", "", "0.5", "3", "", ""]
    assert rows[2] == ["2", "0.75", "0.25", "", "1.5", "[1]"]


def test_history_csv_empty_run(store: RunStore) -> None:
    assert store.write_history_csv().read_text() == "round\n"


def test_summary_roundtrip(store: RunStore) -> None:
    assert store.read_summary() is None
    summary = {
        "fedloom_version": "0.1.0",
        "rounds_completed": 2,
        "final": {"accuracy": 0.9, "loss": None},
        "metrics": {"bytes_up_total": np.int64(10), "rounds_to_target": None},
        "history": [_record(1), _record(2)],
    }
    path = store.write_summary(summary)
    text = path.read_text()
    assert text.startswith('{\n  "fedloom_version"')  # indent=2
    loaded = json.loads(text)
    assert loaded["metrics"]["bytes_up_total"] == 10
    assert loaded["history"][1] == _record(2)
    assert store.read_summary() == loaded
    leftovers = [p.name for p in store.run_dir.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_files_are_not_private_only(store: RunStore) -> None:
    """Temp-file tricks must not leave results readable only by their owner (mkstemp 0600)."""
    old = os.umask(0o022)
    try:
        store.write_summary({})
        store.save_checkpoint(Checkpoint(1, {}))
    finally:
        os.umask(old)
    assert (store.run_dir / "summary.json").stat().st_mode & 0o044 == 0o044
    assert store.checkpoint_path(1).stat().st_mode & 0o044 == 0o044
