"""Data sets split across clients: the embedded digits, FedProx Synthetic, MNIST, Shakespeare, CSV.

:func:`build_federated_dataset` turns the ``data`` section of a run config and the run
seed into a :class:`FederatedDataset`. It is deterministic in ``(cfg, seed)`` and cheap,
because every process-pool worker rebuilds the data set from the config instead of
receiving it pickled.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedloom.config import ConfigError, DataConfig
from fedloom.data.base import ArrayDataset, ClientData, DataKind, FederatedDataset
from fedloom.data.digits import build_digits
from fedloom.data.mnist import build_mnist
from fedloom.data.shakespeare import build_shakespeare
from fedloom.data.synthetic import build_synthetic
from fedloom.data.tabular import build_csv

__all__ = [
    "ArrayDataset",
    "ClientData",
    "DataKind",
    "FederatedDataset",
    "build_federated_dataset",
    "data_rng",
]

#: Mixed into the run seed so the data stream never coincides with another stream
#: derived from the same seed (client sampling, model initialization, ...).
DATA_STREAM_TAG = 0xDA7A

Builder = Callable[[DataConfig, np.random.Generator], FederatedDataset]


def _user_data(cfg: DataConfig, rng: np.random.Generator) -> FederatedDataset:
    raise ConfigError(
        "data.name = 'custom' names data given from Python (fedloom.simulate(clients=...)); "
        "a config file needs a built-in data set (digits, synthetic, mnist, shakespeare, csv)"
    )


_BUILDERS: dict[str, Builder] = {
    "custom": _user_data,
    "digits": build_digits,
    "synthetic": build_synthetic,
    "mnist": build_mnist,
    "shakespeare": build_shakespeare,
    "csv": build_csv,
}

#: Data sets whose split across clients is given by the data themselves.
_NATURALLY_SPLIT = {"synthetic": "device", "shakespeare": "speaking role"}


def data_rng(seed: int, *stream: int) -> np.random.Generator:
    """The generator random choices about the data come from; ``stream`` picks another one."""
    if seed < 0:
        raise ConfigError(f"seed is {seed}; use a seed >= 0")
    return np.random.default_rng(np.random.SeedSequence([seed, DATA_STREAM_TAG, *stream]))


def build_federated_dataset(cfg: DataConfig, seed: int) -> FederatedDataset:
    """Load ``cfg.name``, split it across clients as configured, and hold out the server test set.

    Synthetic and Shakespeare data are always split naturally (one client per device or
    speaking role); a different ``cfg.partition`` is ignored and a note says so.
    """
    dataset = _BUILDERS[cfg.name](cfg, data_rng(seed))
    unit = _NATURALLY_SPLIT.get(cfg.name)
    if unit is not None and cfg.partition != "natural":
        dataset.notes.append(
            f"{cfg.name} data are split one client per {unit}; "
            f"data.partition '{cfg.partition}' is ignored"
        )
    if cfg.client_test_fraction > 0.0:
        hold_out_client_tests(dataset, cfg.client_test_fraction, data_rng(seed, 1))
    return dataset


def hold_out_client_tests(
    dataset: FederatedDataset, fraction: float, rng: np.random.Generator
) -> None:
    """Give each client without a local test set a random ``fraction`` of its own data.

    Federated evaluation (each client scores the global model on data only it holds)
    needs such sets; clients that already have one (Synthetic, Shakespeare) keep it.
    """
    if dataset.on_demand:  # made from their seed with their own test sets
        return
    clients = list(dataset.clients)
    for i, client in enumerate(clients):
        if client.test is not None or len(client.train) < 2:
            continue
        n_test = max(1, round(fraction * len(client.train)))
        order = rng.permutation(len(client.train))
        clients[i] = ClientData(
            client.client_id,
            client.name,
            client.train.subset(np.sort(order[n_test:])),
            client.train.subset(np.sort(order[:n_test])),
        )
    dataset.clients = clients
