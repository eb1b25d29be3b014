"""fedloom: federated learning that runs the same experiment in simulation and for real."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fedloom.api import connect, serve, simulate

__all__ = ["__version__", "connect", "serve", "simulate"]


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562): ``import fedloom.config`` stays free of torch, and
    # fedloom.engine.simulation can import __version__ from here without a cycle.
    if name in ("simulate", "serve", "connect"):
        from fedloom import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedloom' has no attribute {name!r}")
