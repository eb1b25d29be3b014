"""Data set builders: digits, FedProx Synthetic, MNIST IDX, CSV; determinism and errors."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from fedloom.config import ConfigError, DataConfig, SyntheticConfig
from fedloom.data import FederatedDataset, build_federated_dataset
from fedloom.data.digits import load_digits_arrays
from fedloom.data.mnist import load_idx_images, load_idx_labels
from fedloom.data.summary import label_skew
from fedloom.data.synthetic import (
    feature_variances,
    generate_synthetic,
    latent_parameters,
    sample_device_sizes,
)

from .conftest import SHARED_DATA

MNIST_DIR = SHARED_DATA / "mnist"
T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
T10K_MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def _one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def _assert_same(a: FederatedDataset, b: FederatedDataset) -> None:
    assert a.num_clients == b.num_clients
    for ca, cb in zip(a.clients, b.clients, strict=True):
        assert ca.name == cb.name
        np.testing.assert_array_equal(ca.train.x, cb.train.x)
        np.testing.assert_array_equal(ca.train.y, cb.train.y)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)


# --- digits ---------------------------------------------------------------------------------


def test_digits_default_split() -> None:
    ds = build_federated_dataset(DataConfig(), seed=0)
    assert (ds.name, ds.kind, ds.input_shape, ds.num_classes) == ("digits", "tabular", (64,), 10)
    assert ds.num_clients == 20
    n_train = int(ds.client_sizes().sum())
    assert n_train + len(ds.test) == 1797
    assert len(ds.test) == round(0.2 * 1797)
    assert ds.client_sizes().min() >= 2  # data.min_client_samples
    pooled = ds.pooled_train()
    assert pooled.x.dtype == np.float32 and pooled.y.dtype == np.int64
    assert pooled.x.min() >= 0.0 and pooled.x.max() <= 1.0 and pooled.x.max() > 0.9
    everything = np.concatenate([pooled.y, ds.test.y])
    for c in range(10):
        n_c = int((everything == c).sum())
        assert abs(int((ds.test.y == c).sum()) - 0.2 * n_c) <= 1, "test split must be stratified"
    # no example appears twice: rows of (pixels, label) are distinct across train and test
    rows = np.concatenate([np.c_[pooled.x, pooled.y], np.c_[ds.test.x, ds.test.y]])
    assert len(np.unique(rows, axis=0)) == len(np.unique(load_digits_arrays()[0], axis=0))


def test_digits_fast_path_matches_sklearn() -> None:
    from sklearn.datasets import load_digits

    pixels, labels = load_digits_arrays()
    bunch = load_digits()
    np.testing.assert_array_equal(pixels, bunch.data)
    np.testing.assert_array_equal(labels, bunch.target)


def test_build_is_deterministic_in_the_seed() -> None:
    cfg = DataConfig(partition="shards", num_clients=10)
    _assert_same(build_federated_dataset(cfg, 3), build_federated_dataset(cfg, 3))
    other = build_federated_dataset(cfg, 4)
    assert not np.array_equal(other.test.y, build_federated_dataset(cfg, 3).test.y)


def test_digits_natural_partition_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as exc:
        build_federated_dataset(DataConfig(partition="natural"), 0)
    assert "data.partition" in _one_line(exc)


def test_negative_seed_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as exc:
        build_federated_dataset(DataConfig(), -1)
    _one_line(exc)


# --- Synthetic(alpha, beta) ---------------------------------------------------------------------


def _synthetic(num_clients: int, seed: int = 0, **kw: float | bool) -> FederatedDataset:
    syn = SyntheticConfig.model_validate(kw)
    cfg = DataConfig(name="synthetic", num_clients=num_clients, partition="natural", synthetic=syn)
    return build_federated_dataset(cfg, seed)


@pytest.fixture(scope="module")
def synthetic_1000() -> FederatedDataset:
    return _synthetic(1000, seed=1)


def test_synthetic_device_sizes_follow_lognormal_plus_50(synthetic_1000: FederatedDataset) -> None:
    sizes = np.array([len(c.train) + len(c.test or []) for c in synthetic_1000.clients])
    assert sizes.min() >= 50
    # n = int(L) + 50 with log L ~ N(4, 2); int() truncates, so compare log(n - 49) >= log L
    logs = np.log(sizes - 49.0)
    assert abs(logs.mean() - 4.0) < 0.25 and abs(logs.std() - 2.0) < 0.25
    many = np.log(sample_device_sizes(50_000, np.random.default_rng(0)) - 49.0)
    assert abs(many.mean() - 4.0) < 0.08 and abs(many.std() - 2.0) < 0.08


def test_synthetic_split_is_90_10_per_device(synthetic_1000: FederatedDataset) -> None:
    for c in synthetic_1000.clients[:50]:
        assert c.test is not None
        assert len(c.train) == int(0.9 * (len(c.train) + len(c.test)))
    assert len(synthetic_1000.test) == sum(len(c.test or []) for c in synthetic_1000.clients)
    assert synthetic_1000.input_shape == (60,) and synthetic_1000.num_classes == 10


def _within_device_variance(ds: FederatedDataset) -> np.ndarray:
    centred = [c.train.x - c.train.x.mean(axis=0) for c in ds.clients]
    return np.asarray(np.concatenate(centred).astype(np.float64).var(axis=0))


@pytest.mark.parametrize("iid", [True, False])
def test_synthetic_feature_covariance_is_j_to_the_minus_1_2(iid: bool) -> None:
    ds = _synthetic(200, seed=2, iid=iid)
    expected = feature_variances(60)
    np.testing.assert_allclose(_within_device_variance(ds), expected, rtol=0.08)
    labels = np.concatenate([c.train.y for c in ds.clients])
    assert labels.min() >= 0 and labels.max() <= 9


def test_synthetic_iid_devices_share_one_labelling_function() -> None:
    from sklearn.linear_model import LogisticRegression

    ds = _synthetic(30, seed=0, iid=True)
    train = ds.pooled_train()
    model = LogisticRegression(C=100.0, max_iter=300).fit(train.x, train.y)
    assert model.score(ds.test.x, ds.test.y) > 0.9
    assert abs(float(train.x.mean())) < 0.05  # x ~ N(0, Sigma): v = 0


def test_synthetic_non_iid_label_mix_differs_across_devices() -> None:
    iid = label_skew(_synthetic(30, seed=0, iid=True))
    non_iid = label_skew(_synthetic(30, seed=0, alpha=1.0, beta=1.0))
    assert iid < 0.2 and non_iid > 0.5, (iid, non_iid)


def test_synthetic_latent_priors_use_alpha_and_beta_as_std() -> None:
    rng = np.random.default_rng(7)
    k = 20_000
    # mean of W_k's 600 entries ~ u_k + N(0, 1/600), u_k ~ N(0, alpha^2);
    # mean of v_k's 60 entries ~ B_k + N(0, 1/60), B_k ~ N(0, beta^2)
    w, b, v = latent_parameters(k, 60, alpha=2.0, beta=0.0, iid=False, rng=rng)
    assert w.shape == (k, 10, 60) and b.shape == (k, 10) and v.shape == (k, 60)
    assert abs(w.mean(axis=(1, 2)).var() / (4.0 + 1 / 600) - 1) < 0.05
    assert abs(v.mean(axis=1).var() * 60 - 1) < 0.05
    # b_k shares u_k with W_k: their means are correlated
    assert np.corrcoef(w.mean(axis=(1, 2)), b.mean(axis=1))[0, 1] > 0.9
    w, b, v = latent_parameters(k, 60, alpha=0.0, beta=2.0, iid=False, rng=rng)
    assert abs(w.mean(axis=(1, 2)).var() * 600 - 1) < 0.05
    assert abs(v.mean(axis=1).var() / (4.0 + 1 / 60) - 1) < 0.05
    assert abs(v.var(axis=1).mean() - 1.0) < 0.05  # v_k[j] ~ N(B_k, 1) around the device's B_k


def test_synthetic_labels_are_the_argmax_of_the_device_model() -> None:
    dev = generate_synthetic(20, 1.0, 1.0, False, 60, np.random.default_rng(3))
    for k in range(20):
        logits = dev.xs[k].astype(np.float64) @ dev.weights[k].T + dev.biases[k]
        np.testing.assert_array_equal(dev.ys[k], logits.argmax(axis=1))


def test_synthetic_iid_shares_parameters() -> None:
    dev = generate_synthetic(5, 1.0, 1.0, True, 60, np.random.default_rng(0))
    for k in range(1, 5):
        np.testing.assert_array_equal(dev.weights[k], dev.weights[0])
        np.testing.assert_array_equal(dev.biases[k], dev.biases[0])
    assert not dev.means.any()


def test_synthetic_notes_an_ignored_partition() -> None:
    cfg = DataConfig(name="synthetic", num_clients=5, partition="dirichlet")
    assert any("ignored" in n for n in build_federated_dataset(cfg, 0).notes)
    assert not _synthetic(5).notes


# --- MNIST IDX --------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    ndim = array.ndim
    header = bytes([0, 0, 0x08, ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    blob = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if compress else blob)


def _need_mnist() -> None:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST t10k files not found under {MNIST_DIR}")


def test_mnist_t10k_files_load_with_known_counts() -> None:
    _need_mnist()
    for name, md5 in T10K_MD5.items():
        assert hashlib.md5((MNIST_DIR / name).read_bytes()).hexdigest() == md5
    images = load_idx_images(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = load_idx_labels(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and images.max() == 255
    assert np.bincount(labels).tolist() == T10K_COUNTS


def test_mnist_raw_idx_reads_like_gzip(tmp_path: Path) -> None:
    _need_mnist()
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    np.testing.assert_array_equal(
        load_idx_labels(raw), load_idx_labels(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    )


def test_mnist_t10k_only_directory_is_split_and_noted() -> None:
    _need_mnist()
    cfg = DataConfig(name="mnist", path=str(MNIST_DIR), num_clients=10, partition="iid")
    ds = build_federated_dataset(cfg, 0)
    assert (ds.kind, ds.input_shape, ds.num_classes) == ("image", (1, 28, 28), 10)
    assert len(ds.test) == 2000 and int(ds.client_sizes().sum()) == 8000
    assert ds.test.x.dtype == np.float32 and ds.test.x.shape[1:] == (1, 28, 28)
    assert ds.test.x.min() >= 0.0 and ds.test.x.max() == 1.0
    assert any("t10k" in n for n in ds.notes)
    assert np.abs(np.bincount(ds.test.y) - np.array(T10K_COUNTS) * 0.2).max() <= 1


def test_mnist_train_files_are_used_when_present(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (120, 28, 28), dtype=np.uint8)
    labels = np.arange(120) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, compress=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, compress=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:30])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:30])
    cfg = DataConfig(name="mnist", path=str(tmp_path), num_clients=4, partition="shards")
    ds = build_federated_dataset(cfg, 0)
    assert int(ds.client_sizes().sum()) == 120 and len(ds.test) == 30 and not ds.notes
    np.testing.assert_allclose(ds.test.x[:, 0] * 255.0, images[:30], atol=1e-3)
    np.testing.assert_array_equal(ds.test.y, labels[:30])


def test_mnist_corrupt_files_are_config_errors(tmp_path: Path) -> None:
    labels = np.arange(50) % 10
    truncated = tmp_path / "truncated"
    _write_idx(truncated, labels)
    truncated.write_bytes(truncated.read_bytes()[:-5])
    wrong_magic = tmp_path / "images-as-labels"
    _write_idx(wrong_magic, np.zeros((2, 28, 28)))
    broken_gzip = tmp_path / "broken.gz"
    broken_gzip.write_bytes(gzip.compress(b"\x00" * 100)[:20])
    for path in (truncated, wrong_magic, broken_gzip, tmp_path / "missing"):
        with pytest.raises(ConfigError) as exc:
            load_idx_labels(path)
        assert str(path) in _one_line(exc)


def test_mnist_directory_errors(tmp_path: Path) -> None:
    for path in (None, str(tmp_path / "nowhere"), str(tmp_path)):
        with pytest.raises(ConfigError) as exc:
            build_federated_dataset(DataConfig(name="mnist", path=path), 0)
        assert "data.path" in _one_line(exc)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4))
    with pytest.raises(ConfigError) as exc:
        build_federated_dataset(DataConfig(name="mnist", path=str(tmp_path)), 0)
    assert "5 images" in _one_line(exc)


# --- CSV --------------------------------------------------------------------------------------

HOSPITALS = ["north", "east", "south"]


def _write_patients(path: Path, n: int = 90, blank_at: int | None = None) -> None:
    """Rows: hospital key, site code, age, bmi, sex, smoker, outcome (= smoker)."""
    rng = np.random.default_rng(0)
    lines = ["hospital,site,age,bmi,sex,smoker,outcome"]
    for i in range(n):
        h = i % 3
        smoker = "yes" if rng.random() < 0.4 else "no"
        age = "" if i == blank_at else f"{rng.normal(50, 12):.1f}"
        sex = "F" if rng.random() < 0.5 else "M"
        row = f"{HOSPITALS[h]},{h * 10},{age},{rng.normal(27, 4):.2f},{sex},{smoker},{smoker}"
        lines.append(row)
    path.write_text("\n".join(lines) + "\n")


def _csv_cfg(path: Path, **kw: object) -> DataConfig:
    base: dict[str, object] = {"name": "csv", "path": str(path), "label_column": "outcome"}
    return DataConfig.model_validate(base | kw)


def test_csv_encodes_and_splits_naturally_by_key(tmp_path: Path) -> None:
    path = tmp_path / "patients.csv"
    _write_patients(path)
    cfg = _csv_cfg(path, key_column="hospital", partition="natural")
    ds = build_federated_dataset(cfg, 0)
    # features: site, age, bmi (numeric) + sex {F, M} + smoker {no, yes}
    assert ds.input_shape == (7,) and ds.num_classes == 2 and ds.kind == "tabular"
    assert [c.name for c in ds.clients] == sorted(HOSPITALS)
    assert int(ds.client_sizes().sum()) + len(ds.test) == 90 and len(ds.test) == 18
    train = ds.pooled_train()
    np.testing.assert_allclose(train.x[:, :3].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.x[:, :3].std(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(train.x[:, 3] + train.x[:, 4], 1.0)  # one-hot sex
    np.testing.assert_array_equal(train.y, train.x[:, 6])  # label 1 = 'yes' = smoker 'yes'
    sites = [np.unique(c.train.x[:, 0]) for c in ds.clients]
    assert all(len(s) == 1 for s in sites), "each client must hold one hospital's rows"
    assert len({float(s[0]) for s in sites}) == 3
    assert any("0='no', 1='yes'" in n for n in ds.notes)


def test_csv_without_key_uses_the_configured_partition(tmp_path: Path) -> None:
    path = tmp_path / "patients.csv"
    _write_patients(path)
    ds = build_federated_dataset(_csv_cfg(path, num_clients=4, partition="iid"), 0)
    assert ds.num_clients == 4 and ds.input_shape == (10,)  # hospital: 3 one-hot columns
    assert int(ds.client_sizes().sum()) == 72


def test_csv_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "patients.csv"
    _write_patients(path)
    cases = [
        (_csv_cfg(path, label_column=None), "data.label_column"),
        (_csv_cfg(path, label_column="death"), "data.label_column 'death'"),
        (_csv_cfg(path, partition="natural"), "data.key_column"),
        (_csv_cfg(path, key_column="ward"), "data.key_column 'ward'"),
        (_csv_cfg(tmp_path / "none.csv"), "does not exist"),
    ]
    for cfg, fragment in cases:
        with pytest.raises(ConfigError) as exc:
            build_federated_dataset(cfg, 0)
        assert fragment in _one_line(exc)


def test_csv_blank_numeric_cell_names_column_and_line(tmp_path: Path) -> None:
    path = tmp_path / "patients.csv"
    _write_patients(path, blank_at=6)
    with pytest.raises(ConfigError) as exc:
        build_federated_dataset(_csv_cfg(path, partition="iid", num_clients=3), 0)
    message = _one_line(exc)
    assert "'age'" in message and "line 8" in message


def test_csv_ragged_row_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a,b,label\n1,2,x\n3,y\n4,5,y\n")
    with pytest.raises(ConfigError) as exc:
        build_federated_dataset(_csv_cfg(path, label_column="label"), 0)
    assert "line 3" in _one_line(exc)
