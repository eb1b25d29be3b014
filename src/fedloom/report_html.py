"""``fedloom report RUN_DIR --html``: the whole run in one self-contained HTML file.

The file is meant to be attached to an email or a ticket and opened anywhere, offline,
years later, so it references nothing outside itself: the plots are PNG ``data:`` URIs,
the style sheet is inline, and there is no script (collapsible tracebacks use HTML5's
``<details>``). Every value from the run (config strings, client error messages,
tracebacks) is HTML-escaped, since a client's error text is not trusted markup.

Like :mod:`fedloom.report` it reads only the run directory through
:class:`~fedloom.store.RunStore`, so it works on a run that is still going.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import tempfile
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from fedloom import __version__
from fedloom.report import (
    DEFAULT_HISTORY_COLUMNS,
    _history_cell,  # the terminal table's cell format, so both reports agree
    format_value,
    number_or_none,
    plot_accuracy,
    subsection,
    summarize_history,
    summary_table,
)
from fedloom.server.metrics import is_number as _is_number
from fedloom.store import RunStore, RunStoreError, atomic_write

__all__ = ["HTML_FILE", "render_html", "write_html"]

#: The file name ``fedloom report --html`` writes in the run directory without ``--out``.
HTML_FILE = "report.html"

#: Other images a run directory may hold that belong in the report (written by the run).
_RUN_IMAGES: tuple[tuple[str, str], ...] = (("clients.png", "Data per client"),)

#: A nested value (a list of per-client scores) is cut to this many characters in a cell.
_MAX_CELL = 80

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em;
       border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { padding: 0.2em 0.6em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.key, th.key { text-align: left; }
.scroll { overflow-x: auto; }
img { max-width: 100%; height: auto; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
.note { color: #8a5a00; }
footer { margin-top: 3em; color: #777; font-size: 0.8em; }
"""


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str) -> str:
    return f'<img src="{_png_data_uri(data)}" alt="{escape(alt)}">'


def _cell(value: Any) -> str:
    """A history value that :func:`_history_cell` has no format for (lists, flags)."""
    if isinstance(value, dict | list | tuple):
        text = json.dumps(value, default=str)
        return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"
    return format_value(value)


def _summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The terminal summary table's rows, so the HTML and the terminal never disagree."""
    table = summary_table(summary)
    names, values = (list(col.cells) for col in table.columns[:2])
    return [(str(n), str(v)) for n, v in zip(names, values, strict=True)]


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``data.num_clients = 5``: the dotted keys a user writes with ``--set``."""
    out: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.extend(_flatten(value, name + "."))
        else:
            out.append((name, value))
    return out


def _history_columns(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The terminal table's columns first, then every other key the records carry."""
    seen: dict[str, None] = {}
    for record in history:
        seen.update(dict.fromkeys(record))
    cols = [
        c
        for c in DEFAULT_HISTORY_COLUMNS
        if c in seen or (c == "clients" and "clients_sampled" in seen)
    ]
    hidden = {"clients_sampled", "clients_succeeded"}  # shown together as ok/sampled
    cols += [c for c in seen if c not in cols and c not in hidden]
    return cols


def _history_value(record: Mapping[str, Any], column: str) -> str:
    if column in DEFAULT_HISTORY_COLUMNS:
        return _history_cell(record, column)
    value = record.get(column)
    if isinstance(value, dict | list | tuple):
        return _cell(value)
    return _history_cell(record, column)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, key_cols: int = 1) -> str:
    def cls(i: int) -> str:
        return ' class="key"' if i < key_cols else ""

    head = "".join(f"<th{cls(i)}>{escape(h)}</th>" for i, h in enumerate(header))
    body = "\n".join(
        "<tr>" + "".join(f"<td{cls(i)}>{escape(c)}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return (
        f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


def render_html(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """The report of ``run_dir`` as an HTML5 document, and the summary it shows.

    The summary is ``summary.json`` or, for a run that has not written one, the partial
    summary :func:`fedloom.report.summarize_history` derives from the recorded rounds.
    Raises :class:`~fedloom.store.RunStoreError` (one line) when ``run_dir`` is not a run.
    """
    run_dir = Path(run_dir)
    with RunStore.open(run_dir) as store:
        history = store.history()
        stored = store.read_summary()
        failures = store.failures()
        try:
            config = store.config()
        except RunStoreError:
            config = {}
        baseline = number_or_none(store.get_meta("centralized_accuracy"))
    metrics = subsection(stored or {}, "metrics")
    if _is_number(metrics.get("centralized_accuracy")):
        baseline = float(metrics["centralized_accuracy"])
    target = number_or_none(metrics.get("target_accuracy"))
    if target is None:
        target = number_or_none(config.get("target_accuracy"))
    summary = stored if stored is not None else summarize_history(history, target, baseline)

    with tempfile.TemporaryDirectory(prefix="fedloom-report-") as tmp:
        plot = plot_accuracy(
            history, Path(tmp) / "accuracy.png", baseline, target, title=run_dir.name
        ).read_bytes()

    title = f"fedloom run {run_dir.name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        # An empty icon in the file itself: a browser asks for none (no request, no error).
        '<link rel="icon" href="data:,">',
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{escape(title)}</h1>",
    ]
    strategy = config.get("strategy") or "custom"
    data_section = config.get("data")
    data: Mapping[str, Any] = data_section if isinstance(data_section, Mapping) else {}
    parts.append(
        f"<p>{escape(str(strategy))} on {escape(str(data.get('name', '?')))}, "
        f"{escape(str(data.get('num_clients', '?')))} clients, "
        f"{len(history)} of {escape(str(config.get('rounds', '?')))} rounds recorded.</p>"
    )
    if stored is None:
        parts.append(
            '<p class="note">This run has no summary.json (unfinished or still running): '
            "the numbers below come from its recorded rounds.</p>"
        )

    parts.append('<h2 id="summary">Summary</h2>')
    parts.append(_table(["metric", "value"], _summary_rows(summary)))

    parts.append('<h2 id="plots">Plots</h2>')
    parts.append(_img(plot, "accuracy and loss per round"))
    for name, caption in _RUN_IMAGES:
        path = run_dir / name
        if path.is_file():
            parts.append(f"<h3>{escape(caption)}</h3>")
            parts.append(_img(path.read_bytes(), caption))

    parts.append(f'<h2 id="rounds">Rounds ({len(history)})</h2>')
    if history:
        cols = _history_columns(history)
        titles = ["ok/sampled" if c == "clients" else c for c in cols]
        rows = [[_history_value(r, c) for c in cols] for r in history]
        parts.append(_table(titles, rows, key_cols=0))
    else:
        parts.append("<p>No round recorded yet.</p>")

    parts.append(f'<h2 id="failures">Client failures ({len(failures)})</h2>')
    if failures:
        for f in failures:
            error = str(f["error"]).splitlines()[0] if str(f["error"]) else ""
            parts.append(
                "<details><summary>"
                f"round {int(f['round'])}, client {int(f['client_id'])}: {escape(error)}"
                f"</summary><pre>{escape(str(f['traceback']))}</pre></details>"
            )
    else:
        parts.append("<p>None.</p>")

    parts.append('<h2 id="config">Configuration</h2>')
    parts.append(_table(["key", "value"], [(k, _cell(v)) for k, v in _flatten(config)], key_cols=1))

    made = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(
        f"<footer>Written by fedloom {escape(__version__)} on {made} from "
        f"{escape(str(run_dir))}.</footer>"
    )
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts), summary


def write_html(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``)
    atomically, and return its path."""
    html, _ = render_html(run_dir)
    return atomic_write(Path(out) if out is not None else Path(run_dir) / HTML_FILE, html)
