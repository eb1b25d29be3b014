"""Vertically partitioned data: the same records, different columns at different parties.

A tabular set is split by columns between feature parties (scikit-learn's breast-cancer
data: contiguous blocks of its 30 features; digits: vertical strips of the 8×8 image,
so two parties hold its left and right halves); the label party holds only the labels.
Every party holds its own, shuffled, partially overlapping subset of the record ids
(each record is present at a party with probability ``coverage``), which is why the
parties must align their rows by private set intersection before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedloom.seeding import derive_rng

#: Purpose tags of this package's seeded draws (kept apart from fedloom.seeding's).
VERTICAL_IDS = 130
VERTICAL_SPLIT = 131


@dataclass(frozen=True, kw_only=True)
class PartyTable:
    """One party's own table: record ids in its own order and the rows that go with them.

    A feature party has ``features`` (rows × its columns); the label party has ``labels``.
    """

    name: str
    ids: list[str]
    features: np.ndarray | None = None
    labels: np.ndarray | None = None
    columns: list[str] | None = None


@dataclass(frozen=True, kw_only=True)
class VerticalDataset:
    name: str
    label_party: PartyTable
    feature_parties: list[PartyTable]
    num_classes: int


def load_table(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features (float32), labels and column names of a bundled scikit-learn set."""
    from sklearn.datasets import load_breast_cancer, load_digits

    if name == "breast_cancer":
        bunch = load_breast_cancer()
        names = [str(c) for c in bunch.feature_names]
    elif name == "digits":
        bunch = load_digits()
        names = [f"pixel_r{i // 8}_c{i % 8}" for i in range(64)]
    else:
        raise ValueError(f"unknown vertical data set '{name}'; use breast_cancer or digits")
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64), names


def column_groups(name: str, num_columns: int, parties: int) -> list[np.ndarray]:
    """Which columns each feature party holds (disjoint, covering all columns)."""
    if name == "digits":  # vertical strips of the image: left/right halves for two parties
        strips = np.array_split(np.arange(8), parties)
        return [np.array([r * 8 + c for r in range(8) for c in s]) for s in strips]
    return [np.asarray(g) for g in np.array_split(np.arange(num_columns), parties)]


def build_vertical_dataset(
    name: str, *, parties: int, coverage: float, seed: int, records: int | None = None
) -> VerticalDataset:
    """Each party's own view: a seeded, shuffled, partially overlapping set of records."""
    x, y, names = load_table(name)
    if records is not None:
        x, y = x[:records], y[:records]
    groups = column_groups(name, x.shape[1], parties)
    if any(len(g) == 0 for g in groups):
        raise ValueError(
            f"vertical.feature_parties = {parties} leaves a party without columns; lower it"
        )
    ids = np.array([f"{name}-{i:05d}" for i in range(len(y))])

    def own_rows(party: int) -> np.ndarray:
        rng = derive_rng(seed, VERTICAL_IDS, party)
        kept = np.flatnonzero(rng.random(len(y)) < coverage)
        return rng.permutation(kept)

    rows = own_rows(0)
    label_party = PartyTable(name="label", ids=ids[rows].tolist(), labels=y[rows])
    features = []
    for k, cols in enumerate(groups):
        rows = own_rows(k + 1)
        features.append(
            PartyTable(
                name=f"features{k}",
                ids=ids[rows].tolist(),
                features=x[np.ix_(rows, cols)],
                columns=[names[c] for c in cols],
            )
        )
    return VerticalDataset(
        name=name,
        label_party=label_party,
        feature_parties=features,
        num_classes=int(y.max()) + 1,
    )


def train_test_rows(n: int, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The label party's seeded split of the aligned rows, shared with every party."""
    order = derive_rng(seed, VERTICAL_SPLIT).permutation(n)
    n_test = max(1, round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def join_by_plain_ids(data: VerticalDataset) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels and each party's columns over the common ids, joined in the clear.

    Not an alignment parties may run (it shows every id to whoever joins); it is the
    reference the PSI must reproduce, and a shortcut for experiments whose subject is
    the training, not the alignment (``benchmarks/vertical.py`` on digits).
    """
    common = set(data.label_party.ids)
    for f in data.feature_parties:
        common &= set(f.ids)
    order = [i for i in data.label_party.ids if i in common]
    assert data.label_party.labels is not None
    where = {i: r for r, i in enumerate(data.label_party.ids)}
    y = data.label_party.labels[[where[i] for i in order]]
    xs = []
    for f in data.feature_parties:
        assert f.features is not None
        at = {i: r for r, i in enumerate(f.ids)}
        xs.append(f.features[[at[i] for i in order]])
    return y, xs
