"""A deployed client's durable state file (local DP's privacy ledger across restarts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedloom.cli import main
from fedloom.client_store import ClientState
from fedloom.config import RunConfig, load_config
from fedloom.engine.grpc.client import BuiltinApp, _resume_state, _save_state
from fedloom.engine.grpc.client_state import (
    STATE_VERSION,
    ClientStateError,
    ClientStateFile,
    config_digest,
    default_state_dir,
    site_name,
)
from fedloom.messages import GLOBAL, FitTask

from .deploy_helpers import num_parameters, serving

LEDGER = ClientState({}, {"local_dp": [[1.1, 0.2, 10]]})


def _same(a: ClientState | None, b: ClientState) -> bool:
    assert a is not None
    return (
        a.meta == b.meta
        and sorted(a.tensors) == sorted(b.tensors)
        and all(np.array_equal(a.tensors[k], b.tensors[k]) for k in b.tensors)
    )


def _config_json(*overrides: str) -> str:
    return load_config(None, ["data.num_clients=2", *overrides]).model_dump_json()


def _one_line_error(excinfo: pytest.ExceptionInfo[ClientStateError]) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_round_trip_and_canonical_config_key(tmp_path: Path) -> None:
    cfg = _config_json()
    first = ClientStateFile(tmp_path, "partition-1", cfg)
    assert first.open() is None  # nothing saved yet
    first.save(LEDGER)
    first.close()
    doc = json.loads(first.path.read_text())
    assert doc["version"] == STATE_VERSION and doc["format"] == "fedloom-client-state"
    assert doc["site"] == "partition-1" and doc["config_sha256"] == config_digest(cfg)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [first.path.name, first.path.name + ".lock"]  # no temporary file left

    # The same config written differently (key order, spaces) is the same experiment.
    reformatted = json.dumps(dict(reversed(list(json.loads(cfg).items()))), indent=2)
    again = ClientStateFile(tmp_path, "partition-1", reformatted)
    assert again.path == first.path
    assert _same(again.open(), LEDGER)
    # Tensors (SCAFFOLD's control variate, personal layers) round-trip with the JSON.
    full = ClientState({"scaffold/c": np.linspace(-1, 1, 1000, dtype=np.float32)}, LEDGER.meta)
    again.save(full)
    again.close()
    assert json.loads(again.path.read_text())["meta"] == LEDGER.meta  # readable ledger
    last = ClientStateFile(tmp_path, "partition-1", cfg)
    assert _same(last.open(), full)
    last.close()


def test_a_new_run_starts_algorithm_state_afresh_and_keeps_the_ledger(tmp_path: Path) -> None:
    """Control variates and personal layers belong to one run; the privacy ledger to the
    site. A resumed server keeps its run id, so its clients keep both."""
    cfg = _config_json()
    full = ClientState({"scaffold/c": np.ones(4, dtype=np.float32)}, LEDGER.meta)
    writer = ClientStateFile(tmp_path, "partition-0", cfg, run_id="run-a")
    writer.open()
    writer.save(full)
    writer.close()

    resumed = ClientStateFile(tmp_path, "partition-0", cfg, run_id="run-a")
    assert _same(resumed.open(), full)
    resumed.close()

    fresh = ClientStateFile(tmp_path, "partition-0", cfg, run_id="run-b")
    state = fresh.open()
    assert state is not None and state.tensors == {} and state.meta == LEDGER.meta
    fresh.close()


def test_version_1_files_are_read_as_the_ledger(tmp_path: Path) -> None:
    """A file from before ClientState (version 1: the ledger under "state") resumes."""
    cfg = _config_json()
    state = ClientStateFile(tmp_path, "partition-0", cfg)
    doc = {
        "format": "fedloom-client-state",
        "version": 1,
        "site": "partition-0",
        "config_sha256": config_digest(cfg),
        "state": LEDGER.meta,
    }
    state.path.write_text(json.dumps(doc))
    assert _same(state.open(), LEDGER)
    state.close()


def test_two_experiments_and_two_sites_do_not_mix(tmp_path: Path) -> None:
    a, b = _config_json(), _config_json("seed=1")
    saved = ClientStateFile(tmp_path, "partition-0", a)
    saved.open()
    saved.save(LEDGER)
    saved.close()
    for other in (
        ClientStateFile(tmp_path, "partition-0", b),
        ClientStateFile(tmp_path, "partition-1", a),
    ):
        assert other.path != saved.path and other.open() is None
        other.close()
    # A file copied over another experiment's name is refused, not misread.
    moved = ClientStateFile(tmp_path, "partition-0", b)
    moved.path.write_text(saved.path.read_text())
    with pytest.raises(ClientStateError) as excinfo:
        moved.open()
    assert "belongs to another site or experiment" in _one_line_error(excinfo)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"format": "fedloom-client-state", "version": 1, "st', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "not a fedloom client state file"),
        (b"\xff\xfe".decode("latin-1"), "not UTF-8 text"),
        ("@v2", "its state's JSON is not an object"),
        ("@tensors", "its tensors do not decode"),
        ("@ledger", "local-DP ledger is not"),
    ],
)
def test_corrupt_file_is_refused_with_one_line(tmp_path: Path, content: str, why: str) -> None:
    cfg = _config_json()
    state = ClientStateFile(tmp_path, "partition-0", cfg)
    if content.startswith("@"):  # well-formed JSON of the right file with a bad part
        doc = {
            "format": "fedloom-client-state",
            "version": STATE_VERSION,
            "site": "partition-0",
            "config_sha256": config_digest(cfg),
            "meta": {"local_dp": [["x"]]} if content == "@ledger" else {},
        }
        if content == "@v2":
            doc["meta"] = [1]
        if content == "@tensors":
            doc["tensors"] = "bm90IHNhZmV0ZW5zb3Jz"  # base64 of "not safetensors"
        content = json.dumps(doc)
    state.path.write_text(content, encoding="latin-1")
    with pytest.raises(ClientStateError) as excinfo:
        state.open()
    text = _one_line_error(excinfo)
    assert why in text and str(state.path) in text
    assert "reset this site's spent privacy budget" in text and text.endswith("from zero")
    assert state.path.read_text(encoding="latin-1") == content  # never replaced or deleted


def test_other_version_is_refused(tmp_path: Path) -> None:
    cfg = _config_json()
    state = ClientStateFile(tmp_path, "partition-0", cfg)
    state.open()
    state.save(LEDGER)
    state.close()
    doc = json.loads(state.path.read_text())
    state.path.write_text(json.dumps({**doc, "version": STATE_VERSION + 1}))
    with pytest.raises(ClientStateError) as excinfo:
        state.open()
    assert f"reads version {STATE_VERSION}" in _one_line_error(excinfo)


def test_one_running_client_per_state_file(tmp_path: Path) -> None:
    cfg = _config_json()
    running = ClientStateFile(tmp_path, "partition-0", cfg)
    running.open()
    second = ClientStateFile(tmp_path, "partition-0", cfg)
    with pytest.raises(ClientStateError) as excinfo:
        second.open()
    assert "in use by another running fedloom client" in _one_line_error(excinfo)
    running.close()
    assert second.open() is None
    second.close()


def test_default_folder_and_site_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "fedloom"
    for unusable in ("", "relative/dir"):
        monkeypatch.setenv("XDG_STATE_HOME", unusable)
        assert default_state_dir() == Path.home() / ".local" / "state" / "fedloom"
    assert site_name(3) == "partition-3"
    data = tmp_path / "site.csv"
    assert site_name(-1, data) == site_name(-1, tmp_path / "." / "site.csv")
    assert site_name(-1, data).startswith("data-") and site_name(-1, data) != site_name(
        -1, tmp_path / "other.csv"
    )


def _local_dp(*overrides: str) -> RunConfig:
    return load_config(
        None,
        [
            "data.num_clients=4",
            "client.epochs=1",
            "privacy.local_dp=true",
            "privacy.local_noise_multiplier=1.1",
            *overrides,
        ],
    )


def test_restarted_app_resumes_its_ledger_under_a_new_client_id(tmp_path: Path) -> None:
    """What run_client does around a restart, without gRPC: save after fit, restore at start.

    The second app gets another server-assigned id, as a restarted own-data client may
    (IID partitions of equal size stand in for the same data); the ledger is the site's
    (``ClientState.meta["local_dp"]``), so its ε still composes.
    """
    cfg = _local_dp("data.partition='iid'")
    cfg_json = cfg.model_dump_json()
    app = BuiltinApp(cfg, 1)
    state_file = _resume_state(app, tmp_path, "site", cfg_json)
    assert state_file is not None and not state_file.path.exists()
    w = {GLOBAL: app.runtime.initial_vector()}

    def fit(a: BuiltinApp, cid: int, rnd: int) -> float:
        return a.fit(FitTask(client_id=cid, round=rnd, model_version=rnd - 1), w).metrics[
            "local_epsilon"
        ]

    eps1 = fit(app, 1, 1)
    _save_state(app, state_file)
    assert json.loads(state_file.path.read_text())["meta"]["local_dp"] == app.state.meta["local_dp"]
    state_file.close()

    restarted = BuiltinApp(cfg, 2)
    resumed = _resume_state(restarted, tmp_path, "site", cfg_json)
    assert resumed is not None and resumed.is_open
    eps2 = fit(restarted, 2, 2)
    uninterrupted = fit(app, 1, 2)
    assert eps2 > eps1 and eps2 == pytest.approx(uninterrupted, rel=1e-12)
    resumed.close()

    # A well-formed file whose ledger the accountant cannot take is refused, not dropped.
    doc = json.loads(resumed.path.read_text())
    resumed.path.write_text(json.dumps({**doc, "meta": {"local_dp": [["x"]]}}))
    with pytest.raises(ClientStateError) as excinfo:
        _resume_state(BuiltinApp(cfg, 1), tmp_path, "site", cfg_json)
    assert "malformed state" in _one_line_error(excinfo)

    # An algorithm that keeps no state never touches the disk.
    plain = BuiltinApp(load_config(None, ["data.num_clients=4", "client.epochs=1"]), 1)
    plain_file = _resume_state(plain, tmp_path / "plain", "site", cfg_json)
    assert plain_file is not None
    plain.fit(FitTask(client_id=1, round=1, model_version=0), w)
    _save_state(plain, plain_file)
    assert plain.client_state().is_empty() and not (tmp_path / "plain").exists()


def test_a_failed_fit_leaves_the_state_as_it_was(tmp_path: Path) -> None:
    """The state saved before an update is sent is the state of a fit that succeeded."""
    cfg = _local_dp()
    app = BuiltinApp(cfg, 0)
    w = {GLOBAL: app.runtime.initial_vector()}
    app.fit(FitTask(client_id=0, round=1, model_version=0), w)
    before = app.client_state().copy()
    with pytest.raises(Exception):  # noqa: B017 - any failure of the algorithm
        app.fit(FitTask(client_id=0, round=2, model_version=1), {GLOBAL: w[GLOBAL][:-1]})
    assert _same(app.client_state(), before)


def test_client_with_a_corrupt_state_file_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedloom.engine.grpc.server import DeployOptions, Registry

    cfg = _local_dp()
    registry = Registry(cfg.data.num_clients, num_parameters(cfg), cfg.model_dump_json())
    state = ClientStateFile(tmp_path / "state", "partition-0", cfg.model_dump_json())
    state.path.parent.mkdir()
    state.path.write_text("{ torn")
    with serving(registry, DeployOptions(poll_timeout_s=1)) as port:
        code = main(
            [
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--insecure",
                "--partition",
                "0",
                "--state-dir",
                str(tmp_path / "state"),
                "--max-wait",
                "20",
            ]
        )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedloom: error: client state file")
    assert "not valid JSON" in err and state.path.read_text() == "{ torn"
