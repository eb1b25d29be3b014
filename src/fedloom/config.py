"""Typed run configuration: TOML files, Python objects and ``--set key=value`` overrides.

One :class:`RunConfig` describes an experiment completely, so the same object drives the
simulation engines and (later) the real deployment. Validation happens once, up front,
and every error a user can cause becomes a :class:`ConfigError` whose message is one
line naming the key and what is allowed.

A *strategy* name is a shorthand for a composition of stages (client algorithm,
aggregator, server optimizer). :func:`apply_strategy` fills in the stage settings the
strategy implies, but never overrides a value the user set explicitly.
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem the user can fix; its message is a single line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Section):
    """Synthetic(α, β) of Li et al. 2020 (FedProx), Section 5.1."""

    alpha: float = Field(1.0, ge=0.0)
    beta: float = Field(1.0, ge=0.0)
    iid: bool = False
    num_features: int = Field(60, ge=1)


class DataConfig(_Section):
    """Which data set, and how it is split across clients."""

    name: Literal["digits", "synthetic", "mnist", "shakespeare", "csv"] = "digits"
    path: str | None = None
    num_clients: int = Field(20, ge=1)
    partition: Literal["iid", "dirichlet", "shards", "natural"] = "dirichlet"
    alpha: float = Field(0.5, gt=0.0)
    shards_per_client: int = Field(2, ge=1)
    min_client_samples: int = Field(2, ge=1)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    #: Share of each client's data held out as its local test set, for federated
    #: evaluation on data sets that have no per-client test split of their own.
    client_test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    label_column: str | None = None
    key_column: str | None = None
    seq_len: int = Field(80, ge=1)
    max_clients: int | None = Field(None, ge=1)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


class ModelConfig(_Section):
    """The client model. ``hidden`` sizes apply to ``mlp``; ``logreg`` has none."""

    name: Literal["mlp", "logreg", "cnn", "char_lstm"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64])
    embedding_dim: int = Field(8, ge=1)
    lstm_hidden: int = Field(128, ge=1)
    lstm_layers: int = Field(2, ge=1)


class ClientConfig(_Section):
    """Local training on each client (SGD with momentum and weight decay)."""

    epochs: int = Field(5, ge=1)
    steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    proximal_mu: float = Field(0.0, ge=0.0)
    straggler_fraction: float = Field(0.0, ge=0.0, le=1.0)


class ServerConfig(_Section):
    """Sampling, aggregation and the server optimizer (Reddi et al. 2021, Algorithm 2)."""

    fraction_fit: float = Field(1.0, gt=0.0, le=1.0)
    min_fit_clients: int = Field(2, ge=1)
    min_aggregate_clients: int = Field(1, ge=1)
    drop_stragglers: bool = False
    aggregator: Literal["mean"] = "mean"
    optimizer: Literal["sgd", "momentum", "adam", "yogi", "adagrad"] = "sgd"
    lr: float = Field(1.0, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0)


class EvalConfig(_Section):
    """Centralized (server test set) and federated (clients' local test sets) evaluation."""

    every: int = Field(1, ge=1)
    centralized: bool = True
    federated: bool = False
    batch_size: int = Field(512, ge=1)
    #: Evaluate centrally on a fixed random subset of at most this many test examples
    #: (large text test sets make every evaluation cost more than a round).
    max_examples: int | None = Field(None, ge=1)


class EngineConfig(_Section):
    """Where clients run. ``workers = 0`` means one per CPU core.

    ``torch_threads`` is the intra-op thread count of each process that trains. One is
    the default: simulated clients are small, parallelism comes from pool processes,
    and several spinning OpenMP threads on a busy machine slow training down by an
    order of magnitude. Raise it for large models on the in-process engine.
    """

    name: Literal["inprocess", "pool"] = "inprocess"
    workers: int = Field(0, ge=0)
    torch_threads: int = Field(1, ge=1)


class DeployConfig(_Section):
    """Limits of a real deployment (``fedloom server``); ignored in simulation."""

    round_timeout_s: float = Field(600.0, gt=0.0)
    heartbeat_interval_s: float = Field(1.0, gt=0.0)
    heartbeat_timeout_s: float = Field(10.0, gt=0.0)
    poll_timeout_s: float = Field(5.0, gt=0.0)
    chunk_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    wait_for_clients_s: float = Field(300.0, gt=0.0)
    max_workers: int = Field(256, ge=4)


STRATEGIES: dict[str, dict[str, dict[str, Any]]] = {
    # McMahan et al. 2017: weighted mean, plain server step with lr 1. FedAvg as published
    # drops devices that do not finish E epochs (Li et al. 2020, Section 5.2).
    "fedavg": {"server": {"optimizer": "sgd", "lr": 1.0, "drop_stragglers": True}},
    # Li et al. 2020: proximal term on the client, partial work is kept.
    "fedprox": {
        "client": {"proximal_mu": 0.01},
        "server": {"optimizer": "sgd", "lr": 1.0, "drop_stragglers": False},
    },
    # Hsu et al. 2019: server momentum on the averaged update.
    "fedavgm": {"server": {"optimizer": "momentum", "lr": 1.0, "momentum": 0.9}},
    # Reddi et al. 2021 (FedOpt): adaptive server optimizers.
    "fedadam": {"server": {"optimizer": "adam", "lr": 0.01}},
    "fedyogi": {"server": {"optimizer": "yogi", "lr": 0.01}},
    "fedadagrad": {"server": {"optimizer": "adagrad", "lr": 0.01}},
}


class RunConfig(_Section):
    """A complete experiment."""

    name: str = "fedloom"
    seed: int = 0
    rounds: int = Field(30, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] | None = (
        "fedavg"
    )
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0)
    checkpoint_every: int = Field(1, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> RunConfig:
        if self.server.min_aggregate_clients > self.data.num_clients:
            raise ValueError(
                f"server.min_aggregate_clients ({self.server.min_aggregate_clients}) exceeds "
                f"data.num_clients ({self.data.num_clients}); lower it"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def apply_strategy(cfg: RunConfig) -> RunConfig:
    """Fill in the stage settings a strategy implies, keeping every value the user set."""
    if cfg.strategy is None:
        return cfg
    for section_name, defaults in STRATEGIES[cfg.strategy].items():
        section: _Section = getattr(cfg, section_name)
        for key, value in defaults.items():
            if key not in section.model_fields_set:
                setattr(section, key, value)
    return cfg


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown config key '{key}'; check the spelling against the documented keys"
    msg = first["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg if key == "config" else f"config key '{key}': {msg}"
    if "input" in first and not isinstance(first["input"], dict):
        return f"config key '{key}' = {first['input']!r} is invalid: {msg}"
    return f"config key '{key}' is invalid: {msg}"


def _parse_override_value(raw: str) -> Any:
    """``--set`` values are TOML literals where possible (numbers, booleans, lists)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["client.lr=0.05", "rounds=10"]`` into a nested dict."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'")
        _set_dotted(tree, key.strip(), _parse_override_value(raw.strip()))
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig` with the strategy applied."""
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None
    return apply_strategy(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML file (or the embedded default when ``path`` is None) and apply overrides.

    The embedded default (``fedloom/default.toml``, the same experiment as
    ``examples/digits.toml``) is what ``fedloom run`` with no config runs.
    """
    if path is None:
        tree = tomllib.loads(resources.files("fedloom").joinpath("default.toml").read_text())
    else:
        p = Path(path)
        try:
            tree = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"config file '{p}' does not exist; pass an existing TOML file"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file '{p}' is not valid TOML ({err})") from None
    tree = _merge(tree, parse_overrides(overrides or []))
    return config_from_dict(tree)


def config_from_json(text: str) -> RunConfig:
    """Rebuild a config saved in a run directory (used by ``--resume``)."""
    return config_from_dict(json.loads(text))
