"""The embedded handwritten-digits set (UCI optical digits, 8x8, 1797 images) from scikit-learn.

It ships inside scikit-learn, so the default experiment needs no download. Pixel
values are 0..16; they are scaled to [0, 1] float32. A stratified ``test_fraction``
split is the server's test set and the rest is dealt to clients by ``data.partition``.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from fedloom.config import DataConfig
from fedloom.data.base import ArrayDataset, FederatedDataset
from fedloom.data.partition import clients_from_parts, partition_from_config, stratified_split

NUM_PIXELS = 64
NUM_CLASSES = 10


def _embedded_csv() -> Path | None:
    """Where scikit-learn keeps ``digits.csv.gz``, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Pixels (1797, 64) float64 in 0..16 and labels (1797,) int64, as ``load_digits`` gives.

    Importing ``sklearn.datasets`` costs about a second, and every process-pool worker
    rebuilds the data set, so the CSV that ``load_digits`` reads is parsed directly
    when it is where scikit-learn keeps it; otherwise ``load_digits`` is called.
    """
    path = _embedded_csv()
    if path is not None:
        table = np.loadtxt(path, delimiter=",")
        if table.shape == (1797, NUM_PIXELS + 1):
            return table[:, :NUM_PIXELS], table[:, NUM_PIXELS].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def build_digits(cfg: DataConfig, rng: np.random.Generator) -> FederatedDataset:
    """Scale to [0, 1], hold out a stratified test set, partition the rest."""
    pixels, labels = load_digits_arrays()
    data = ArrayDataset((pixels / 16.0).astype(np.float32), labels.copy())
    train_idx, test_idx = stratified_split(data.y, cfg.test_fraction, rng)
    train = data.subset(train_idx)
    parts = partition_from_config(cfg, train.y, rng)
    return FederatedDataset(
        name="digits",
        kind="tabular",
        clients=clients_from_parts(train, parts),
        test=data.subset(test_idx),
        num_classes=NUM_CLASSES,
        input_shape=(NUM_PIXELS,),
    )
