"""A CSV file of records — what a hospital or a bank brings — with a named label column.

Columns are typed by their content: a column whose every cell parses as a number is
numeric (standardized with the mean and standard deviation of the *training* rows, so
no test statistics leak into the features); any other column is categorical and
one-hot encoded with the categories seen in the training rows (a category first seen
in test rows encodes as all zeros; a blank categorical cell is its own category).
A blank or non-finite numeric cell is an error naming the column and line, as is a
mostly-numeric column with a stray word ("NA"): silently turning it into a
categorical column would be worse.

Labels become ``0..C-1`` in sorted order of their distinct values (numerically when
all of them are numbers, else as strings); a note records the mapping. A stratified
``data.test_fraction`` of the rows is the server's test set. If ``data.key_column``
is set, that column is never a feature: with ``data.partition = "natural"`` it names
each row's client (one client per distinct value, the client named after it);
otherwise the rows are dealt by ``data.partition``.

The delimiter is whichever of ``,``, ``;`` and tab occurs most in the header line.

With ``data.columns`` (the schema) set, columns are matched *by name*: the file must have
exactly the schema's columns in the schema's order, or it is refused with one line naming
the missing, extra, renamed or reordered column, and each column is read as the schema
types it (a categorical column with listed values one-hot encodes in that order, so
every site's model has the same inputs). Without it the server of a deployment pins
the schema it read from its own file (:attr:`FederatedDataset.pinned`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.config import ConfigError, DataConfig
from fedloom.data.base import ArrayDataset, ClientData, FederatedDataset, data_path
from fedloom.data.partition import (
    clients_from_parts,
    partition_from_config,
    partition_natural,
    stratified_split,
)

DELIMITERS = (",", ";", "\t")


@dataclass(frozen=True)
class Table:
    """A CSV file as strings: header, cells by column, and each row's line number."""

    path: Path
    header: list[str]
    columns: dict[str, list[str]]
    lines: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.lines)


def _delimiter(first_line: str) -> str:
    counts = [first_line.count(d) for d in DELIMITERS]
    return DELIMITERS[int(np.argmax(counts))] if max(counts) > 0 else ","


def read_table(path: Path) -> Table:
    """Read a CSV with a header row; skip blank lines; every row must match the header."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            delimiter = _delimiter(handle.readline())
            handle.seek(0)
            reader = csv.reader(handle, delimiter=delimiter)
            header = [h.strip() for h in next(reader, [])]
            rows: list[list[str]] = []
            lines: list[int] = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise ConfigError(
                        f"line {reader.line_num} of '{path}' has {len(row)} fields but the "
                        f"header has {len(header)}; fix that row"
                    )
                rows.append([cell.strip() for cell in row])
                lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"cannot read CSV '{path}' ({err})") from None
    _check_header(path, header, len(rows))
    columns = {name: [row[j] for row in rows] for j, name in enumerate(header)}
    return Table(path, header, columns, np.asarray(lines, dtype=np.int64))


def _check_header(path: Path, header: list[str], num_rows: int) -> None:
    if not header or not any(header):
        raise ConfigError(f"CSV '{path}' is empty; it needs a header row and data rows")
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise ConfigError(f"CSV '{path}' repeats column name(s) {duplicates}; rename them")
    if num_rows == 0:
        raise ConfigError(f"CSV '{path}' has a header but no data rows")


def _require_column(table: Table, key: str, column: str | None) -> str:
    if column is None:
        raise ConfigError(f"{key} is not set; name the column of '{table.path}' to use")
    if column not in table.columns:
        shown = ", ".join(table.header[:20]) + (", ..." if len(table.header) > 20 else "")
        raise ConfigError(
            f"{key} '{column}' is not a column of '{table.path}'; columns are: {shown}"
        )
    return column


def _filled_cells(table: Table, column: str, role: str, remedy: str) -> list[str]:
    """The cells of ``column``; a blank one is an error naming its line and ``remedy``."""
    cells = table.columns[column]
    blank = next((i for i, c in enumerate(cells) if not c), None)
    if blank is not None:
        raise ConfigError(
            f"{role} column '{column}' is blank at line {table.lines[blank]} of "
            f"'{table.path}'; {remedy}"
        )
    return cells


def _parse_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _numeric_column(table: Table, name: str) -> np.ndarray | None:
    """The column as float64, or None if it is categorical; errors on missing values."""
    cells = table.columns[name]
    try:
        values = np.asarray(cells, dtype=str).astype(np.float64)
    except ValueError:
        values = None
    if values is None:
        parsed = [_parse_float(c) for c in cells]
        filled = [i for i, c in enumerate(cells) if c]
        if not filled:
            raise ConfigError(f"column '{name}' of '{table.path}' is empty; drop it or fill it")
        numbers = sum(parsed[i] is not None for i in filled)
        if numbers * 2 < len(filled):
            return None  # mostly words: categorical
        bad = next(i for i, p in enumerate(parsed) if p is None)
        what = "is blank" if not cells[bad] else f"holds '{cells[bad]}'"
        raise ConfigError(
            f"numeric column '{name}' {what} at line {table.lines[bad]} of '{table.path}'; "
            "fill in or drop rows with missing values"
        )
    bad_rows = np.flatnonzero(~np.isfinite(values))
    if len(bad_rows):
        i = int(bad_rows[0])
        raise ConfigError(
            f"numeric column '{name}' holds '{cells[i]}' at line {table.lines[i]} of "
            f"'{table.path}'; replace non-finite values"
        )
    return values


def _standardize(values: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
    mean = values[train_idx].mean()
    std = values[train_idx].std()
    return np.asarray((values - mean) / (std if std > 0 else 1.0))


def _one_hot(cells: list[str], train_idx: np.ndarray) -> np.ndarray:
    categories = sorted({cells[i] for i in train_idx})
    index = {c: j for j, c in enumerate(categories)}
    out = np.zeros((len(cells), len(categories)), dtype=np.float64)
    for row, cell in enumerate(cells):
        j = index.get(cell)
        if j is not None:
            out[row, j] = 1.0
    return out


def _pinned_one_hot(table: Table, name: str, categories: Sequence[str]) -> np.ndarray:
    cells = table.columns[name]
    index = {c: j for j, c in enumerate(categories)}
    bad = next((i for i, c in enumerate(cells) if c not in index), None)
    if bad is not None:
        shown = ", ".join(repr(c) for c in list(categories)[:10])
        raise ConfigError(
            f"column '{name}' holds '{cells[bad]}' at line {table.lines[bad]} of "
            f"'{table.path}', which is not one of the schema's values ({shown}); fix the "
            "file or the schema (data.columns)"
        )
    out = np.zeros((len(cells), len(categories)), dtype=np.float64)
    out[np.arange(len(cells)), [index[c] for c in cells]] = 1.0
    return out


def encode_features(
    table: Table,
    names: list[str],
    train_idx: np.ndarray,
    schema: Mapping[str, str | list[str]] | None = None,
) -> np.ndarray:
    """float32 feature matrix: standardized numeric columns and one-hot categoricals,
    typed by ``schema`` where given, else by content."""
    blocks: list[np.ndarray] = []
    for name in names:
        kind = None if schema is None else schema[name]
        if isinstance(kind, list):
            blocks.append(_pinned_one_hot(table, name, kind))
            continue
        values = None if kind == "categorical" else _numeric_column(table, name)
        if values is None and kind == "numeric":
            cells = table.columns[name]
            bad = next(i for i, c in enumerate(cells) if _parse_float(c) is None)
            raise ConfigError(
                f"column '{name}' is numeric in the schema (data.columns) but holds "
                f"'{cells[bad]}' at line {table.lines[bad]} of '{table.path}'; fix the file"
            )
        if values is None:
            blocks.append(_one_hot(table.columns[name], train_idx))
        else:
            blocks.append(_standardize(values, train_idx)[:, None])
    return np.concatenate(blocks, axis=1).astype(np.float32)


def check_schema(table: Table, schema: Mapping[str, Any]) -> None:
    """Refuse a file whose columns differ from ``schema``'s by name or order, in one line
    naming the column (a renamed one is a missing and an extra at the same place)."""
    want = list(schema)
    have = table.header
    missing = [c for c in want if c not in have]
    extra = [c for c in have if c not in schema]
    where = f"CSV '{table.path}'"
    if len(missing) == 1 and len(extra) == 1 and want.index(missing[0]) == have.index(extra[0]):
        raise ConfigError(
            f"{where} has column '{extra[0]}' where the experiment's schema (data.columns) "
            f"has '{missing[0]}' (column {want.index(missing[0]) + 1}); rename it"
        )
    if missing:
        raise ConfigError(
            f"{where} lacks column '{missing[0]}' of the experiment's schema (data.columns); add it"
        )
    if extra:
        raise ConfigError(
            f"{where} has column '{extra[0]}', which the experiment's schema (data.columns) "
            "does not list; drop it"
        )
    for i, (got, expected) in enumerate(zip(have, want, strict=True)):
        if got != expected:
            raise ConfigError(
                f"{where} has column '{got}' at position {i + 1}, where the experiment's "
                f"schema (data.columns) has '{expected}'; order the columns as the schema does"
            )


def derive_schema(
    table: Table, label: str, key: str | None, train_idx: np.ndarray
) -> dict[str, str | list[str]]:
    """The schema of ``table`` as this file shows it: numeric columns, and categorical
    ones with the values of the training rows (sorted, as :func:`_one_hot` encodes them)
    pinned; the label and key columns as "categorical" (the label's classes are
    ``data.classes``; the key names sites, which are not shared)."""
    schema: dict[str, str | list[str]] = {}
    for name in table.header:
        if name in (label, key):
            schema[name] = "categorical"
        elif _numeric_column(table, name) is not None:
            schema[name] = "numeric"
        else:
            cells = table.columns[name]
            schema[name] = sorted({cells[i] for i in train_idx})
    return schema


def _label_order(values: set[str]) -> list[str]:
    numbers = {v: _parse_float(v) for v in values}
    if all(n is not None and math.isfinite(n) for n in numbers.values()):
        return sorted(values, key=lambda v: (numbers[v], v))
    return sorted(values)


def encode_labels(
    table: Table, column: str, pinned: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Labels as int64 ``0..C-1`` and the class names in id order.

    ``pinned`` (``data.classes``) fixes the order; otherwise it is derived from the values
    present, which is only safe when one party sees every class.
    """
    cells = _filled_cells(table, column, "label", "fill it in or drop the row")
    if pinned is not None:
        unknown = sorted(set(cells) - set(pinned))
        if unknown:
            raise ConfigError(
                f"label column '{column}' of '{table.path}' has values {unknown[:5]} that "
                f"are not in data.classes {pinned}; add them or fix the file"
            )
        index = {c: i for i, c in enumerate(pinned)}
        return np.asarray([index[c] for c in cells], dtype=np.int64), list(pinned)
    classes = _label_order(set(cells))
    if len(classes) < 2:
        raise ConfigError(
            f"label column '{column}' of '{table.path}' has a single value; "
            "data.label_column must name a column with at least two classes"
        )
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[c] for c in cells], dtype=np.int64), classes


def _natural_clients(
    train: ArrayDataset, keys: np.ndarray, cfg: DataConfig, notes: list[str]
) -> list[ClientData]:
    """One client per key value; clients below ``min_client_samples`` rows are dropped."""
    parts, names = partition_natural(keys)
    kept = [(p, n) for p, n in zip(parts, names, strict=True) if len(p) >= cfg.min_client_samples]
    if len(kept) < len(parts):
        notes.append(
            f"csv: dropped {len(parts) - len(kept)} of {len(parts)} '{cfg.key_column}' values "
            f"with fewer than {cfg.min_client_samples} training rows (data.min_client_samples)"
        )
    if not kept:
        raise ConfigError(
            f"no '{cfg.key_column}' value has {cfg.min_client_samples} training rows; "
            "lower data.min_client_samples"
        )
    notes.append(
        f"csv: one client per distinct '{cfg.key_column}' value ({len(kept)} clients); "
        "data.num_clients is not used"
    )
    return clients_from_parts(train, [p for p, _ in kept], [n for _, n in kept])


def build_csv(cfg: DataConfig, rng: np.random.Generator) -> FederatedDataset:
    """Encode features and labels, hold out a stratified test set, split the rest into clients."""
    table = read_table(
        data_path(cfg, directory=False, hint="point it at a CSV file with a header row")
    )
    if cfg.columns is not None:
        check_schema(table, cfg.columns)
    label = _require_column(table, "data.label_column", cfg.label_column)
    key = (
        None
        if cfg.key_column is None
        else _require_column(table, "data.key_column", cfg.key_column)
    )
    if key == label:
        raise ConfigError("data.key_column and data.label_column name the same column; change one")
    if cfg.partition == "natural" and key is None:
        raise ConfigError(
            "data.partition 'natural' for csv needs data.key_column naming each row's client"
        )
    features = [h for h in table.header if h not in (label, key)]
    if not features:
        raise ConfigError(f"CSV '{table.path}' has no feature columns besides the label and key")
    y, classes = encode_labels(table, label, cfg.classes)
    train_idx, test_idx = stratified_split(y, cfg.test_fraction, rng)
    data = ArrayDataset(encode_features(table, features, train_idx, cfg.columns), y)
    train = data.subset(train_idx)
    shown = ", ".join(f"{i}={c!r}" for i, c in enumerate(classes[:20]))
    notes = [f"csv: labels {shown}" + (", ..." if len(classes) > 20 else "")]
    if key is not None and cfg.partition == "natural":
        keys = _filled_cells(table, key, "key", "every row needs a client key")
        clients = _natural_clients(train, np.asarray(keys, dtype=object)[train_idx], cfg, notes)
    else:
        if key is not None:
            notes.append(
                f"csv: data.key_column '{key}' is not a feature; clients come from data.partition"
            )
        clients = clients_from_parts(train, partition_from_config(cfg, train.y, rng))
    return FederatedDataset(
        name=f"csv:{table.path.stem}",
        kind="tabular",
        clients=clients,
        test=data.subset(test_idx),
        num_classes=len(classes),
        input_shape=(data.x.shape[1],),
        notes=notes,
        pinned={}
        if cfg.columns is not None
        else {"columns": derive_schema(table, label, key, train_idx)},
    )
