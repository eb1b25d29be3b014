"""MNIST images rendered the way scikit-learn's digits were made: a source domain for
transfer learning onto the ``digits`` clients.

The UCI optical digits (Alpaydin & Kaynak 1998) are 32x32 binary bitmaps, size-
normalised, divided into non-overlapping 4x4 blocks whose set pixels are counted:
8x8 images with grey levels 0..16. We apply the same recipe to MNIST's 28x28 grey
images: binarise at half intensity, crop to the digit's bounding box, pad to a square
(keeping the aspect ratio, so a "1" stays thin), resize to 32x32, binarise again and
count each 4x4 block. Scaled by 1/16 the result lives on the same [0, 1] grid as
:func:`fedloom.data.digits.build_digits`'s inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedloom.config import ConfigError
from fedloom.data.base import ArrayDataset
from fedloom.data.mnist import _load_pair

SIDE = 32
BLOCK = 4


def _square_crop(binary: np.ndarray) -> np.ndarray:
    """The digit's bounding box, padded with zeros to a centred square."""
    rows = np.flatnonzero(binary.any(axis=1))
    cols = np.flatnonzero(binary.any(axis=0))
    if rows.size == 0:
        return np.zeros((1, 1), dtype=np.float32)
    box = binary[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    h, w = box.shape
    side = max(h, w)
    out = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = box
    return out


def mnist_to_digits(images: np.ndarray) -> np.ndarray:
    """``(N, 28, 28)`` uint8 (or ``(N, 1, 28, 28)`` floats in [0, 1]) to ``(N, 64)`` float32
    grey levels 0..16, as the UCI digits were produced (see the module docstring)."""
    x = np.asarray(images)
    if x.ndim == 4:
        x = x[:, 0]
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    out = np.empty((len(x), (SIDE // BLOCK) ** 2), dtype=np.float32)
    for i, image in enumerate(x):
        square = torch.from_numpy(_square_crop(image.astype(np.float32) / scale >= 0.5))
        big = F.interpolate(square[None, None], size=(SIDE, SIDE), mode="bilinear")
        bits = (big[0, 0] >= 0.5).float()
        blocks = bits.reshape(SIDE // BLOCK, BLOCK, SIDE // BLOCK, BLOCK).sum(dim=(1, 3))
        out[i] = blocks.reshape(-1).numpy()
    return out


def load_mnist_as_digits(directory: str | Path) -> ArrayDataset:
    """Every MNIST image in ``directory`` (train and t10k files, whichever exist) as 8x8
    digits scaled to [0, 1], with their labels."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"MNIST directory '{d}' does not exist; point it at the IDX files")
    parts = [p for p in (_load_pair(d, "train"), _load_pair(d, "t10k")) if p is not None]
    if not parts:
        raise ConfigError(f"'{d}' holds no MNIST IDX files (t10k-images-idx3-ubyte(.gz), ...)")
    x = np.concatenate([mnist_to_digits(p.x) for p in parts]) / np.float32(16.0)
    y = np.concatenate([p.y for p in parts])
    return ArrayDataset(x.astype(np.float32), y.astype(np.int64))
