"""A deployment's CSV schema, checked by name on every site (issue 9, hole 5): a
missing, extra, renamed or reordered column is refused in one line naming it, and
columns are typed by the schema, not by their position."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedloom.config import ConfigError, DataConfig, load_config
from fedloom.data.tabular import build_csv

from .deploy_helpers import fedloom, set_args

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["site", "age", "smoker", "dose", "outcome"]
ROWS = [
    ["a", "61", "yes", "1.5", "bad"],
    ["a", "45", "no", "0.5", "good"],
    ["b", "50", "no", "0.7", "good"],
    ["b", "70", "yes", "2.5", "bad"],
    ["a", "33", "no", "0.2", "good"],
    ["b", "58", "yes", "1.9", "bad"],
    ["a", "40", "no", "0.4", "good"],
    ["b", "66", "yes", "2.0", "bad"],
]
SCHEMA: dict[str, str | list[str]] = {
    "site": "categorical",
    "age": "numeric",
    "smoker": ["no", "yes"],
    "dose": "numeric",
    "outcome": "categorical",
}


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _permute(header: list[str], order: list[str]) -> tuple[list[str], list[list[str]]]:
    idx = [header.index(c) for c in order]
    return order, [[r[i] for i in idx] for r in ROWS]


def _cfg(path: Path, **extra: object) -> DataConfig:
    return DataConfig(
        name="csv",
        path=str(path),
        label_column="outcome",
        classes=["good", "bad"],
        key_column="site",
        num_clients=2,
        partition="iid",
        test_fraction=0.25,
        min_client_samples=1,
        **extra,  # type: ignore[arg-type]
    )


def _refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        build_csv(_cfg(path, columns=SCHEMA), np.random.default_rng(0))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_file_matching_the_schema_is_read(tmp_path: Path) -> None:
    data = build_csv(
        _cfg(_write(tmp_path / "ok.csv", HEADER, ROWS), columns=SCHEMA), np.random.default_rng(0)
    )
    assert data.input_shape == (4,)  # age, smoker (2 one-hot), dose
    assert data.pinned == {}


@pytest.mark.parametrize(
    ("header_rows", "named"),
    [
        (
            lambda: _permute(HEADER, ["site", "dose", "smoker", "age", "outcome"]),
            ["'dose' at position 2", "has 'age'"],
        ),
        (
            lambda: (["site", "age", "smokes", "dose", "outcome"], ROWS),
            ["'smokes' where", "has 'smoker'", "rename it"],
        ),
        (lambda: _permute(HEADER, ["site", "age", "smoker", "outcome"]), ["lacks column 'dose'"]),
        (
            lambda: ([*HEADER, "bmi"], [[*r, "22"] for r in ROWS]),
            ["has column 'bmi'", "does not list"],
        ),
    ],
    ids=["reordered", "renamed", "missing", "extra"],
)
def test_a_column_that_differs_by_name_or_order_is_refused_by_name(
    tmp_path: Path,
    header_rows: Callable[[], tuple[list[str], list[list[str]]]],
    named: list[str],
) -> None:
    header, rows = header_rows()
    message = _refusal(_write(tmp_path / "site.csv", header, rows))
    for part in named:
        assert part in message, message


def test_a_numeric_column_holding_words_is_refused(tmp_path: Path) -> None:
    rows = [[*r[:1], "x", *r[2:]] for r in ROWS]  # all words: content would say categorical
    message = _refusal(_write(tmp_path / "site.csv", HEADER, rows))
    assert "column 'age' is numeric in the schema" in message and "'x' at line 2" in message


def test_a_categorical_value_outside_the_schema_is_refused(tmp_path: Path) -> None:
    rows = [[*r[:2], "sometimes" if i == 3 else r[2], *r[3:]] for i, r in enumerate(ROWS)]
    message = _refusal(_write(tmp_path / "site.csv", HEADER, rows))
    assert "column 'smoker' holds 'sometimes' at line 5" in message


def test_pinned_categories_give_every_site_the_same_inputs(tmp_path: Path) -> None:
    """A site where everyone smokes still has both one-hot inputs, in the schema's order."""
    rows = [[*r[:2], "yes", *r[3:]] for r in ROWS]
    data = build_csv(
        _cfg(_write(tmp_path / "s.csv", HEADER, rows), columns=SCHEMA), np.random.default_rng(0)
    )
    assert data.input_shape == (4,)
    x = np.concatenate([c.train.x for c in data.clients] + [data.test.x])
    np.testing.assert_array_equal(x[:, 1:3], np.tile([0.0, 1.0], (len(x), 1)))


def test_without_a_schema_the_file_offers_its_own_for_the_sites(tmp_path: Path) -> None:
    data = build_csv(_cfg(_write(tmp_path / "ok.csv", HEADER, ROWS)), np.random.default_rng(0))
    assert data.pinned == {"columns": SCHEMA}


def test_the_schema_is_a_config_key(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.columns={age = 'numeric', smoker = ['no', 'yes']}"])
    assert cfg.data.columns == {"age": "numeric", "smoker": ["no", "yes"]}
    with pytest.raises(ConfigError, match=r"data\.columns"):
        load_config(None, ["data.columns={age = 'float'}"])


# ------------------------------------------------------------------ real processes


def test_sites_with_reordered_or_renamed_columns_are_refused_by_name(procs, tmp_path: Path) -> None:
    """The server pins the schema of its own file; a site whose file has two columns
    swapped, and one with a column renamed, each exit 2 with a line naming it.

    The server waits for three clients, so it never starts a round: with one, the
    first bad site's failure ends the one-round run, and on a busy machine the second
    site would then find no server and wait out its ``--max-wait`` instead of being
    checked."""
    rows = list(csv.reader((ROOT / "examples/data/hospitals.csv").open()))
    header, body = rows[0], [r for r in rows[1:] if r[0] == "north"]
    swapped = header[:]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    idx = [header.index(c) for c in swapped]
    reordered = _write(tmp_path / "reordered.csv", swapped, [[r[i] for i in idx] for r in body])
    renamed = _write(tmp_path / "renamed.csv", ["site", "radius", *header[2:]], body)
    sets = ["rounds=1", "server.min_fit_clients=3", "deploy.wait_for_clients_s=3600"]
    server = procs(
        fedloom(
            "server",
            "examples/csv_hospitals.toml",
            "--address",
            "127.0.0.1:0",
            "--out",
            str(tmp_path / "run"),
            *set_args(sets),
        )
    )
    port = int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    address = f"127.0.0.1:{port}"
    bad = [
        procs(fedloom("client", "--server", address, "--insecure", "--data", str(p)))
        for p in (reordered, renamed)
    ]
    assert bad[0].wait(240) == 2, bad[0].output
    assert bad[1].wait(240) == 2, bad[1].output
    assert (
        f"has column '{header[2]}' at position 2, where the experiment's schema "
        f"(data.columns) has '{header[1]}'"
    ) in bad[0].output
    assert "has column 'radius' where the experiment's schema (data.columns) has 'mean_radius'" in (
        bad[1].output
    )
