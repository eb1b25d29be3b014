"""Split one pool of examples across clients, and hold out a server test set.

Every partitioner returns one ``int64`` index array per client; together they assign
every example exactly once and each array is sorted, so a client's data keep the
order of the source. Problems a user can fix (more clients than examples, a Dirichlet
concentration too small for the requested minimum size) raise :class:`ConfigError`
with a one-line message naming the ``data.*`` key to change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedloom.config import ConfigError, DataConfig
from fedloom.data.base import ArrayDataset, ClientData

#: How many Dirichlet draws to try before giving up on the minimum client size.
DIRICHLET_MAX_TRIES = 100


def _check_num_clients(n_samples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"data.num_clients is {num_clients}; it must be at least 1")
    if num_clients > n_samples:
        raise ConfigError(
            f"cannot split {n_samples} training samples among {num_clients} clients; "
            f"lower data.num_clients to at most {n_samples}"
        )


def _as_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    return arr


def _group_by_owner(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Turn a per-sample client id into sorted per-client index arrays."""
    order = np.argsort(owner, kind="stable").astype(np.int64)
    sizes = np.bincount(owner, minlength=num_clients)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def partition_iid(n_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and deal the samples into ``num_clients`` parts whose sizes differ by at most 1.

    The IID baseline of McMahan et al. 2017 (Section 3): each client sees a uniform
    random sample of the whole population.
    """
    _check_num_clients(n_samples, num_clients)
    perm = rng.permutation(n_samples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def _dirichlet_owner(
    classes: list[np.ndarray],
    n_samples: int,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """One draw: for each class, client shares ``p ~ Dir(alpha * 1)`` cut its shuffled samples."""
    owner = np.empty(n_samples, dtype=np.int64)
    clients = np.arange(num_clients, dtype=np.int64)
    for idx in classes:
        perm = rng.permutation(idx)
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares) * len(perm)).astype(np.int64)
        cuts[-1] = len(perm)  # guard against cumsum rounding to just below 1
        counts = np.diff(np.concatenate(([0], np.minimum(cuts, len(perm)))))
        owner[perm] = np.repeat(clients, counts)
    return owner


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among clients in proportions ``~ Dir(alpha)``.

    This is the per-class Dirichlet allocation of Yurochkin et al. 2019 (Section 5,
    "PFNM", ``p_k ~ Dir_J(alpha)``), popularised for FedAvg by Hsu et al. 2019 ("Measuring
    the effects of non-identical data distribution", Section 3): small ``alpha`` gives
    each client few classes, ``alpha -> inf`` approaches an IID split. A draw that leaves
    some client with fewer than ``min_size`` samples is redrawn, at most
    :data:`DIRICHLET_MAX_TRIES` times.
    """
    y = _as_labels(labels)
    _check_num_clients(len(y), num_clients)
    if alpha <= 0:
        raise ConfigError(f"data.alpha is {alpha}; the Dirichlet concentration must be > 0")
    if min_size * num_clients > len(y):
        raise ConfigError(
            f"{num_clients} clients with at least {min_size} samples each need "
            f"{min_size * num_clients} samples but there are {len(y)}; "
            "lower data.num_clients or data.min_client_samples"
        )
    classes = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(DIRICHLET_MAX_TRIES):
        owner = _dirichlet_owner(classes, len(y), num_clients, alpha, rng)
        if np.bincount(owner, minlength=num_clients).min() >= min_size:
            return _group_by_owner(owner, num_clients)
    raise ConfigError(
        f"Dirichlet split with data.alpha={alpha} left a client with fewer than {min_size} "
        f"samples in {DIRICHLET_MAX_TRIES} tries; raise data.alpha or lower data.num_clients"
    )


def partition_shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. 2017 (Section 3, "sort by digit label").

    Sort the samples by label, cut them into ``num_clients * shards_per_client``
    contiguous shards of (nearly) equal size, and give each client ``shards_per_client``
    shards chosen at random; so most clients see at most ``shards_per_client`` labels
    (a shard straddling a class boundary adds one). Ties within a label are shuffled.
    """
    y = _as_labels(labels)
    if shards_per_client < 1:
        raise ConfigError(f"data.shards_per_client is {shards_per_client}; it must be at least 1")
    _check_num_clients(len(y), num_clients)
    num_shards = num_clients * shards_per_client
    if num_shards > len(y):
        raise ConfigError(
            f"{num_clients} clients x {shards_per_client} shards = {num_shards} shards exceed "
            f"the {len(y)} training samples; lower data.num_clients or data.shards_per_client"
        )
    shuffled = rng.permutation(len(y))
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")].astype(np.int64)
    shards = np.array_split(by_label, num_shards)
    order = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in order]


def partition_natural(keys: Sequence[object] | np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """One client per distinct key (a device, a speaking role, a hospital).

    This is the "natural" federated split of LEAF (Caldas et al. 2018, Section 2): the
    data already say who owns each example. Clients come in sorted key order and are
    named by ``str(key)``.
    """
    arr = np.asarray(keys)
    if arr.ndim != 1:
        raise ValueError(f"keys must be one-dimensional, got shape {arr.shape}")
    if len(arr) == 0:
        raise ConfigError("natural partition got no samples; check data.key_column and data.path")
    uniq, owner = np.unique(arr, return_inverse=True)
    parts = _group_by_owner(owner.reshape(-1).astype(np.int64), len(uniq))
    return parts, [str(k) for k in uniq]


def _test_counts(class_sizes: np.ndarray, n_test: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class test counts summing to ``n_test``, proportional to class sizes.

    Floors of the exact quotas, then the leftover goes to the classes with the largest
    remainders (random tie-break) — the largest-remainder rule, as scikit-learn's
    stratified splitter does.
    """
    quota = class_sizes * (n_test / class_sizes.sum())
    counts = np.floor(quota).astype(np.int64)
    leftover = int(n_test - counts.sum())
    if leftover > 0:
        jitter = rng.random(len(quota)) * 1e-9
        order = np.argsort(-(quota - counts + jitter), kind="stable")
        counts[order[:leftover]] += 1
    return np.asarray(np.minimum(counts, class_sizes), dtype=np.int64)


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test) keeping each class's share in both parts.

    The test part has ``round(n * test_fraction)`` samples. Both arrays are sorted.
    """
    y = _as_labels(labels)
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction is {test_fraction}; it must be in (0, 1)")
    n_test = round(len(y) * test_fraction)
    if n_test < 1 or n_test >= len(y):
        raise ConfigError(
            f"data.test_fraction={test_fraction} of {len(y)} samples leaves an empty train or "
            "test set; change data.test_fraction or use more data"
        )
    _, inverse = np.unique(y, return_inverse=True)
    counts = _test_counts(np.bincount(inverse.reshape(-1)), n_test, rng)
    test_parts = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(counts)]
    is_test = np.zeros(len(y), dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def partition_from_config(
    cfg: DataConfig, labels: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Apply ``cfg.partition`` (iid, dirichlet or shards) to a labelled pool of samples."""
    if cfg.partition == "iid":
        return partition_iid(len(labels), cfg.num_clients, rng)
    if cfg.partition == "dirichlet":
        return partition_dirichlet(
            labels, cfg.num_clients, cfg.alpha, rng, min_size=cfg.min_client_samples
        )
    if cfg.partition == "shards":
        return partition_shards(labels, cfg.num_clients, cfg.shards_per_client, rng)
    raise ConfigError(
        f"data.partition 'natural' needs a natural client key, which data.name '{cfg.name}' "
        "lacks; use iid, dirichlet or shards (or csv with data.key_column)"
    )


def clients_from_parts(
    data: ArrayDataset, parts: list[np.ndarray], names: list[str] | None = None
) -> list[ClientData]:
    """Materialize one :class:`ClientData` per index array (train data only)."""
    labels = names or [f"client-{i}" for i in range(len(parts))]
    return [
        ClientData(client_id=i, name=labels[i], train=data.subset(idx))
        for i, idx in enumerate(parts)
    ]
