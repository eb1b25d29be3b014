"""Attacked simulations end to end: an attack hurts the mean, a robust aggregator resists,
the run records its malicious clients and the backdoor's success, on every engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.attacks.poisoning import malicious_client_ids
from fedloom.cli import main
from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation
from tests.helpers import final_weights

# Small and short: 10 clients (2 malicious), 2 local epochs, 3 rounds.
BASE = ["data.partition='iid'", "data.num_clients=10", "client.epochs=2", "checkpoint_every=100"]


def _run(tmp_path: Path, name: str, *sets: str) -> dict[str, Any]:
    cfg = load_config(None, [*BASE, *sets])
    return run_simulation(cfg, tmp_path / name)


def test_sign_flip_breaks_the_mean_and_the_median_resists(tmp_path: Path) -> None:
    attack = ["rounds=3", "attack.kind='sign_flip'", "attack.fraction=0.2"]
    mean = _run(tmp_path, "mean", *attack)
    median = _run(tmp_path, "median", *attack, "server.aggregator='median'")
    assert mean["final"]["accuracy"] < 0.3
    assert median["final"]["accuracy"] > 0.85
    truth = malicious_client_ids(num_clients=10, fraction=0.2, seed=0)
    assert mean["attack"] == {"kind": "sign_flip", "fraction": 0.2, "malicious_clients": truth}


def test_backdoor_run_records_success_and_norm_bound_exclusions(tmp_path: Path) -> None:
    out = _run(
        tmp_path,
        "bd",
        "rounds=3",
        "attack.kind='backdoor'",
        "server.aggregator='norm_bound'",
        "server.aggregator_options.max_norm=1.0",
    )
    truth = set(malicious_client_ids(num_clients=10, fraction=0.2, seed=0))
    for record in out["history"]:
        assert 0.0 <= record["backdoor_accuracy"] <= 1.0
        # The boosted backdoor updates are the ones norm bounding scaled down.
        assert truth <= set(record["excluded_clients"])
    undefended = _run(tmp_path, "bd-mean", "rounds=3", "attack.kind='backdoor'")
    assert undefended["history"][-1]["backdoor_accuracy"] > 0.5
    assert undefended["history"][-1]["backdoor_accuracy"] > out["history"][-1]["backdoor_accuracy"]


@pytest.mark.slow  # starts two worker processes
def test_a_colluding_attack_gives_the_same_model_on_the_pool_engine(tmp_path: Path) -> None:
    sets = [
        "rounds=1",
        "data.num_clients=6",
        "attack.kind='alie'",
        "attack.fraction=0.34",
        "client.epochs=1",
    ]
    _run(tmp_path, "inprocess", *sets)
    _run(tmp_path, "pool", *sets, "engine.name='pool'", "engine.workers=2")
    np.testing.assert_array_equal(
        final_weights(tmp_path / "inprocess"), final_weights(tmp_path / "pool")
    )


def test_robustness_command_writes_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grid"
    rc = main(
        [
            "robustness",
            "--attacks",
            "none,backdoor",
            "--aggregators",
            "mean",
            "--partitions",
            "iid",
            "--rounds",
            "1",
            "--set",
            "data.num_clients=5",
            "--set",
            "client.epochs=1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "| backdoor |" in text and "bd " in text
    assert {p.name for p in out.iterdir()} == {"robustness.json", "robustness.md", "robustness.png"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--aggregators", "mean,bogus"], "unknown aggregator 'bogus'"),
        (["--attacks", "sign_flip,nope"], "unknown attack 'nope'"),
        (["--partitions", "shards"], "unknown partition 'shards'"),
    ],
)
def test_robustness_command_refuses_unknown_names_in_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["robustness", *args, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
