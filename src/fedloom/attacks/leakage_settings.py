"""Settings of the gradient-leakage evaluation, and the command-line options that set them.

``fedloom leakage`` and ``benchmarks/leakage.py`` both run
:func:`fedloom.attacks.leakage.run_leakage`; they read the same options through
:func:`add_leakage_arguments` and :func:`leakage_settings_from_args`, so an option means
the same thing in both and is checked in one place.

This module is kept apart from :mod:`fedloom.attacks.leakage` because that one imports
torch and SecAgg+ (about 2 s): the ``fedloom`` command builds every subcommand's options
at start-up, and ``fedloom run --help`` must not pay for the leakage attack.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, TypeVar

__all__ = [
    "CONDITION_KINDS",
    "DEFAULT_CLIP_NORM",
    "DEFAULT_LR",
    "FULL_SETTINGS",
    "QUICK_SETTINGS",
    "ConditionKind",
    "LeakageSettings",
    "LeakageSettingsError",
    "add_leakage_arguments",
    "leakage_settings_from_args",
]

ConditionKind = Literal["none", "clip", "dp", "secagg"]
#: The defences, in the order a report lists them.
CONDITION_KINDS: tuple[ConditionKind, ...] = ("none", "clip", "dp", "secagg")

#: The local learning rate η of the victim's one SGD step.
DEFAULT_LR = 0.1
#: C: below every single-example update norm of the untrained model (0.36-0.44 at
#: η = 0.1), so clipping is active in every trial.
DEFAULT_CLIP_NORM = 0.1


class LeakageSettingsError(ValueError):
    """A leakage setting the user can fix; its message is one sentence naming the option."""


@dataclass(frozen=True)
class LeakageSettings:
    """What one leakage evaluation runs; each field is one command-line option.

    ``kinds`` picks the defences (``--conditions``); ``noise_multipliers`` gives one
    ``dp`` condition per z and ``secagg_clients`` one ``secagg`` condition per K. The
    defaults are the quick evaluation (6 conditions × 3 targets, about 10 s on one core);
    :data:`FULL_SETTINGS` is the benchmark's. ``lr`` (the victim's η) has no option: the
    module doc of :mod:`fedloom.attacks.leakage` explains why one small step is the case
    measured. Bad values raise :class:`LeakageSettingsError` here, before any work starts.
    """

    targets: int = 3
    seed: int = 0
    iterations: int = 200
    batch_iterations: int = 300
    clip_norm: float = DEFAULT_CLIP_NORM
    noise_multipliers: tuple[float, ...] = (0.01, 1.0)
    secagg_clients: tuple[int, ...] = (4, 16)
    kinds: tuple[ConditionKind, ...] = CONDITION_KINDS
    lr: float = DEFAULT_LR

    def __post_init__(self) -> None:
        for option, value, least in (
            ("--targets", self.targets, 1),
            ("--seed", self.seed, 0),
            ("--iterations", self.iterations, 1),
            ("--batch-iterations", self.batch_iterations, 1),
        ):
            if value < least:
                raise LeakageSettingsError(f"{option} must be at least {least}, got {value}")
        if not self.kinds:
            raise LeakageSettingsError("--conditions needs at least one of " + _KIND_LIST)
        unknown = [k for k in self.kinds if k not in CONDITION_KINDS]
        if unknown:
            raise LeakageSettingsError(
                f"--conditions: unknown condition {unknown[0]!r}; choose from {_KIND_LIST}"
            )
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise LeakageSettingsError(f"--clip-norm must be positive, got {self.clip_norm:g}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise LeakageSettingsError(f"the learning rate must be positive, got {self.lr:g}")
        if "dp" in self.kinds:
            if not self.noise_multipliers:
                raise LeakageSettingsError("--noise-multiplier needs at least one value for dp")
            bad = [z for z in self.noise_multipliers if not (math.isfinite(z) and z > 0)]
            if bad:
                raise LeakageSettingsError(
                    f"--noise-multiplier values must be positive, got {bad[0]:g}"
                )
        if "secagg" in self.kinds:
            if not self.secagg_clients:
                raise LeakageSettingsError("--secagg-clients needs at least one K for secagg")
            if min(self.secagg_clients) < 2:
                raise LeakageSettingsError(
                    "--secagg-clients values must be at least 2 (a sum of one client's "
                    f"update hides nothing), got {min(self.secagg_clients)}"
                )

    def describe(self) -> str:
        """The one-line account of the setting printed above the table."""
        return (
            f"gradient leakage: {self.targets} digit targets, seed {self.seed}; MLP 64-64-10 "
            f"(sigmoid) at init; one SGD step (lr {self.lr:g}) on one image per client; "
            f"C = {self.clip_norm:g}; L-BFGS ≤ {self.iterations} iterations "
            f"(DLG×K ≤ {self.batch_iterations})"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists), for ``leakage.json``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


_KIND_LIST = ", ".join(CONDITION_KINDS)

#: ``fedloom leakage``'s defaults and ``benchmarks/leakage.py --quick``.
QUICK_SETTINGS = LeakageSettings()
#: The benchmark's full run: 8 conditions × 20 targets, about 2 minutes on one core.
FULL_SETTINGS = LeakageSettings(
    targets=20, batch_iterations=1000, noise_multipliers=(0.001, 0.01, 0.1, 1.0)
)


# --------------------------------------------------------------------------- options

_T = TypeVar("_T")


def _fmt(values: Sequence[object]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def add_leakage_arguments(parser: argparse.ArgumentParser, defaults: LeakageSettings) -> None:
    """Add the evaluation's options to ``parser``; ``defaults`` only fills the help text.

    Every option is read as text and converted by :func:`leakage_settings_from_args`, not
    by argparse, so that a bad value ends in one sentence (argparse would print the usage
    too) and a caller can apply its own defaults (``--quick``) to what was not given.
    """
    d = defaults
    options: tuple[tuple[str, str, str], ...] = (
        ("--targets", "N", f"target digit images, one trial each (default {d.targets})"),
        ("--seed", "N", f"seed of targets, models, dummies and DP noise (default {d.seed})"),
        ("--iterations", "N", f"L-BFGS iterations of DLG and iDLG (default {d.iterations})"),
        (
            "--batch-iterations",
            "N",
            f"L-BFGS iterations of DLG×K under secure aggregation (default {d.batch_iterations})",
        ),
        (
            "--clip-norm",
            "C",
            f"clipping norm of the clip and dp conditions (default {d.clip_norm:g})",
        ),
        (
            "--noise-multiplier",
            "Z[,Z...]",
            f"DP noise multipliers, one dp condition each (default {_fmt(d.noise_multipliers)})",
        ),
        (
            "--secagg-clients",
            "K[,K...]",
            f"clients summed by secure aggregation, one secagg condition each "
            f"(default {_fmt(d.secagg_clients)})",
        ),
        (
            "--conditions",
            "KIND[,KIND...]",
            f"defences to evaluate, from {_KIND_LIST} (default {_fmt(d.kinds)})",
        ),
    )
    for flag, metavar, text in options:
        parser.add_argument(flag, metavar=metavar, help=text)


def _convert(option: str, text: str, kind: Callable[[str], _T], what: str) -> _T:
    try:
        return kind(text.strip())
    except ValueError:
        raise LeakageSettingsError(f"{option} takes {what}, got {text!r}") from None


def _convert_list(option: str, text: str, kind: Callable[[str], _T], what: str) -> tuple[_T, ...]:
    """Comma-separated values, duplicates dropped (the first stays where it is)."""
    items = [item for item in text.split(",") if item.strip()]
    return tuple(dict.fromkeys(_convert(option, item, kind, what) for item in items))


def _kind(text: str) -> ConditionKind:
    """``text`` as a condition kind (the membership test narrows it for the type checker)."""
    if text not in CONDITION_KINDS:
        raise ValueError(text)
    return text


def leakage_settings_from_args(
    args: argparse.Namespace, defaults: LeakageSettings
) -> LeakageSettings:
    """The settings the options of :func:`add_leakage_arguments` ask for.

    An option not given keeps its value from ``defaults``. ``--conditions`` keeps the
    report's order (none, clip, dp, secagg) whatever order it is written in, so that
    tables from different runs line up. Raises :class:`LeakageSettingsError`.
    """
    changes: dict[str, Any] = {}
    scalars: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
        ("targets", "--targets", int, "a whole number"),
        ("seed", "--seed", int, "a whole number"),
        ("iterations", "--iterations", int, "a whole number"),
        ("batch_iterations", "--batch-iterations", int, "a whole number"),
        ("clip_norm", "--clip-norm", float, "a number"),
    )
    for field, option, kind, what in scalars:
        text = getattr(args, field)
        if text is not None:
            changes[field] = _convert(option, text, kind, what)
    if args.noise_multiplier is not None:
        changes["noise_multipliers"] = _convert_list(
            "--noise-multiplier", args.noise_multiplier, float, "numbers"
        )
    if args.secagg_clients is not None:
        changes["secagg_clients"] = _convert_list(
            "--secagg-clients", args.secagg_clients, int, "whole numbers"
        )
    if args.conditions is not None:
        chosen = _convert_list("--conditions", args.conditions, _kind, f"some of {_KIND_LIST}")
        changes["kinds"] = tuple(k for k in CONDITION_KINDS if k in chosen)
    return replace(defaults, **changes)
