"""Compare runs: one table row per run and an overlay of their accuracy curves.

``fedloom compare RUN_DIR ...`` answers "which of these ten runs did best, and at what
cost?" without opening ten folders. Like :mod:`fedloom.report` it reads only the run
directory contract of :mod:`fedloom.store` (SQLite in WAL mode), so it works on runs
that are still going: a run without ``summary.json`` gets the numbers its recorded
rounds determine (:func:`fedloom.report.summarize_history`, the same function the
server's own summary is built on) and is marked ``running``.

Rounds to target are each run's own target unless a common ``target`` is given, in
which case they are recomputed from every run's history, so runs configured with
different targets can still be compared on one.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from fedloom.report import (
    DASH,
    format_bytes,
    format_duration,
    format_float,
    number_or_none,
    subsection,
    summarize_history,
)
from fedloom.server.metrics import history_total, rounds_to_target
from fedloom.server.metrics import is_number as _is_number
from fedloom.store import RunStore, atomic_write

__all__ = ["RunView", "compare_rows", "compare_table", "load_run", "plot_overlay"]

#: Record or summary keys for the worst-10 % client accuracy, when federated evaluation
#: keeps per-client accuracies (read generically: older runs simply lack them).
WORST10_KEY = "client_accuracy_worst10"


@dataclass(frozen=True)
class RunView:
    """What :func:`load_run` read from one run directory."""

    path: Path
    label: str
    config: dict[str, Any]
    history: list[dict[str, Any]]
    #: ``summary.json``, or a partial summary derived from the history (running run).
    summary: dict[str, Any]
    #: ``summary.json`` exists: the run ended (completed, stopped or failed).
    finished: bool
    #: Seconds the run has spent so far (stored per round, so known while it runs).
    wall_s: float | None


def load_run(path: Path, label: str | None = None) -> RunView:
    """Read one run (finished or running) through :class:`~fedloom.store.RunStore`.

    Raises :class:`~fedloom.store.RunStoreError` (one line) if ``path`` is not a run.
    """
    path = Path(path)
    with RunStore.open(path) as store:
        config = store.config()
        history = store.history()
        stored = store.read_summary()
        meta_wall = number_or_none(store.get_meta("wall_s"))
        centralized = number_or_none(store.get_meta("centralized_accuracy"))
    if stored is None:
        summary = summarize_history(
            history, number_or_none(config.get("target_accuracy")), centralized
        )
        wall = meta_wall
    else:
        summary = stored
        wall = number_or_none(stored.get("wall_s"))
        if wall is None:
            wall = meta_wall
    return RunView(
        path=path,
        label=label if label is not None else path.name,
        config=config,
        history=history,
        summary=summary,
        finished=stored is not None,
        wall_s=wall,
    )


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """Each run's directory name, with as many parent folders as it takes to tell apart
    runs that share a name (``a/run`` and ``b/run``); a run named twice gets ``#2``."""
    resolved = [Path(p).resolve() for p in paths]
    distinct = list(dict.fromkeys(resolved))
    parts = [p.parts[1:] or (str(p),) for p in distinct]
    labels = ["/".join(p[-1:]) for p in parts]
    for depth in range(2, max((len(p) for p in parts), default=1) + 1):
        if len(set(labels)) == len(labels):
            break
        labels = [
            "/".join(p[-depth:]) if labels.count(lab) > 1 else lab
            for p, lab in zip(parts, labels, strict=True)
        ]
    label_of = dict(zip(distinct, labels, strict=True))
    seen: dict[Path, int] = {}
    out = []
    for path in resolved:
        seen[path] = seen.get(path, 0) + 1
        out.append(label_of[path] if seen[path] == 1 else f"{label_of[path]} #{seen[path]}")
    return out


def _epsilon(run: RunView) -> tuple[float | None, str]:
    """The privacy budget spent and its kind: central DP's ledger, else the worst local ε."""
    privacy = subsection(run.summary, "privacy")
    if _is_number(privacy.get("epsilon")):
        return float(privacy["epsilon"]), "central"
    central = [float(r["epsilon"]) for r in run.history if _is_number(r.get("epsilon"))]
    if central:
        return central[-1], "central"
    local = [
        float(r["local_epsilon_max"]) for r in run.history if _is_number(r.get("local_epsilon_max"))
    ]
    if local:
        return max(local), "local"
    return None, ""


def _last_value(run: RunView, key: str) -> float | None:
    """``key`` from the summary (final, then metrics), else its last recorded number."""
    for section in ("final", "metrics"):
        value = subsection(run.summary, section).get(key)
        if _is_number(value):
            return float(value)
    return next((float(r[key]) for r in reversed(run.history) if _is_number(r.get(key))), None)


def _status(run: RunView) -> str:
    if not run.finished:
        return "running"
    outcome = run.summary.get("outcome")
    return str(outcome) if isinstance(outcome, str) else "finished"


def compare_rows(runs: Sequence[RunView], *, target: float | None = None) -> list[dict[str, Any]]:
    """One dict of raw numbers per run (None where unknown): what the table shows.

    With ``target``, rounds to target are recomputed from each run's history against it;
    otherwise they are each run's own (its configured ``target_accuracy``).
    """
    rows = []
    for run in runs:
        metrics = subsection(run.summary, "metrics")
        final = subsection(run.summary, "final")
        if target is not None:
            run_target: float | None = target
            reached = rounds_to_target(run.history, target)
        else:
            run_target = number_or_none(metrics.get("target_accuracy"))
            if run_target is None:
                run_target = number_or_none(run.config.get("target_accuracy"))
            reached = metrics.get("rounds_to_target")
            if not _is_number(reached):
                reached = rounds_to_target(run.history, run_target)
        epsilon, eps_kind = _epsilon(run)
        up = metrics.get("bytes_up_total")
        down = metrics.get("bytes_down_total")
        rows.append(
            {
                "run": run.label,
                "path": str(run.path),
                "strategy": run.config.get("strategy") or "custom",
                "status": _status(run),
                "rounds": len(run.history),
                "final_accuracy": number_or_none(final.get("accuracy")),
                WORST10_KEY: _last_value(run, WORST10_KEY),
                "target_accuracy": run_target,
                "rounds_to_target": int(reached) if _is_number(reached) else None,
                "epsilon": epsilon,
                "epsilon_kind": eps_kind,
                "bytes_up": int(up) if _is_number(up) else history_total(run.history, "bytes_up"),
                "bytes_down": int(down)
                if _is_number(down)
                else history_total(run.history, "bytes_down"),
                "wall_s": run.wall_s,
                "sim_time_s": next(
                    (
                        float(r["sim_time_s"])
                        for r in reversed(run.history)
                        if _is_number(r.get("sim_time_s"))
                    ),
                    None,
                ),
            }
        )
    return rows


def compare_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """The comparison as a terminal table; optional columns appear only when some run
    has them (worst-10 % client accuracy, simulated time)."""
    table = Table(title="Runs", box=box.SIMPLE_HEAD)
    columns: list[tuple[str, str]] = [
        ("run", "left"),
        ("strategy", "left"),
        ("status", "left"),
        ("rounds", "right"),
        ("final acc", "right"),
    ]
    worst = any(_is_number(r.get(WORST10_KEY)) for r in rows)
    if worst:
        columns.append(("worst-10% acc", "right"))
    columns += [
        ("to target", "right"),
        ("ε", "right"),
        ("up", "right"),
        ("down", "right"),
        ("wall", "right"),
    ]
    sim = any(_is_number(r.get("sim_time_s")) for r in rows)
    if sim:
        columns.append(("sim time", "right"))
    for name, justify in columns:
        if name == "run":
            longest = max((len(str(r["run"])) for r in rows), default=3)
            table.add_column(name, justify="left", min_width=min(longest, 24), ratio=1)
        else:
            wrap = name in ("strategy", "status", "to target")
            table.add_column(name, justify=justify, no_wrap=not wrap)  # type: ignore[arg-type]
    targets = {r.get("target_accuracy") for r in rows}
    for r in rows:
        if _is_number(r.get("rounds_to_target")):
            reached = str(int(r["rounds_to_target"]))
        elif _is_number(r.get("target_accuracy")):
            reached = "not reached"
        else:
            reached = DASH
        if len(targets) > 1 and _is_number(r.get("target_accuracy")):
            reached += f" (≥{r['target_accuracy']:g})"
        eps = DASH
        if _is_number(r.get("epsilon")):
            eps = f"{r['epsilon']:.3g}" + (" local" if r.get("epsilon_kind") == "local" else "")
        cells = [str(r["run"]), str(r["strategy"]), str(r["status"]), str(r["rounds"])]
        cells.append(format_float(r.get("final_accuracy")))
        if worst:
            cells.append(format_float(r.get(WORST10_KEY)))
        cells += [
            reached,
            eps,
            format_bytes(r.get("bytes_up")),
            format_bytes(r.get("bytes_down")),
            format_duration(r.get("wall_s")),
        ]
        if sim:
            cells.append(format_duration(r.get("sim_time_s")))
        table.add_row(*cells)
    common = {t for t in targets if _is_number(t)}
    if len(common) == 1 and len(targets) == 1:
        table.caption = f"to target: first round with accuracy ≥ {common.pop():g}"
    return table


def _curve(history: Sequence[Mapping[str, Any]], x_key: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for record in history:
        x, y = record.get(x_key), record.get("accuracy")
        if _is_number(x) and _is_number(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def has_sim_time(runs: Sequence[RunView]) -> bool:
    """Every run recorded simulated time on its evaluated rounds (``[system]`` enabled)."""
    return bool(runs) and all(_curve(run.history, "sim_time_s")[0] for run in runs)


def plot_overlay(
    runs: Sequence[RunView], path: Path, *, target: float | None = None, title: str = ""
) -> Path:
    """Accuracy against round, one line per run; beside it accuracy against simulated
    time when every run recorded it. Written atomically as a PNG at ``path``.

    A dashed line marks ``target`` (or the runs' common configured target).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sim = has_sim_time(runs)
    fig = Figure(figsize=(13 if sim else 8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if sim else 1, squeeze=False)[0]
    panels = [(axes[0], "round", "round")]
    if sim:
        panels.append((axes[1], "sim_time_s", "simulated time (s)"))
    if target is None:
        targets = {number_or_none(run.config.get("target_accuracy")) for run in runs}
        target = targets.pop() if len(targets) == 1 else None
    for ax, key, xlabel in panels:
        drawn = False
        for run in runs:
            xs, ys = _curve(run.history, key)
            if xs:
                ax.plot(xs, ys, "-o", markersize=3, label=run.label)
                drawn = True
        if target is not None:
            ax.axhline(target, linestyle="--", color="tab:red", label=f"target {target:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(True, alpha=0.3)
        if key == "round":
            ax.xaxis.get_major_locator().set_params(integer=True)
        if drawn:
            ax.legend(loc="lower right", fontsize="small")
        else:
            ax.text(
                0.5, 0.5, "no evaluated rounds", ha="center", va="center", transform=ax.transAxes
            )
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write(Path(path), buf.getvalue())
