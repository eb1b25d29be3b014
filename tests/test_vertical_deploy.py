"""Vertical FL between real party processes (``fedloom party``) over gRPC with TLS.

The acceptance checks: a label party and two feature parties on loopback train the
example config's model, and it equals the simulation's (same records, same PSI); a
feature party killed mid-run stops the label party with a one-line error naming it.
Processes are synchronised on their output lines, never on sleeps.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedloom.cli import main

from .deploy_helpers import (
    Proc,
    dev_certs,
    fedloom,
    mtls_client_args,
    mtls_server_args,
    set_args,
)

CONFIG = "examples/vertical_breast_cancer.toml"
#: Small and fast: the first 120 records (~114 ids per party, ~900 PSI exponentiations).
SMALL = ["vertical.records=120", "vertical.baselines=false"]


def _setup(tmp_path: Path, overrides: list[str]) -> tuple[Path, Path]:
    certs = dev_certs(tmp_path / "certs", ["party-0", "party-1"])
    tables = tmp_path / "tables"
    assert main(["party", "--export-tables", str(tables), CONFIG, *set_args(overrides)]) == 0
    return certs, tables


def _start(
    procs: Callable[[list[str]], Proc], tmp_path: Path, overrides: list[str]
) -> tuple[Proc, list[Proc]]:
    certs, tables = _setup(tmp_path, overrides)
    label = procs(
        fedloom(
            "party",
            "--role",
            "label",
            CONFIG,
            *set_args(overrides),
            "--data",
            str(tables / "label.csv"),
            "--address",
            "127.0.0.1:0",
            *mtls_server_args(certs),
            "--out",
            str(tmp_path / "label"),
        )
    )
    port = label.wait_for(r"listening on 127\.0\.0\.1:(\d+)", timeout=120).group(1)
    features = [
        procs(
            fedloom(
                "party",
                "--role",
                "features",
                "--party",
                str(k),
                "--data",
                str(tables / f"features_{k}.csv"),
                "--server",
                f"localhost:{port}",
                *mtls_client_args(certs, f"party-{k}"),
                "--out",
                str(tmp_path / f"party{k}"),
            )
        )
        for k in range(2)
    ]
    return label, features


def test_party_processes_train_the_simulations_model(
    procs: Callable[[list[str]], Proc], tmp_path: Path
) -> None:
    overrides = ["rounds=3", *SMALL]
    label, features = _start(procs, tmp_path, overrides)
    # The simulation of the same config, in this process while the parties work.
    sim_dir = tmp_path / "sim"
    assert main(["run", CONFIG, *set_args(overrides), "--out", str(sim_dir)]) == 0
    assert label.wait(timeout=240) == 0, label.output
    for f in features:
        assert f.wait(timeout=60) == 0, f.output

    sim = load_file(sim_dir / "model.safetensors")
    deployed = load_file(tmp_path / "label" / "model.safetensors")  # the top model only
    assert set(deployed) == {k for k in sim if k.startswith("top.")}
    for k in range(2):  # each feature party holds only its own bottom model
        own = load_file(tmp_path / f"party{k}" / "model.safetensors")
        assert set(own) == {n for n in sim if n.startswith(f"bottom{k}.")}
        deployed |= own
    assert set(deployed) == set(sim)
    for name, value in sim.items():
        np.testing.assert_allclose(deployed[name], value, rtol=0, atol=1e-5, err_msg=name)

    a = json.loads((sim_dir / "summary.json").read_text())
    b = json.loads((tmp_path / "label" / "summary.json").read_text())
    assert b["outcome"] == "completed" and b["rounds_completed"] == 3
    for key in ("intersection_size", "set_sizes", "bytes_exchanged", "exponentiations"):
        assert b["alignment"][key] == a["alignment"][key], key
    assert b["alignment"]["wire_bytes"] >= b["alignment"]["bytes_exchanged"]
    for x, y in zip(a["history"], b["history"], strict=True):
        for key in ("accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "steps"):
            assert x[key] == y[key], (key, x, y)
        assert y["wire_bytes_up"] >= x["bytes_up"] and y["rejected_messages"] == 0

    # PSI aligned exactly: the common ids of the three CSVs, in the clear.
    ids = [
        {line.split(",", 1)[0] for line in (tmp_path / "tables" / name).read_text().split()[1:]}
        for name in ("label.csv", "features_0.csv", "features_1.csv")
    ]
    assert b["alignment"]["intersection_size"] == len(ids[0] & ids[1] & ids[2])
    # Each slot is held by the identity of its certificate.
    book = json.loads((tmp_path / "label" / "parties.json").read_text())
    assert book == {"0": "party-0", "1": "party-1"}


@pytest.mark.slow
def test_killed_feature_party_stops_the_label_party_naming_it(
    procs: Callable[[list[str]], Proc], tmp_path: Path
) -> None:
    overrides = ["rounds=100000", *SMALL]  # it cannot finish before the kill
    label, features = _start(procs, tmp_path, overrides)
    label.wait_for(r"^round 2: ", timeout=240)
    features[1].popen.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code = label.wait(timeout=60)
    assert code == 1, label.output
    assert time.monotonic() - killed < 60
    errors = [line for line in label.lines if line.startswith("fedloom: run failed:")]
    assert len(errors) == 1, label.output
    assert re.search(r"feature party 1 \('party-1'\) dropped.* in round \d+", errors[0])
    assert "cannot train without its columns" in errors[0]
    # The other feature party is told and stops too, non-zero, with its own line.
    assert features[0].wait(timeout=60) == 1, features[0].output
    assert "feature party 1" in features[0].output
    # Completed rounds are kept, and the summary says why the run stopped.
    summary = json.loads((tmp_path / "label" / "summary.json").read_text())
    assert summary["rounds_completed"] >= 2
    assert summary["outcome"] == "stopped"
    assert "feature party 1" in summary["stopped_reason"]
