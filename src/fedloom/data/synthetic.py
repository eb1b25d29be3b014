"""Synthetic(α, β): the heterogeneous federated benchmark of Li et al. 2020 (FedProx).

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020, Section 5.1 "Synthetic data", following Shamir, Srebro, Zhang
2014. For device ``k`` (``d = 60`` features, ``C = 10`` classes)::

    y = argmax(softmax(W_k x + b_k)),   x ∈ R^d,  W_k ∈ R^{C×d},  b_k ∈ R^C
    W_k ~ N(u_k, 1),  b_k ~ N(u_k, 1),  u_k ~ N(0, α)        (model heterogeneity, α)
    x_k ~ N(v_k, Σ),  Σ diagonal with Σ_jj = j^-1.2          (feature covariance)
    v_k[j] ~ N(B_k, 1),  B_k ~ N(0, β)                       (data heterogeneity, β)

Device sizes follow the reference code: ``n_k = int(lognormal(mean=4, sigma=2)) + 50``,
a heavy-tailed power law; sizes are never capped. Each device keeps its first 90% as
training data and the last 10% as its local test set (as the reference code does).

Synthetic-IID (the reference ``generate_iid.py``): one ``W, b ~ N(0, 1)`` shared by
all devices and ``x ~ N(0, Σ)`` (``v_k = 0``), so every device samples the same
distribution and only the sizes differ.

Note on α and β: the paper writes ``N(0, α)`` without saying whether α is a variance;
the reference code (``np.random.normal(0, alpha, ...)``) passes α and β as the
*standard deviation*, and so do we. For the published settings α, β ∈ {0, 0.5, 1}
this matters only for 0.5. ``argmax(softmax(z)) = argmax(z)``, so the softmax is
skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedloom.config import DataConfig
from fedloom.data.base import ArrayDataset, ClientData, FederatedDataset, OnDemandClients

NUM_CLASSES = 10
TRAIN_FRACTION = 0.9
SIZE_LOG_MEAN = 4.0
SIZE_LOG_SIGMA = 2.0
MIN_DEVICE_SAMPLES = 50
#: With ``data.on_demand``, the server's test set is the local test sets of this many
#: devices (the first ones; devices are independent draws, so any are a fair sample).
ON_DEMAND_TEST_DEVICES = 1000


@dataclass(frozen=True)
class SyntheticDevices:
    """Per-device samples and the latent parameters that generated them.

    ``weights`` is (K, C, d), ``biases`` (K, C), ``means`` (K, d) — the ``W_k``, ``b_k``
    and ``v_k`` above — kept so tests can check the generator against its definition.
    """

    xs: list[np.ndarray]
    ys: list[np.ndarray]
    weights: np.ndarray
    biases: np.ndarray
    means: np.ndarray


def feature_variances(num_features: int) -> np.ndarray:
    """``Σ_jj = j^-1.2`` for ``j = 1..d``."""
    return np.arange(1, num_features + 1, dtype=np.float64) ** -1.2


def sample_device_sizes(num_devices: int, rng: np.random.Generator) -> np.ndarray:
    """``int(lognormal(4, 2)) + 50`` samples per device (reference code)."""
    draws = rng.lognormal(SIZE_LOG_MEAN, SIZE_LOG_SIGMA, num_devices)
    return draws.astype(np.int64) + MIN_DEVICE_SAMPLES


def latent_parameters(
    num_devices: int,
    num_features: int,
    alpha: float,
    beta: float,
    iid: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(W, b, v)`` for every device: shared and ``v = 0`` when IID, else per-device priors."""
    shape_w = (NUM_CLASSES, num_features)
    if iid:
        w = rng.normal(0.0, 1.0, shape_w)
        b = rng.normal(0.0, 1.0, NUM_CLASSES)
        return (
            np.broadcast_to(w, (num_devices, *shape_w)),
            np.broadcast_to(b, (num_devices, NUM_CLASSES)),
            np.zeros((num_devices, num_features)),
        )
    u = rng.normal(0.0, alpha, num_devices)  # alpha is a standard deviation (reference code)
    big_b = rng.normal(0.0, beta, num_devices)
    v = rng.normal(big_b[:, None], 1.0, (num_devices, num_features))
    w = rng.normal(u[:, None, None], 1.0, (num_devices, *shape_w))
    b = rng.normal(u[:, None], 1.0, (num_devices, NUM_CLASSES))
    return w, b, v


def generate_synthetic(
    num_devices: int,
    alpha: float,
    beta: float,
    iid: bool,
    num_features: int,
    rng: np.random.Generator,
) -> SyntheticDevices:
    """Draw every device's samples ``(x_k, y_k)`` as defined in the module docstring."""
    sizes = sample_device_sizes(num_devices, rng)
    w, b, v = latent_parameters(num_devices, num_features, alpha, beta, iid, rng)
    scale = np.sqrt(feature_variances(num_features)).astype(np.float32)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for k, n in enumerate(sizes):
        x = rng.standard_normal((int(n), num_features), dtype=np.float32)
        x *= scale
        x += v[k].astype(np.float32)
        xs.append(x)
        ys.append(np.argmax(x @ w[k].T + b[k], axis=1).astype(np.int64))
    return SyntheticDevices(xs, ys, np.asarray(w), np.asarray(b), v)


def _split(k: int, x: np.ndarray, y: np.ndarray) -> ClientData:
    n_train = int(TRAIN_FRACTION * len(y))
    return ClientData(
        client_id=k,
        name=f"device-{k}",
        train=ArrayDataset(x[:n_train], y[:n_train]),
        test=ArrayDataset(x[n_train:], y[n_train:]),
    )


@dataclass(frozen=True)
class DeviceMaker:
    """Device ``k`` of Synthetic(α, β) from its own random stream, ``[root, k]``.

    The same definition as :func:`generate_synthetic`, with each device's latent
    parameters and samples drawn from a stream of its own instead of one shared
    sequence, so any device can be made alone, in any order, in any process.
    """

    root: int
    sizes: np.ndarray
    alpha: float
    beta: float
    iid: bool
    num_features: int
    #: IID: the one ``(W, b)`` every device shares.
    shared: tuple[np.ndarray, np.ndarray] | None

    def rng(self, k: int) -> np.random.Generator:
        return np.random.default_rng([self.root, k])

    def latent(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(W_k, b_k, v_k)``, the first draws of the device's stream (shared if IID)."""
        d = self.num_features
        if self.shared is not None:
            return self.shared[0], self.shared[1], np.zeros(d)
        u = rng.normal(0.0, self.alpha)  # a standard deviation, as in generate_synthetic
        big_b = rng.normal(0.0, self.beta)
        v = rng.normal(big_b, 1.0, d)
        w = rng.normal(u, 1.0, (NUM_CLASSES, d))
        b = rng.normal(u, 1.0, NUM_CLASSES)
        return w, b, v

    def samples(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng(k)
        w, b, v = self.latent(rng)
        d = self.num_features
        x = rng.standard_normal((int(self.sizes[k]), d), dtype=np.float32)
        x *= np.sqrt(feature_variances(d)).astype(np.float32)
        x += v.astype(np.float32)
        return x, np.argmax(x @ w.T + b, axis=1).astype(np.int64)

    def __call__(self, k: int) -> ClientData:
        return _split(k, *self.samples(k))


def build_synthetic_on_demand(cfg: DataConfig, rng: np.random.Generator) -> FederatedDataset:
    """Synthetic(α, β) whose devices are made when sampled (``data.on_demand``).

    Only the device sizes (8 bytes each) and the server's test set (the local test sets
    of the first :data:`ON_DEMAND_TEST_DEVICES` devices) are made up front, so memory
    does not grow with ``data.num_clients``.
    """
    syn = cfg.synthetic
    sizes = sample_device_sizes(cfg.num_clients, rng)
    root = int(rng.integers(2**63))
    shared = None
    if syn.iid:
        shared = (
            rng.normal(0.0, 1.0, (NUM_CLASSES, syn.num_features)),
            rng.normal(0.0, 1.0, NUM_CLASSES),
        )
    make = DeviceMaker(root, sizes, syn.alpha, syn.beta, syn.iid, syn.num_features, shared)
    tests: list[ArrayDataset] = []
    for k in range(min(cfg.num_clients, ON_DEMAND_TEST_DEVICES)):
        test = make(k).test
        assert test is not None
        tests.append(test)
    train_sizes = (TRAIN_FRACTION * sizes).astype(np.int64)
    label = "synthetic_iid" if syn.iid else f"synthetic({syn.alpha:g},{syn.beta:g})"
    return FederatedDataset(
        name=label,
        kind="tabular",
        clients=OnDemandClients(train_sizes, make, all_have_tests=True),
        test=ArrayDataset.concat(tests),
        num_classes=NUM_CLASSES,
        input_shape=(syn.num_features,),
    )


def build_synthetic(cfg: DataConfig, rng: np.random.Generator) -> FederatedDataset:
    """One client per device (``data.num_clients`` devices), each split 90/10 train/test."""
    if cfg.on_demand:
        return build_synthetic_on_demand(cfg, rng)
    syn = cfg.synthetic
    devices = generate_synthetic(
        cfg.num_clients, syn.alpha, syn.beta, syn.iid, syn.num_features, rng
    )
    clients: list[ClientData] = []
    for k, (x, y) in enumerate(zip(devices.xs, devices.ys, strict=True)):
        clients.append(_split(k, x, y))
    test = ArrayDataset.concat([c.test for c in clients if c.test is not None])
    label = "synthetic_iid" if syn.iid else f"synthetic({syn.alpha:g},{syn.beta:g})"
    return FederatedDataset(
        name=label,
        kind="tabular",
        clients=clients,
        test=test,
        num_classes=NUM_CLASSES,
        input_shape=(syn.num_features,),
    )
