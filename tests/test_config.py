"""Config validation: every user mistake is one clear line naming the key."""

from pathlib import Path

import pytest

from fedloom.cli import main
from fedloom.config import ConfigError, load_config, parse_overrides


def test_defaults_are_the_demo() -> None:
    cfg = load_config()
    assert (cfg.data.name, cfg.data.num_clients, cfg.data.partition) == ("digits", 20, "dirichlet")
    assert cfg.data.alpha == 0.5 and cfg.rounds == 30 and cfg.strategy == "fedavg"


def test_strategy_fills_defaults_but_keeps_user_values() -> None:
    cfg = load_config(None, ["strategy='fedprox'", "client.proximal_mu=1.0"])
    assert cfg.client.proximal_mu == 1.0 and cfg.server.drop_stragglers is False
    cfg = load_config(None, ["strategy='fedadam'"])
    assert cfg.server.optimizer == "adam" and cfg.server.lr == 0.01
    cfg = load_config(None, ["strategy='fedadam'", "server.lr=0.5"])
    assert cfg.server.lr == 0.5


def test_overrides_parse_toml_literals() -> None:
    assert parse_overrides(["a.b=3", "c=true", "d=[1, 2]", "e=hello"]) == {
        "a": {"b": 3},
        "c": True,
        "d": [1, 2],
        "e": "hello",
    }


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["client.lrr=0.1"], "unknown config key 'client.lrr'"),
        (["client.lr='fast'"], "config key 'client.lr'"),
        (["client.lr=-1"], "config key 'client.lr'"),
        (["data.name='imagenet'"], "config key 'data.name'"),
        (["rounds=0"], "config key 'rounds'"),
        (["server.min_aggregate_clients=50"], "server.min_aggregate_clients"),
        (["novalue"], "--set expects key=value"),
    ],
)
def test_config_errors_are_one_line(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_config_error_exit_2_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[client]\nepochs = 'many'\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedloom: error: config key 'client.epochs'")
    assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "missing.toml"], "does not exist"),
        (["run", "--set", "data.name='mnist'", "--set", "data.path='/nonexistent/x'"], "data.path"),
        (["report", "/nonexistent/run"], "/nonexistent/run"),
        # Stage names are looked up in the registries when the run is assembled.
        (["run", "--set", "server.aggregator='no-such-rule'"], "unknown aggregator 'no-such-rule'"),
        (["run", "--set", "client.algorithm='nope'"], "client.algorithm: unknown client algorithm"),
        (
            ["run", "--set", "strategy='scaffold'", "--set", "privacy.local_dp=true"],
            "privacy.local_dp trains clients with DP-SGD",
        ),
    ],
)
def test_cli_user_errors(
    args: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if args[0] == "run":
        args = [*args, "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err
