"""Shakespeare by speaking role, and the label-distribution summaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedloom.config import ConfigError, DataConfig
from fedloom.data import ArrayDataset, ClientData, FederatedDataset, build_federated_dataset
from fedloom.data.shakespeare import encode, parse_roles
from fedloom.data.summary import (
    format_label_histogram,
    label_histogram,
    label_skew,
    plot_label_histogram,
)

from .conftest import SHARED_DATA

TINY_SHAKESPEARE = SHARED_DATA / "shakespeare" / "tinyshakespeare.txt"

PLAY = """\
First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?
Nay, let them follow:
Then we will go.

MENENIUS:
Why, masters, my good friends, mine honest neighbours,

Senators, &C:
Farewell.
"""


def _decode(ids: np.ndarray, vocab: str) -> str:
    return "".join(vocab[int(i)] for i in ids)


def _shakespeare_cfg(path: Path, **kw: object) -> DataConfig:
    return DataConfig.model_validate({"name": "shakespeare", "path": str(path)} | kw)


@pytest.fixture(scope="module")
def tiny_shakespeare() -> FederatedDataset:
    if not TINY_SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {TINY_SHAKESPEARE}")
    return build_federated_dataset(_shakespeare_cfg(TINY_SHAKESPEARE), 0)


def test_parse_roles_follows_speaker_lines() -> None:
    roles = parse_roles(PLAY)
    assert list(roles) == ["First Citizen", "All", "MENENIUS", "Senators, &C"]
    assert roles["First Citizen"] == (
        "Before we proceed any further, hear me speak.\n"
        "You are all resolved rather to die than to famish?\n"
        "Nay, let them follow:\n"  # a line ending in ':' inside a speech is not a speaker
        "Then we will go.\n"
    )
    assert roles["All"] == "Speak, speak.\n"


def test_windows_continue_the_role_text_in_time_order(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text(PLAY)
    cfg = _shakespeare_cfg(path, seq_len=10, partition="natural", min_client_samples=4)
    ds = build_federated_dataset(cfg, 0)
    assert ds.vocab is not None and ds.kind == "sequence" and ds.input_shape == (10,)
    assert ds.vocab == "".join(sorted(set(ds.vocab)))
    assert not any("ignored" in n for n in ds.notes)
    text = parse_roles(PLAY)["First Citizen"]
    citizen = ds.clients[0]
    assert citizen.name == "First Citizen" and citizen.test is not None
    assert citizen.train.x.dtype == np.uint8 and citizen.train.x.shape[1] == 10
    # targets: every character after the first window, train (first 80%) then test
    targets = np.concatenate([citizen.train.y, citizen.test.y])
    assert _decode(targets, ds.vocab) == text[10:]
    assert len(citizen.train) == int(0.8 * (len(text) - 10))
    for i in (0, 7, len(citizen.train) - 1):
        assert _decode(citizen.train.x[i], ds.vocab) == text[i : i + 10]
    # "All" (14 characters: 4 windows, 3 for training) and "Senators, &C" (10: none) drop
    assert [c.name for c in ds.clients] == ["First Citizen", "MENENIUS"]
    assert any("dropped 2 roles" in n for n in ds.notes)
    assert len(ds.test) == sum(len(c.test or []) for c in ds.clients)


def test_roles_with_the_same_name_merge_and_max_clients_keeps_the_largest(tmp_path: Path) -> None:
    path = tmp_path / "plays.txt"
    path.write_text(PLAY + "\nMENENIUS:\n" + "Hear me, good friends, hear me out.\n" * 5)
    ds = build_federated_dataset(_shakespeare_cfg(path, seq_len=5, max_clients=1), 0)
    assert [c.name for c in ds.clients] == ["MENENIUS"]
    assert any("data.max_clients" in n for n in ds.notes)
    assert any("ignored" in n for n in ds.notes)  # default partition "dirichlet" is not used


def test_shakespeare_path_errors(tmp_path: Path) -> None:
    prose = tmp_path / "prose.txt"
    prose.write_text("No speakers here.\nJust prose.\n")
    for path in (tmp_path / "missing.txt", tmp_path, prose):
        with pytest.raises(ConfigError) as exc:
            build_federated_dataset(_shakespeare_cfg(path), 0)
        message = str(exc.value)
        assert "data.path" in message and "\n" not in message


def test_tiny_shakespeare_has_many_roles_and_correct_windows(
    tiny_shakespeare: FederatedDataset,
) -> None:
    ds = tiny_shakespeare
    assert ds.num_clients > 100 and ds.vocab is not None
    assert ds.num_classes == len(ds.vocab) and ds.input_shape == (80,)
    first = ds.clients[0]
    assert first.name == "First Citizen"
    assert _decode(first.train.x[0], ds.vocab).startswith(
        "Before we proceed any further, hear me speak.\nYou are all resolved"
    )
    rng = np.random.default_rng(0)
    for c in rng.choice(ds.num_clients, size=10, replace=False):
        train = ds.clients[int(c)].train
        i = int(rng.integers(0, len(train) - 1))
        # stride 1: the next window is this one shifted by one, ending in this target
        np.testing.assert_array_equal(train.x[i + 1][:-1], train.x[i][1:])
        assert train.x[i + 1][-1] == train.y[i]
    names = {c.name for c in ds.clients}
    assert {"GLOUCESTER", "ROMEO", "JULIET"} <= names
    sizes = ds.client_sizes()
    assert sizes.max() > 20 * np.median(sizes)  # heavily unbalanced, like LEAF's split


def test_encode_roundtrips() -> None:
    vocab = "\n !,abcz"
    ids = encode("a, zb!\n", vocab)
    assert ids.dtype == np.uint8 and _decode(ids, vocab) == "a, zb!\n"


# --- summaries --------------------------------------------------------------------------------


def _toy(labels_per_client: list[list[int]], num_classes: int = 3) -> FederatedDataset:
    clients = []
    for i, labels in enumerate(labels_per_client):
        y = np.asarray(labels, dtype=np.int64)
        clients.append(ClientData(i, f"c{i}", ArrayDataset(np.zeros((len(y), 2)), y)))
    test = ArrayDataset(np.zeros((1, 2)), np.zeros(1, dtype=np.int64))
    return FederatedDataset("toy", "tabular", clients, test, num_classes, (2,))


def test_label_histogram_and_skew_on_a_known_case() -> None:
    ds = _toy([[0, 0, 1, 1], [0, 1, 2, 2]])
    np.testing.assert_array_equal(label_histogram(ds), [[2, 2, 0], [1, 1, 2]])
    # global mix (3/8, 3/8, 2/8); TV distances 0.25 and 0.25
    assert label_skew(ds) == pytest.approx(0.25)
    assert label_skew(_toy([[0, 1, 2], [2, 1, 0]])) == 0.0
    assert label_skew(_toy([[0, 0], [1, 1]], num_classes=2)) == pytest.approx(0.5)


def test_format_label_histogram_lists_clients_and_skew() -> None:
    ds = build_federated_dataset(DataConfig(num_clients=40), 0)
    text = format_label_histogram(ds, max_rows=5)
    lines = text.splitlines()
    assert lines[0].split() == ["client", "n", *map(str, range(10))]
    first_counts = [str(int(k)) for k in label_histogram(ds)[0]]
    assert lines[1].split() == ["client-0", str(len(ds.clients[0].train)), *first_counts]
    assert "... 35 more clients" in text
    assert lines[-2].split()[1] == str(int(ds.client_sizes().sum()))
    assert f"{label_skew(ds):.3f}" in lines[-1]


def test_format_label_histogram_summarizes_many_classes() -> None:
    ds = _toy([[0, 5, 5, 29], [1, 2]], num_classes=30)
    lines = format_label_histogram(ds).splitlines()
    assert lines[0].split() == ["client", "n", "classes", "top", "class"]
    assert lines[1].split() == ["c0", "4", "3", "5", "(50%)"]


@pytest.mark.parametrize("num_classes", [10, 40])
def test_plot_label_histogram_writes_a_png(tmp_path: Path, num_classes: int) -> None:
    rng = np.random.default_rng(0)
    ds = _toy([list(rng.integers(0, num_classes, 50)) for _ in range(12)], num_classes)
    out = plot_label_histogram(ds, tmp_path / "plots" / "labels.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000
