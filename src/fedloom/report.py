"""Reports for a run: the accuracy plot, terminal tables, and ``fedloom report DIR``.

Everything here reads the run directory contract of :mod:`fedloom.store`; it never
needs the model, the data or torch, so a run can be inspected (even while it is still
going) on any machine that has the directory.

matplotlib is imported lazily inside :func:`plot_accuracy` (it costs a noticeable
fraction of a second), and the figure is drawn through ``matplotlib.figure.Figure``
with the Agg canvas rather than through ``pyplot``: that needs no display (servers,
CI), leaves the caller's pyplot backend alone (a notebook keeps its inline plots) and
keeps no global figure registry that could leak figures across many runs.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from fedloom.server.metrics import history_metrics, last_evaluation
from fedloom.server.metrics import is_number as _is_number
from fedloom.store import PLOT_FILE, RunStore, RunStoreError, atomic_write

__all__ = [
    "DASH",
    "DEFAULT_HISTORY_COLUMNS",
    "format_bytes",
    "format_duration",
    "format_float",
    "format_int",
    "format_percent",
    "format_value",
    "history_table",
    "number_or_none",
    "plot_accuracy",
    "redraw",
    "subsection",
    "summarize_history",
    "summary_table",
]

#: What a table shows for a value the run did not record.
DASH = "—"

#: Columns of :func:`history_table` when none are requested. ``clients`` is derived
#: (succeeded/sampled); every other name is a history record key.
DEFAULT_HISTORY_COLUMNS: tuple[str, ...] = (
    "round",
    "accuracy",
    "loss",
    "clients",
    "bytes_up",
    "bytes_down",
    "epsilon",
    "round_s",
)

# Short headers keep the default table inside an 80-column terminal.
_COLUMN_TITLES: dict[str, str] = {
    "round": "round",
    "accuracy": "accuracy",
    "loss": "loss",
    "clients": "ok/sampled",
    "bytes_up": "up",
    "bytes_down": "down",
    "epsilon": "ε",
    "round_s": "time",
}


# ----------------------------------------------------------------------- formatting


def format_bytes(n: Any) -> str:
    """Bytes in binary units (``512 B``, ``1.5 KiB``, ``12.3 MiB``); ``—`` if unknown."""
    if not _is_number(n):
        return DASH
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_float(value: Any, digits: int = 4) -> str:
    """``value`` with ``digits`` decimals (accuracies, losses); ``—`` if not a number, so
    a missing or ``None`` field never breaks a table."""
    return f"{value:.{digits}f}" if _is_number(value) else DASH


def format_int(value: Any) -> str:
    """``value`` as a whole number (rounds, client counts); ``—`` if not a number."""
    return str(int(value)) if _is_number(value) else DASH


def format_percent(value: Any) -> str:
    """A fraction as a percentage with one decimal (``0.625`` -> ``62.5%``); ``—`` if not
    a number."""
    return f"{100 * value:.1f}%" if _is_number(value) else DASH


def format_duration(seconds: Any) -> str:
    """``42.1s``, ``3m 07.5s`` or ``2h 05m 03s``: readable at any run length, and one
    format for every command that shows a run's time (``report``, ``compare``)."""
    if not _is_number(seconds):
        return DASH
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    minutes, sec = divmod(s, 60)
    if minutes < 60:
        return f"{int(minutes)}m {sec:04.1f}s"
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes:02d}m {int(sec):02d}s"


def number_or_none(value: Any) -> float | None:
    """``value`` as a float, or None where a stored field is missing or not a number."""
    return float(value) if _is_number(value) else None


def format_value(value: Any) -> str:
    """Any other recorded value: floats to four significant digits, ``None`` as ``—``."""
    if value is None:
        return DASH
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _history_cell(record: Mapping[str, Any], column: str) -> str:
    value = record.get(column)
    if column == "clients":
        ok, sampled = record.get("clients_succeeded"), record.get("clients_sampled")
        if not (_is_number(ok) or _is_number(sampled)):
            return DASH
        return f"{format_int(ok)}/{format_int(sampled)}"
    if column == "round":
        return format_int(value)
    if column in ("accuracy", "loss", "fed_accuracy", "fed_loss", "train_loss"):
        return format_float(value)
    if column in ("bytes_up", "bytes_down"):
        return format_bytes(value)
    if column == "epsilon":
        return format_float(value, 2)
    if column == "round_s":
        return f"{value:.2f}s" if _is_number(value) else DASH
    return format_value(value)


def subsection(mapping: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``mapping[key]`` if it is a mapping, else empty: tolerate partial summaries."""
    value = mapping.get(key)
    return value if isinstance(value, Mapping) else {}


# --------------------------------------------------------------------------- tables


def history_table(
    history: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    max_rows: int | None = None,
) -> Table:
    """A per-round table of a run's history.

    ``columns`` are record keys (any key works; known ones get units and precision)
    plus the derived ``clients`` (succeeded/sampled); the default is
    :data:`DEFAULT_HISTORY_COLUMNS`. With ``max_rows``, a long history shows its first
    and last rounds around one elision row, so the final rounds stay on screen.
    """
    cols = list(columns) if columns is not None else list(DEFAULT_HISTORY_COLUMNS)
    table = Table(title="History", box=box.SIMPLE_HEAD)
    for col in cols:
        table.add_column(_COLUMN_TITLES.get(col, col), justify="right", no_wrap=True)
    records = list(history)
    if max_rows is not None and max_rows >= 2 and len(records) > max_rows:
        head = (max_rows - 1) // 2
        tail = max_rows - 1 - head
        hidden = len(records) - head - tail
        rows: list[Mapping[str, Any] | None] = [*records[:head], None, *records[-tail:]]
        table.caption = f"{hidden} of {len(records)} rounds not shown; all are in history.csv"
    else:
        hidden = 0
        rows = list(records)
    for record in rows:
        if record is None:
            table.add_row(*(["⋮"] * len(cols)), style="dim")
        else:
            table.add_row(*(_history_cell(record, col) for col in cols))
    return table


def summary_table(summary: Mapping[str, Any]) -> Table:
    """The run's key numbers; anything missing from ``summary`` shows as ``—``."""
    final = subsection(summary, "final")
    metrics = subsection(summary, "metrics")
    target = metrics.get("target_accuracy")
    rounds_to_target = metrics.get("rounds_to_target")
    if _is_number(rounds_to_target):
        reached = str(int(rounds_to_target))
    elif _is_number(target):
        reached = "not reached"  # a target was set and missed: say so, not "—"
    else:
        reached = DASH
    gap = metrics.get("accuracy_gap")
    rows = [
        ("Rounds completed", format_int(summary.get("rounds_completed"))),
        ("Final accuracy", format_float(final.get("accuracy"))),
        ("Final loss", format_float(final.get("loss"))),
        ("Target accuracy", format_float(target)),
        ("Rounds to target", reached),
        ("Participation rate", format_percent(metrics.get("participation_rate"))),
        ("Bytes up (total)", format_bytes(metrics.get("bytes_up_total"))),
        ("Bytes down (total)", format_bytes(metrics.get("bytes_down_total"))),
        ("Centralized accuracy", format_float(metrics.get("centralized_accuracy"))),
        ("Gap to centralized", f"{gap:+.4f}" if _is_number(gap) else DASH),
        ("Wall time", format_duration(summary.get("wall_s"))),
    ]
    rows.extend(_client_rows(summary, metrics))
    privacy = summary.get("privacy")
    if isinstance(privacy, Mapping) and _is_number(privacy.get("epsilon")):
        rows.append(
            (
                "Privacy (central DP)",
                f"ε = {privacy['epsilon']:.4g} at δ = {privacy.get('delta', float('nan')):g}",
            )
        )
    history = summary.get("history")
    local = [
        r["local_epsilon_max"]
        for r in (history if isinstance(history, list) else [])
        if isinstance(r, Mapping) and _is_number(r.get("local_epsilon_max"))
    ]
    if local:
        rows.append(("Privacy (local DP)", f"worst client ε = {max(local):.4g}"))
    for key, name in (("stopped_reason", "Stopped"), ("failure", "Failed")):
        if isinstance(summary.get(key), str):
            rows.append((name, str(summary[key])))
    table = Table(title="Summary", show_header=False, box=box.SIMPLE)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


def _client_rows(summary: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Per-client accuracy (mean next to the worst 10 %) and who contributed least/most."""
    rows: list[tuple[str, str]] = []
    mean, worst = metrics.get("client_accuracy_mean"), metrics.get("client_accuracy_worst10")
    hidden = subsection(summary, "client_quality").get("reason")
    if _is_number(mean) and _is_number(worst):
        std = metrics.get("client_accuracy_std")
        spread = f" (std {std:.4f})" if _is_number(std) else ""
        rows.append(("Client accuracy: mean / worst 10 %", f"{mean:.4f} / {worst:.4f}{spread}"))
    elif isinstance(hidden, str):
        rows.append(("Client accuracy: mean / worst 10 %", "not recorded (secure aggregation)"))
    totals = metrics.get("contribution_total")
    if isinstance(totals, Mapping) and totals:
        ranked = sorted(
            ((str(c), float(v)) for c, v in totals.items() if _is_number(v)), key=lambda kv: -kv[1]
        )
        top = ", ".join(f"{c} ({v:+.3g})" for c, v in ranked[:3])
        bottom = ", ".join(f"{c} ({v:+.3g})" for c, v in ranked[-3:][::-1])
        rows.append(("Contribution: highest", top))
        rows.append(("Contribution: lowest", bottom))
    return rows


# ----------------------------------------------------------------------------- plot


def _points(history: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) for the rounds where ``key`` is a number (evaluation is sparse)."""
    xs: list[int] = []
    ys: list[float] = []
    for record in history:
        rnd, value = record.get("round"), record.get(key)
        if _is_number(rnd) and _is_number(value):
            xs.append(int(rnd))
            ys.append(float(value))
    return xs, ys


def _plot_series(
    ax: Any, history: Sequence[Mapping[str, Any]], series: Iterable[tuple[str, str, str]]
) -> None:
    """One line per ``(key, label, style)`` whose key was recorded in some round."""
    for key, label, style in series:
        xs, ys = _points(history, key)
        if xs:
            ax.plot(xs, ys, style, markersize=3, label=label)


def plot_accuracy(
    history: Sequence[Mapping[str, Any]],
    path: Path,
    baseline_accuracy: float | None = None,
    target_accuracy: float | None = None,
    title: str = "",
) -> Path:
    """Draw accuracy (top) and loss (bottom) against round and save a PNG at ``path``.

    Rounds without an evaluation are skipped, not drawn as zero. Dashed horizontal
    lines mark the centralized baseline (what the same model reaches with all data in
    one place) and the target accuracy, when given. The file is written atomically, so
    a reader never sees a half-written image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_loss = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])

    _plot_series(
        ax_acc,
        history,
        (
            ("accuracy", "accuracy (server eval)", "-o"),
            ("fed_accuracy", "accuracy (federated eval)", "--s"),
        ),
    )
    for value, name, color in (
        (baseline_accuracy, "centralized baseline", "tab:gray"),
        (target_accuracy, "target", "tab:red"),
    ):
        if value is not None:
            ax_acc.axhline(value, linestyle="--", color=color, label=f"{name} {value:.4f}")
    ax_acc.set_ylabel("accuracy")
    ax_acc.grid(True, alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(loc="lower right", fontsize="small")
    else:
        ax_acc.text(
            0.5, 0.5, "no evaluated rounds", ha="center", va="center", transform=ax_acc.transAxes
        )

    _plot_series(
        ax_loss,
        history,
        (
            ("loss", "loss (server eval)", "-o"),
            ("fed_loss", "loss (federated eval)", "--s"),
            ("train_loss", "train loss (clients)", ":"),
        ),
    )
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(True, alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(loc="upper right", fontsize="small")
    ax_loss.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write(Path(path), buf.getvalue())


# --------------------------------------------------------------------------- redraw


def summarize_history(
    history: Sequence[Mapping[str, Any]],
    target_accuracy: float | None = None,
    centralized_accuracy: float | None = None,
) -> dict[str, Any]:
    """A partial summary computed from the history alone.

    Used by :func:`redraw` when ``summary.json`` is missing (the run was killed or is
    still going), so ``fedloom report`` still shows the key numbers. It fills only what
    the history determines; wall time and participation rate stay unknown (``—``). The
    metrics come from :func:`fedloom.server.metrics.history_metrics`, the function the
    server's own summary is built on, so a partial report never disagrees with it.
    """
    last_eval = last_evaluation(history)
    return {
        "partial": True,
        "rounds_completed": int(history[-1]["round"]) if history else 0,
        "final": {
            "accuracy": last_eval.get("accuracy") if last_eval else None,
            "loss": last_eval.get("loss") if last_eval else None,
        },
        "metrics": history_metrics(history, target_accuracy, centralized_accuracy),
    }


def redraw(run_dir: Path, console: Console | None = None, *, max_rows: int = 40) -> dict[str, Any]:
    """``fedloom report DIR``: rewrite ``history.csv`` and ``accuracy.png``, print tables.

    The baseline and target lines come from ``summary.json`` when the run finished,
    else from the store (meta ``centralized_accuracy``, ``config["target_accuracy"]``).
    Returns the summary: ``summary.json``'s content, or a partial one computed from
    the history (marked ``"partial": True``) when the run did not write it.
    Raises :class:`RunStoreError` (one line) when ``run_dir`` is not a run.
    """
    run_dir = Path(run_dir)
    console = console if console is not None else Console()
    with RunStore.open(run_dir) as store:
        history = store.history()
        stored = store.read_summary()
        metrics = subsection(stored or {}, "metrics")
        baseline = number_or_none(metrics.get("centralized_accuracy"))
        if baseline is None:
            baseline = number_or_none(store.get_meta("centralized_accuracy"))
        target = number_or_none(metrics.get("target_accuracy"))
        if target is None:
            try:
                target = number_or_none(store.config().get("target_accuracy"))
            except RunStoreError:
                target = None
        summary = stored if stored is not None else summarize_history(history, target, baseline)
        store.write_history_csv(history)
    plot_accuracy(history, run_dir / PLOT_FILE, baseline, target, title=run_dir.name)

    if stored is None:
        console.print(
            f"[yellow]{run_dir} has no summary.json (run unfinished?); "
            "numbers below come from the recorded history.[/yellow]"
        )
    console.print(summary_table(summary))
    console.print(history_table(history, max_rows=max_rows))
    return summary
