"""``fedloom robustness``: the attack × defense grid on one config.

Every cell is an ordinary simulated run of the config with ``attack.kind`` and
``server.aggregator`` set (and the partition, rounds and attack fraction the command
names), so a cell is reproducible with ``fedloom run --set ...``. The table holds each
run's final clean test accuracy and, for backdoor rows, the attack success rate
(``backdoor_accuracy``). It is printed, and written as ``robustness.json``,
``robustness.md`` and ``robustness.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from fedloom.cli.common import EXIT_INTERRUPTED
from fedloom.config import ConfigError, RunConfig, load_config
from fedloom.registry import AGGREGATORS

#: The issue's rows and columns; aggregators registered later (fltrust, flame) join the
#: default columns when present.
DEFAULT_ATTACKS: tuple[str, ...] = (
    "none",
    "label_flip",
    "sign_flip",
    "gaussian",
    "alie",
    "ipm",
    "min_max",
    "backdoor",
)
DEFAULT_AGGREGATORS: tuple[str, ...] = (
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
    "rfa",
    "centered_clipping",
    "norm_bound",
    "fltrust",
    "flame",
)
PARTITIONS = ("iid", "dirichlet")

DESCRIPTION = """\
Run an attack x defense grid: every attack (rows; "none" is the clean run) against every
aggregator (columns), on each partition, with --fraction of the clients malicious. Cells
are final clean test accuracy; backdoor cells add the attack success rate on triggered
test inputs. Writes DIR/robustness.json, robustness.md and robustness.png.

Each cell is one simulation of the config (about 4-10 s for 10 rounds of the default
digits experiment on one core); set --set engine.name=pool to use more cores."""


def add_robustness_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--attacks",
        default=",".join(DEFAULT_ATTACKS),
        help=f"comma-separated attack kinds, 'none' for the clean run (default: "
        f"{','.join(DEFAULT_ATTACKS)}; also: scale, min_sum)",
    )
    p.add_argument(
        "--aggregators",
        default=None,
        help="comma-separated registered aggregators (default: "
        f"{','.join(DEFAULT_AGGREGATORS)}, those registered)",
    )
    p.add_argument("--partitions", default="iid,dirichlet", help="iid and/or dirichlet")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (0.5)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default: config)")
    p.add_argument(
        "--fraction", type=float, default=None, help="share of malicious clients (default 0.2)"
    )
    p.add_argument(
        "--aggregator-option",
        dest="aggregator_options",
        action="append",
        default=[],
        metavar="AGG.KEY=VALUE",
        help="an option for one aggregator, e.g. norm_bound.max_norm=1.0 (repeatable)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/robustness"),
        metavar="DIR",
        help="where to write robustness.json, .md and .png (default runs/robustness)",
    )
    p.add_argument("--keep-runs", action="store_true", help="keep every cell's run directory")


def _names(raw: str, what: str) -> list[str]:
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--{what} is empty; name at least one")
    return names


def grid_axes(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """(attacks, aggregators, partitions), checked against the registries."""
    # Imported here: it pulls in torch, which the other commands' start-up should not pay.
    from fedloom.attacks.poisoning import ATTACK_KINDS

    attacks = _names(args.attacks, "attacks")
    for a in attacks:
        if a != "none" and a not in ATTACK_KINDS:
            raise ConfigError(
                f"--attacks: unknown attack '{a}'; choose from none, {', '.join(ATTACK_KINDS)}"
            )
    known = AGGREGATORS.names()
    if args.aggregators is None:
        aggregators = [a for a in DEFAULT_AGGREGATORS if a in known]
    else:
        aggregators = _names(args.aggregators, "aggregators")
        for a in aggregators:
            if a not in known:
                raise ConfigError(
                    f"--aggregators: unknown aggregator '{a}'; registered: {', '.join(known)}"
                )
    partitions = _names(args.partitions, "partitions")
    for p in partitions:
        if p not in PARTITIONS:
            raise ConfigError(f"--partitions: unknown partition '{p}'; choose iid or dirichlet")
    return attacks, aggregators, partitions


def _aggregator_options(items: Sequence[str], aggregators: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, dot, rest = item.partition(".")
        if not dot or "=" not in rest:
            raise ConfigError(f"--aggregator-option expects AGG.KEY=VALUE, got '{item}'")
        if name not in aggregators:
            raise ConfigError(
                f"--aggregator-option {item}: '{name}' is not one of the grid's aggregators"
            )
        out.setdefault(name, []).append(f"server.aggregator_options.{rest}")
    return out


def cell_overrides(
    args: argparse.Namespace, *, attack: str, aggregator: str, partition: str
) -> list[str]:
    """The ``--set`` overrides that make one cell's run from the base config."""
    sets = [
        f"data.partition={json.dumps(partition)}",
        f"data.alpha={args.alpha}",
        f"server.aggregator={json.dumps(aggregator)}",
        f"attack.kind={json.dumps(attack)}",
    ]
    if args.rounds is not None:
        sets.append(f"rounds={args.rounds}")
    if args.fraction is not None:
        sets.append(f"attack.fraction={args.fraction}")
    return sets


def _run_cell(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    from fedloom.engine.simulation import run_simulation

    cfg.checkpoint_every = cfg.rounds
    summary = run_simulation(cfg, out_dir)
    history = summary["history"]
    last: dict[str, Any] = next((r for r in reversed(history) if r.get("accuracy") is not None), {})
    excluded = [len(r.get("excluded_clients", [])) for r in history if "excluded_clients" in r]
    return {
        "accuracy": last.get("accuracy"),
        "backdoor_accuracy": last.get("backdoor_accuracy"),
        "excluded_per_round": sum(excluded) / len(excluded) if excluded else None,
        "malicious_clients": summary.get("attack", {}).get("malicious_clients", []),
        "rounds": summary["rounds_completed"],
        "wall_s": summary["wall_s"],
    }


def cmd_robustness(args: argparse.Namespace, console: Console) -> int:
    attacks, aggregators, partitions = grid_axes(args)
    agg_sets = _aggregator_options(args.aggregator_options, aggregators)
    # Every cell's config is validated before the first run, so a typo costs no waiting.
    configs: list[tuple[str, str, str, RunConfig]] = []
    for partition in partitions:
        for attack in attacks:
            for aggregator in aggregators:
                sets = cell_overrides(
                    args, attack=attack, aggregator=aggregator, partition=partition
                )
                sets += agg_sets.get(aggregator, [])
                cfg = load_config(args.config, [*args.overrides, *sets])
                configs.append((partition, attack, aggregator, cfg))
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"--out {out}: cannot create the directory ({err.strerror or err})"
        ) from None
    cells: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="fedloom-robustness-") as tmp:
            for i, (partition, attack, aggregator, cfg) in enumerate(configs):
                base = out / "runs" if args.keep_runs else Path(tmp)
                run_dir = base / partition / attack / aggregator
                result = _run_cell(cfg, run_dir)
                cells.append(
                    {"partition": partition, "attack": attack, "aggregator": aggregator, **result}
                )
                console.print(
                    f"[{i + 1}/{len(configs)}] {partition} {attack} x {aggregator}: "
                    f"{format_cell(cells[-1])}",
                    markup=False,
                    highlight=False,
                )
    except KeyboardInterrupt:
        print("fedloom: interrupted; no table was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    base_cfg = configs[0][3]
    meta = {
        "config": None if args.config is None else str(args.config),
        "overrides": list(args.overrides),
        "aggregator_options": list(args.aggregator_options),
        "data": base_cfg.data.name,
        "num_clients": base_cfg.data.num_clients,
        "rounds": base_cfg.rounds,
        "fraction": base_cfg.attack.fraction,
        "alpha": args.alpha,
        "seed": base_cfg.seed,
        "wall_s": time.perf_counter() - started,
    }
    table = format_markdown(cells, attacks, aggregators, partitions, meta)
    console.print(table, markup=False, highlight=False, soft_wrap=True)
    (out / "robustness.json").write_text(json.dumps({**meta, "cells": cells}, indent=2) + "\n")
    (out / "robustness.md").write_text(table)
    plot_grid(cells, attacks, aggregators, partitions, out / "robustness.png")
    console.print(
        f"wrote {out / 'robustness.json'}, {out / 'robustness.md'} and {out / 'robustness.png'}",
        markup=False,
        highlight=False,
    )
    return 0


def format_cell(cell: dict[str, Any]) -> str:
    acc = cell.get("accuracy")
    text = "n/a" if acc is None else f"{acc:.3f}"
    backdoor = cell.get("backdoor_accuracy")
    if backdoor is not None:
        text += f" (bd {backdoor:.2f})"
    return text


def format_markdown(
    cells: Sequence[dict[str, Any]],
    attacks: Sequence[str],
    aggregators: Sequence[str],
    partitions: Sequence[str],
    meta: dict[str, Any],
) -> str:
    """One table per partition: attacks down, aggregators across."""
    by_key = {(c["partition"], c["attack"], c["aggregator"]): c for c in cells}
    lines: list[str] = []
    for partition in partitions:
        label = "IID" if partition == "iid" else f"Dirichlet α = {meta['alpha']:g}"
        lines.append(
            f"{meta['data']}, {meta['num_clients']} clients, {label}, "
            f"{meta['fraction']:.0%} malicious, {meta['rounds']} rounds, seed {meta['seed']}: "
            "final clean accuracy (bd = backdoor success)"
        )
        lines.append("")
        lines.append("| attack | " + " | ".join(aggregators) + " |")
        lines.append("|---|" + "---:|" * len(aggregators))
        for attack in attacks:
            row = [format_cell(by_key[(partition, attack, a)]) for a in aggregators]
            lines.append(f"| {attack} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_grid(
    cells: Sequence[dict[str, Any]],
    attacks: Sequence[str],
    aggregators: Sequence[str],
    partitions: Sequence[str],
    path: Path,
) -> None:
    """Heat maps of final clean accuracy (backdoor success written beside it)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_key = {(c["partition"], c["attack"], c["aggregator"]): c for c in cells}
    fig = Figure(
        figsize=(1.1 * len(aggregators) * len(partitions) + 2, 0.5 * len(attacks) + 2),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(partitions), squeeze=False)[0]
    image = None
    for ax, partition in zip(axes, partitions, strict=True):
        grid = np.array(
            [
                [by_key[(partition, k, a)].get("accuracy") or 0.0 for a in aggregators]
                for k in attacks
            ]
        )
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i, k in enumerate(attacks):
            for j, a in enumerate(aggregators):
                ax.text(
                    j,
                    i,
                    format_cell(by_key[(partition, k, a)]).replace(" (", "\n("),
                    ha="center",
                    va="center",
                    fontsize=7,
                )
        ax.set_xticks(range(len(aggregators)), aggregators, rotation=45, ha="right")
        ax.set_yticks(range(len(attacks)), attacks)
        ax.set_title(partition)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="final clean accuracy")
    fig.savefig(path, dpi=110)
