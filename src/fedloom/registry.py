"""Name → factory registries for every kind of stage, open to user code.

A strategy is a composition of stages looked up by name: client algorithms, update
codecs, aggregators, server optimizers, callbacks. fedloom's own stages register
themselves exactly as a user's do, with a decorator::

    from fedloom.registry import AGGREGATORS

    @AGGREGATORS.register("my-median")
    def make_median(params: dict[str, Any], context: StageContext) -> Aggregator: ...

and a config then names them (``server.aggregator = "my-median"``). Registering never
requires editing fedloom. (The pattern is Opacus' accountant registry, one per kind.)

Built-in stages live in modules that register on import; :func:`load_builtins` imports
them once, the first time any registry is asked for a name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: Modules whose import registers fedloom's built-in stages.
BUILTIN_MODULES = (
    "fedloom.server.aggregators",
    "fedloom.server.robust_coordinate",
    "fedloom.server.robust_krum",
    "fedloom.server.robust_geometric",
    "fedloom.server.robust_clipping",
    "fedloom.server.robust_fltrust",
    "fedloom.server.robust_flame",
    "fedloom.server.anomaly",
    "fedloom.server.contribution",
    "fedloom.server.client_quality",
    "fedloom.server.tracking_tensorboard",
    "fedloom.server.tracking_mlflow",
    "fedloom.server.optimizers",
    "fedloom.server.selection",
    "fedloom.algorithms",
    "fedloom.codecs",
    "fedloom.privacy.stages",
    "fedloom.server.watermark",
    "fedloom.attacks.poisoning",
    "fedloom.attacks.omniscient",
    "fedloom.vertical.runner",
)
_loaded = False


def load_builtins() -> None:
    """Import every module that registers built-in stages (idempotent)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


class UnknownStageError(KeyError):
    """A config named a stage nobody registered."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Factories of one kind of stage, by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[F], F]:
        """Decorator: register ``factory`` under ``name``.

        Registering a taken name raises unless ``replace`` is set, so a typo cannot
        shadow a built-in silently.
        """

        def decorate(factory: F) -> F:
            if name in self._factories and not replace:
                raise ValueError(f"a {self.kind} named '{name}' is already registered")
            self._factories[name] = factory
            return factory

        return decorate

    def add(self, name: str, factory: Callable[..., T], *, replace: bool = False) -> None:
        """Register without a decorator (e.g. a class or a lambda)."""
        self.register(name, replace=replace)(factory)

    def get(self, name: str) -> Callable[..., T]:
        load_builtins()
        try:
            return self._factories[name]
        except KeyError:
            raise UnknownStageError(
                f"unknown {self.kind} '{name}'; registered: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        load_builtins()
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        load_builtins()
        return name in self._factories


# The registries themselves hold untyped factories; each stage module documents the
# signature its kind expects (see docs/architecture.md).
CLIENT_ALGORITHMS: Registry[Any] = Registry("client algorithm")
SERVER_ALGORITHMS: Registry[Any] = Registry("server algorithm")
CODECS: Registry[Any] = Registry("update codec")
#: Downlink compression of the round's broadcast (``fedloom.codecs.downlink``).
BROADCAST_CODECS: Registry[Any] = Registry("broadcast codec")
AGGREGATORS: Registry[Any] = Registry("aggregator")
SERVER_OPTIMIZERS: Registry[Any] = Registry("server optimizer")
CALLBACKS: Registry[Any] = Registry("callback")
#: Stages that watch the individual updates beside the aggregator (anomaly detection).
UPDATE_MONITORS: Registry[Any] = Registry("update monitor")
#: Stages that may rewrite the round's decoded updates before the guard rails
#: (fedloom.server.interceptors): the simulated omniscient adversary. Factory
#: ``(section, StageContext)``.
UPDATE_INTERCEPTORS: Registry[Any] = Registry("update interceptor")
#: Secure-aggregation protocols: server halves and client-side participants.
SECURE_AGGREGATIONS: Registry[Any] = Registry("secure aggregation")
PROTOCOL_PARTICIPANTS: Registry[Any] = Registry("protocol participant")
#: Client selection for fixed-size rounds (``server.selection``); factory ``(options)``.
CLIENT_SELECTORS: Registry[Any] = Registry("client selector")
#: Post-aggregation edits of the global model (fedloom.server.transforms), e.g. WAFFLE.
MODEL_TRANSFORMS: Registry[Any] = Registry("model transform")
#: Run modes that bring their own parties and loop instead of the horizontal federation
#: (``mode = "vertical"``). Factory ``(cfg, store, *, on_round) -> participation``: it
#: trains, stores its round records (and summary meta) in the run store, and returns
#: each participant's participation count; ``engine/simulation.py`` writes the outputs.
RUN_MODES: Registry[Any] = Registry("run mode")
