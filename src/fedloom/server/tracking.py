"""Experiment tracking as callbacks: what every tracker logs, and the extras they need.

A tracker is a :class:`~fedloom.callbacks.Callback` with ``after_record = True``: the
run places it after the round record is stored, so it logs the complete record, and
because every runtime (``fedloom run``, ``fedloom server``, the Python API) wires the
same callbacks through :func:`fedloom.engine.simulation.run_federation`, a simulation
and a deployment log alike. The built-in trackers are registered in
:data:`fedloom.registry.CALLBACKS` (``tensorboard`` in :mod:`.tracking_tensorboard`,
``mlflow`` in :mod:`.tracking_mlflow`) and built from the ``[tracking]`` section by
:mod:`fedloom.strategies`; each imports its package only when it is built, and a
missing one is a one-line :class:`~fedloom.config.ConfigError` naming the extra.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from fedloom.config import ConfigError
from fedloom.server.metrics import is_number


def require_extra(module: str, *, extra: str, key: str) -> ModuleType:
    """Import ``module`` or raise one line telling the user which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"{key} needs the '{module.split('.')[0]}' package, which is not installed; "
            f"install it with pip install 'fedloom[{extra}]'"
        ) from None


def numeric_fields(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's top-level real-number fields except ``round`` (the step): what a
    tracker logs as metrics. Per-client dicts (``client_accuracies``, ``contribution``)
    stay in the run's history; booleans are not numbers here."""
    return {
        str(k): float(v)
        for k, v in record.items()
        if k != "round" and is_number(v) and v == v  # NaN: not a measurement
    }


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"client": {"lr": 0.1}}`` → ``{"client.lr": 0.1}``; lists and None as text."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, prefix=f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out
