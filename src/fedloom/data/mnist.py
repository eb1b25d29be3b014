"""MNIST (and look-alikes such as Fashion-MNIST) from the standard IDX files on disk.

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian header
``0x00 0x00 <dtype> <ndim>`` followed by ``ndim`` uint32 sizes and the raw data.
Images are ``0x00000803`` (uint8, 3 dims), labels ``0x00000801`` (uint8, 1 dim).
Files may be gzip-compressed or raw; the content, not the name, decides.

``data.path`` is a directory. With ``train-*`` and ``t10k-*`` files the training set
is partitioned across clients and ``t10k`` is the server's test set; with only
``t10k-*`` (the copy kept beside this project) that set is split stratified into
train and test first, and a note says so.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fedloom.config import ConfigError, DataConfig
from fedloom.data.base import ArrayDataset, FederatedDataset, data_path
from fedloom.data.partition import clients_from_parts, partition_from_config, stratified_split

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed if it is gzip."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read IDX file '{path}' ({err.strerror or err})") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ConfigError(f"'{path}' is a corrupt gzip file ({err}); download it again") from None


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Parse one uint8 IDX file whose magic number must be ``magic``."""
    p = Path(path)
    data = _read_bytes(p)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"'{p}' is too short to be an IDX file ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ConfigError(
            f"'{p}' has IDX magic number 0x{found:08x}, expected 0x{magic:08x}; "
            "is it the right file (images vs labels)?"
        )
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ConfigError(
            f"'{p}' declares shape {shape} ({expected} bytes) but holds {len(data) - header} "
            "bytes of data; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_idx_images(path: str | Path) -> np.ndarray:
    """Images as uint8 ``(N, rows, cols)`` — ``(N, 28, 28)`` for MNIST."""
    return read_idx(path, IMAGES_MAGIC)


def load_idx_labels(path: str | Path) -> np.ndarray:
    """Labels as uint8 ``(N,)``."""
    return read_idx(path, LABELS_MAGIC)


def _find(directory: Path, prefix: str, kind: str) -> Path | None:
    """``train-images-idx3-ubyte`` and its variants (``.gz``, ``train-images.idx3-ubyte``)."""
    dims = "idx3" if kind == "images" else "idx1"
    for sep in ("-", "."):
        for suffix in (".gz", ""):
            candidate = directory / f"{prefix}-{kind}{sep}{dims}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _load_pair(directory: Path, prefix: str) -> ArrayDataset | None:
    """Images scaled to float32 [0, 1] in ``(N, 1, rows, cols)`` with int64 labels."""
    images_path = _find(directory, prefix, "images")
    labels_path = _find(directory, prefix, "labels")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        missing = (
            f"{prefix}-images-idx3-ubyte" if images_path is None else f"{prefix}-labels-idx1-ubyte"
        )
        raise ConfigError(f"data.path '{directory}' lacks {missing}(.gz); add it next to its pair")
    images = load_idx_images(images_path)
    labels = load_idx_labels(labels_path)
    if len(images) != len(labels):
        raise ConfigError(
            f"'{images_path.name}' has {len(images)} images but '{labels_path.name}' has "
            f"{len(labels)} labels; use files from the same release"
        )
    x = images.astype(np.float32)[:, None, :, :]
    x *= np.float32(1.0 / 255.0)
    return ArrayDataset(x, labels.astype(np.int64))


def build_mnist(cfg: DataConfig, rng: np.random.Generator) -> FederatedDataset:
    """Partition the training images across clients; ``t10k`` (or a split of it) is the test set."""
    directory = data_path(
        cfg, directory=True, hint="point it at a directory holding MNIST IDX files"
    )
    train = _load_pair(directory, "train")
    test = _load_pair(directory, "t10k")
    notes: list[str] = []
    if test is None:
        raise ConfigError(
            f"data.path '{cfg.path}' holds no t10k-images-idx3-ubyte(.gz) and "
            "t10k-labels-idx1-ubyte(.gz); point it at a directory holding MNIST IDX files"
        )
    if train is None:
        train_idx, test_idx = stratified_split(test.y, cfg.test_fraction, rng)
        train, test = test.subset(train_idx), test.subset(test_idx)
        notes.append(
            f"mnist: no train-* files in '{cfg.path}'; split the {len(train) + len(test)} t10k "
            f"images stratified into {len(train)} train / {len(test)} test "
            f"(data.test_fraction={cfg.test_fraction})"
        )
    if train.x.shape[1:] != test.x.shape[1:]:
        raise ConfigError(
            f"train images are {train.x.shape[2:]} but t10k images are {test.x.shape[2:]}; "
            "use files from the same data set"
        )
    parts = partition_from_config(cfg, train.y, rng)
    return FederatedDataset(
        name="mnist",
        kind="image",
        clients=clients_from_parts(train, parts),
        test=test,
        num_classes=int(max(train.y.max(), test.y.max())) + 1,
        input_shape=tuple(int(s) for s in train.x.shape[1:]),
        notes=notes,
    )
