"""Small data sets built by hand, shared by the test modules.

Kept apart from ``conftest.py`` because tests call them with arguments (a plain
function reads better than a fixture factory), and importable as ``tests.helpers``
like :mod:`tests.deploy_helpers`.
"""

from __future__ import annotations

import numpy as np

from fedloom.data.base import ArrayDataset, ClientData, FederatedDataset


def toy_dataset(n: int = 40, clients: int = 2) -> FederatedDataset:
    """``clients`` clients of ``n`` five-feature examples, label = [x0 > 0].

    Separable and tiny, so a trainer fits it in milliseconds and a test that checks
    the training arithmetic (against torch.optim, across runs) is not slowed by data.
    Each client's test split is its first 8 training examples; the global test set is
    their concatenation. Always the same numbers (seed 0).
    """
    rng = np.random.default_rng(0)
    parts = []
    for c in range(clients):
        x = rng.normal(size=(n, 5)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        parts.append(ClientData(c, f"c{c}", ArrayDataset(x, y), ArrayDataset(x[:8], y[:8])))
    test = ArrayDataset.concat([p.test for p in parts if p.test is not None])
    return FederatedDataset("toy", "tabular", parts, test, 2, (5,))
