"""The Python API: federate your own PyTorch model on your own data in one call.

:func:`simulate` is what ``fedloom run`` is for the built-in data sets and models: it
builds a :class:`~fedloom.config.RunConfig`, turns the user's per-client data into a
:class:`~fedloom.data.base.FederatedDataset`, and runs the shared round loop
(:func:`fedloom.engine.simulation.run_federation`) in this process. Everything a config
can name (strategies, registered aggregators, callbacks, client algorithms) works the
same here, so an experiment moves between the CLI and Python unchanged.

Data forms accepted for each client and for the test set: a map-style
``torch.utils.data.Dataset`` of ``(x, y)`` items (stacked into arrays once), or an
``(x, y)`` pair of arrays or tensors. The dtype of ``y`` says what the task is:
integer labels mean classification (stored int64; the class count is the largest label
plus one), floating targets mean regression (stored float32; pass a ``loss``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedloom.callbacks import Callback
from fedloom.client.learner import (
    CLASSIFICATION_METRICS,
    Learner,
    LossFn,
    MetricFn,
    TrainStep,
)
from fedloom.client.transfer import refuse_for_own_model
from fedloom.config import RunConfig, config_from_dict, merge_trees
from fedloom.data import data_rng
from fedloom.data.base import ArrayDataset, ClientData, FederatedDataset
from fedloom.engine.simulation import make_executor, run_federation
from fedloom.seeding import MODEL_INIT, derive_seed

__all__ = ["connect", "serve", "simulate"]

#: Rounds and strategy when neither the keyword nor ``config`` sets them.
DEFAULT_ROUNDS = 10
DEFAULT_STRATEGY = "fedavg"


def simulate(
    *,
    model: Callable[[], nn.Module],
    clients: Sequence[Any] | FederatedDataset,
    test: Any = None,
    loss: LossFn | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
    train_step: TrainStep | None = None,
    strategy: str | None = None,
    rounds: int | None = None,
    out: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    aggregator: Any = None,
    config: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Simulate a federated run of ``model`` over ``clients``; returns the run summary.

    ``model`` is a factory of any ``nn.Module`` with float32 parameters; it is called
    with torch seeded from the run seed, so the same seed gives the same initial model
    (and the same run). ``clients`` is a list with one data set per client (see the
    module docstring for the forms), or a whole ``FederatedDataset`` (whose own test set
    is then used). ``test`` is the server's test set; without it centralized evaluation
    is off.

    ``loss(outputs, targets)`` returns the batch's mean loss (default cross-entropy for
    integer labels; floating targets need one, e.g. ``torch.nn.functional.mse_loss``).
    ``metrics`` maps names to ``fn(outputs, targets)`` summed over the batch (default
    accuracy for classification, none for regression). ``train_step(model, x, y)``
    replaces forward-and-loss in local training (the optimizer stays fedloom's SGD).

    Configuration, lowest precedence first: fedloom's defaults, ``config`` (a nested
    dict shaped like a TOML config, e.g. ``{"client": {"lr": 0.05}}``), then the keyword
    arguments: ``strategy`` (default ``"fedavg"``), ``rounds`` (default 10) and any other
    top-level config key passed as ``**overrides`` (``seed=3``, ``client={"epochs": 2}``:
    a section is merged into the config's). To compose stages without a strategy
    preset, put ``"strategy": None`` in ``config``.

    ``aggregator`` is a registered aggregator's name (sets ``server.aggregator``) or an
    aggregator object used as is. ``callbacks`` are :class:`~fedloom.callbacks.Callback`
    instances added to the run. ``out`` is the run directory (None: a temporary one,
    removed afterwards). Problems with the inputs raise a one-line ``ValueError``.
    """
    tree = _config_tree(config, overrides, strategy=strategy, rounds=rounds)
    if isinstance(aggregator, str):
        tree = merge_trees(tree, {"server": {"aggregator": aggregator}})
        aggregator = None

    given = _federated_data(clients, test)
    tree = merge_trees(tree, {"data": {"name": "custom", "num_clients": given.num_clients}})
    if not given.test_given:
        tree = merge_trees(tree, {"eval": {"centralized": False}})
    cfg = config_from_dict(tree)
    refuse_for_own_model(cfg)
    data = given.dataset
    if cfg.data.client_test_fraction > 0.0:
        # The strategies that evaluate on clients' own data (fedper, fedrep, ditto) hold
        # out a share of each client's data, exactly as for the built-in data sets.
        from fedloom.data import hold_out_client_tests

        hold_out_client_tests(data, cfg.data.client_test_fraction, data_rng(cfg.seed, 1))

    def build_model() -> nn.Module:
        return _seeded_model(model, cfg.seed)

    regression = given.regression
    if regression and loss is None:  # evaluation needs it even beside a train_step
        raise ValueError(
            "y holds floating targets (regression) but no loss was given; pass "
            "loss=torch.nn.functional.mse_loss (or give integer class labels)"
        )
    chosen_loss: LossFn = loss if loss is not None else torch.nn.functional.cross_entropy
    chosen_metrics = _metrics_for(metrics, regression=regression)
    first_model = build_model()  # refuses a model that cannot train before any work
    if regression:
        _match_target_shape(first_model, data)

    def learner_factory() -> Learner:
        return Learner(
            build_model(), loss=chosen_loss, metrics=chosen_metrics, train_step=train_step
        )

    def run(out_dir: Path) -> dict[str, Any]:
        return run_federation(
            cfg,
            out_dir,
            make_executor,
            data=data,
            learner_factory=learner_factory,
            callbacks=list(callbacks),
            aggregator=aggregator,
        )

    if out is not None:
        return run(Path(out))
    with tempfile.TemporaryDirectory(prefix="fedloom-") as tmp:
        return run(Path(tmp) / "run")


def _config_tree(
    config: Mapping[str, Any] | None,
    overrides: Mapping[str, Any],
    *,
    strategy: str | None,
    rounds: int | None,
) -> dict[str, Any]:
    """defaults < ``config`` < keywords; ``strategy``/``rounds`` fall back to the config's
    own value, else fedavg / 10 (an explicit ``"strategy": None`` in ``config`` stays)."""
    tree = merge_trees(dict(config or {}), dict(overrides))
    if strategy is not None:
        tree["strategy"] = strategy
    tree.setdefault("strategy", DEFAULT_STRATEGY)
    if rounds is not None:
        tree["rounds"] = rounds
    tree.setdefault("rounds", DEFAULT_ROUNDS)
    return tree


def _seeded_model(model: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``model()`` with torch seeded from the run seed (the caller's stream untouched), so
    every process that builds it (server, clients) starts from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, MODEL_INIT))
        module = model()
    if not isinstance(module, nn.Module):
        raise ValueError(f"model() must return a torch.nn.Module, got {type(module).__name__}")
    wrong = [
        f"{name} ({p.dtype})" for name, p in module.named_parameters() if p.dtype != torch.float32
    ]
    if wrong:
        raise ValueError(
            f"fedloom trains float32 parameters; {wrong[0]} is not: "
            "build the model with float32 parameters (module.float())"
        )
    return module


def _metrics_for(
    metrics: Mapping[str, MetricFn] | None, *, regression: bool
) -> dict[str, MetricFn]:
    """The user's metrics, else accuracy for classification and none for regression."""
    if metrics is not None:
        return dict(metrics)
    return {} if regression else dict(CLASSIFICATION_METRICS)


def serve(
    *,
    model: Callable[[], nn.Module],
    num_clients: int,
    address: str = "127.0.0.1:8443",
    out: str | Path,
    test: Any = None,
    loss: LossFn | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
    strategy: str | None = None,
    rounds: int | None = None,
    config: Mapping[str, Any] | None = None,
    security: Any = None,
    on_listening: Callable[[int], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Serve a federation of ``model`` to ``num_clients`` clients that run :func:`connect`.

    The deployment twin of :func:`simulate`: the same configuration rules, the same
    stages, the same run directory (``out``). The server holds no client data; ``test``
    (optional) is its own evaluation set, and ``loss``/``metrics`` are used for that
    evaluation only. ``security`` is a
    :class:`fedloom.engine.deploy.ServerSecurity` (default: plaintext, which the server
    allows on a loopback address only). ``on_listening(port)`` is called once the server
    listens (``address`` may name port 0). Returns the run summary.
    """
    from fedloom.engine.deploy import ServerSecurity, deploy_federation

    tree = _config_tree(config, overrides, strategy=strategy, rounds=rounds)
    test_part = _to_arrays(test, "test") if test is not None else None
    tree = merge_trees(tree, {"data": {"name": "custom", "num_clients": num_clients}})
    if test_part is None:
        tree = merge_trees(tree, {"eval": {"centralized": False}})
    cfg = config_from_dict(tree)
    refuse_for_own_model(cfg)
    if test_part is not None:
        x, y = test_part
        regression = bool(np.issubdtype(y.dtype, np.floating))
        test_set = ArrayDataset(x, y.astype(np.float32 if regression else np.int64))
    else:
        regression = loss is not None and metrics is not None and not metrics
        test_set = ArrayDataset(np.zeros((0, 1), np.float32), np.zeros(0, np.int64))
    # The server knows its clients only by id: each has no data here.
    empty = ArrayDataset(test_set.x[:0], test_set.y[:0])
    data = FederatedDataset(
        name="custom",
        kind="tabular",
        clients=[ClientData(i, f"client {i}", empty) for i in range(num_clients)],
        test=test_set,
        num_classes=1,
        input_shape=tuple(int(d) for d in test_set.x.shape[1:]),
    )
    chosen_loss: LossFn = loss if loss is not None else torch.nn.functional.cross_entropy
    chosen_metrics = _metrics_for(metrics, regression=regression)

    def learner_factory() -> Learner:
        return Learner(_seeded_model(model, cfg.seed), loss=chosen_loss, metrics=chosen_metrics)

    return deploy_federation(
        cfg,
        Path(out),
        address,
        security if security is not None else ServerSecurity(),
        data=data,
        learner_factory=learner_factory,
        on_listening=on_listening,
    )


def connect(
    *,
    server: str,
    model: Callable[[], nn.Module],
    train: Any,
    test: Any = None,
    loss: LossFn | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
    train_step: TrainStep | None = None,
    credentials: Any = None,
    client_id: int = -1,
    name: str = "client",
    state_dir: str | Path | None = None,
    max_wait_s: float = 300.0,
) -> int:
    """Join a :func:`serve` federation (or a ``fedloom server``) with ``model`` trained on
    this machine's ``train`` data; returns the number of tasks done when the run ends.

    The client half of every strategy runs here exactly as in simulation: the same
    :class:`~fedloom.client.runtime.ClientRuntime` around the same seeded model, so
    SCAFFOLD, FedProx, the personalized strategies and DP-SGD work unchanged. ``test``
    (optional) serves federated and personalized evaluation. ``credentials`` is a
    :class:`fedloom.engine.grpc.client.Credentials` (default: plaintext, for loopback
    trials). ``client_id`` asks for a particular id (-1: the server assigns one).
    """
    from fedloom.engine.grpc.client import Credentials, RuntimeApp, run_client
    from fedloom.strategies import build_client_runtime

    x, y = _to_arrays(train, "train")
    test_part = _to_arrays(test, "test") if test is not None else None
    regression = bool(np.issubdtype(y.dtype, np.floating))
    if regression and loss is None:
        raise ValueError(
            "y holds floating targets (regression) but no loss was given; pass "
            "loss=torch.nn.functional.mse_loss (or give integer class labels)"
        )
    kind = np.float32 if regression else np.int64
    own_train = ArrayDataset(x, y.astype(kind))
    own_test = ArrayDataset(test_part[0], test_part[1].astype(kind)) if test_part else None
    chosen_loss: LossFn = loss if loss is not None else torch.nn.functional.cross_entropy
    chosen_metrics = _metrics_for(metrics, regression=regression)

    def make_app(cfg: RunConfig, assigned: int) -> RuntimeApp:
        module = _seeded_model(model, cfg.seed)
        own = ClientData(assigned, name, own_train, own_test)
        if regression:
            local = FederatedDataset(
                "custom", "tabular", [own], own_test or own_train, 1, x.shape[1:]
            )
            _match_target_shape(module, local)
            own = local.clients[0]
        learner = Learner(module, loss=chosen_loss, metrics=chosen_metrics, train_step=train_step)
        runtime = build_client_runtime(
            cfg, learner, lambda _cid: own, num_clients=cfg.data.num_clients
        )
        return RuntimeApp(runtime, assigned)

    return run_client(
        server,
        make_app,
        credentials if credentials is not None else Credentials(insecure=True),
        partition=client_id,
        name=name,
        num_examples=len(own_train),
        max_wait_s=max_wait_s,
        state_dir=Path(state_dir) if state_dir is not None else None,
        site=f"{name}-{client_id}",
    )


class _GivenData:
    """The user's data as one FederatedDataset, and what it says about the task."""

    def __init__(self, dataset: FederatedDataset, *, test_given: bool, regression: bool) -> None:
        self.dataset = dataset
        self.test_given = test_given
        self.regression = regression

    @property
    def num_clients(self) -> int:
        return self.dataset.num_clients


def _federated_data(clients: Any, test: Any) -> _GivenData:
    if isinstance(clients, FederatedDataset):
        if test is not None:
            raise ValueError(
                "clients is a FederatedDataset, which has its own test set; do not pass test"
            )
        if clients.num_clients == 0:
            raise ValueError("clients is empty; pass at least one client's data")
        # A copy: holding out client test sets must not change the caller's object.
        clients = dataclasses.replace(clients, clients=list(clients.clients))
        ys = [c.train.y for c in clients.clients]
        regression = any(np.issubdtype(y.dtype, np.floating) for y in ys)
        return _GivenData(clients, test_given=len(clients.test) > 0, regression=regression)
    if isinstance(clients, (str, bytes)) or not isinstance(clients, Sequence):
        raise ValueError(
            f"clients must be a list of per-client data sets, got {type(clients).__name__}"
        )
    if len(clients) == 0:
        raise ValueError("clients is empty; pass at least one client's data")
    parts = [_to_arrays(c, f"clients[{i}]") for i, c in enumerate(clients)]
    test_part = _to_arrays(test, "test") if test is not None else None
    everything = parts + ([test_part] if test_part is not None else [])
    kinds = {np.issubdtype(y.dtype, np.floating) for _, y in everything}
    if len(kinds) > 1:
        raise ValueError(
            "some data sets have integer labels and others floating targets; use one kind"
        )
    regression = kinds.pop()
    shapes = {x.shape[1:] for x, _ in everything}
    if len(shapes) > 1:
        raise ValueError(f"examples differ in shape across data sets: {sorted(shapes)}")
    input_shape = tuple(int(d) for d in shapes.pop())
    if regression:
        fixed = [(x, y.astype(np.float32)) for x, y in everything]
        num_classes = 1
    else:
        fixed = [(x, y.astype(np.int64)) for x, y in everything]
        lowest = min((int(y.min()) for _, y in fixed if len(y)), default=0)
        if lowest < 0:
            raise ValueError(f"class labels must be 0, 1, 2, ...; found label {lowest}")
        num_classes = max((int(y.max()) + 1 for _, y in fixed if len(y)), default=1)
    train = [ArrayDataset(x, y) for x, y in fixed[: len(parts)]]
    if test_part is not None:
        test_set = ArrayDataset(*fixed[-1])
    else:
        example = fixed[0]
        test_set = ArrayDataset(example[0][:0], example[1][:0])
    dataset = FederatedDataset(
        name="custom",
        kind="tabular",
        clients=[ClientData(i, f"client {i}", t) for i, t in enumerate(train)],
        test=test_set,
        num_classes=num_classes,
        input_shape=input_shape,
    )
    return _GivenData(dataset, test_given=test_part is not None, regression=regression)


def _to_arrays(data: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` NumPy arrays of one data set; floating features become float32."""
    if isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) == 2:
        x_raw, y_raw = data.tensors
        x, y = _array(x_raw, where, "x"), _array(y_raw, where, "y")
    elif isinstance(data, torch.utils.data.Dataset):
        if not hasattr(data, "__len__"):
            raise ValueError(f"{where} is a torch Dataset without len(); pass a map-style one")
        items = [data[i] for i in range(len(data))]
        if not items:
            raise ValueError(f"{where} is an empty Dataset; every client needs examples")
        if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
            raise ValueError(f"{where}: a Dataset's items must be (x, y) pairs")
        x = np.stack([_array(it[0], where, "x") for it in items])
        y = np.stack([_array(it[1], where, "y") for it in items])
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = _array(data[0], where, "x"), _array(data[1], where, "y")
    else:
        raise ValueError(
            f"{where} must be a torch Dataset or an (x, y) pair, got {type(data).__name__}"
        )
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{where}: x and y need one row per example")
    if len(x) != len(y):
        raise ValueError(f"{where}: x has {len(x)} rows but y has {len(y)}")
    if y.dtype.kind not in "biuf":  # booleans and integers are labels, floats targets
        raise ValueError(f"{where}: y must hold numbers, got dtype {y.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def _array(value: Any, where: str, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {name} cannot be read as an array ({err})") from None


def _match_target_shape(module: nn.Module, data: FederatedDataset) -> None:
    """Give regression targets the per-example shape of the model's output.

    A model that outputs ``(n, 1)`` against targets of shape ``(n,)`` would make
    ``mse_loss`` broadcast to an ``(n, n)`` matrix and train on nonsense; one forward
    pass on two examples (no gradients, eval mode) finds the output shape first.
    """
    first = next((c.train for c in data.clients if len(c.train)), None)
    if first is None:
        return
    module.eval()
    with torch.no_grad():
        out = module(torch.from_numpy(first.x[:2]))
    if not isinstance(out, torch.Tensor):
        return
    per_example = tuple(out.shape[1:])
    if tuple(first.y.shape[1:]) == per_example:
        return
    if int(np.prod(per_example, dtype=np.int64)) != int(np.prod(first.y.shape[1:], dtype=np.int64)):
        raise ValueError(
            f"the model outputs {per_example} per example but targets are {first.y.shape[1:]}; "
            "make them match"
        )

    def reshaped(part: ArrayDataset) -> ArrayDataset:
        return ArrayDataset(part.x, part.y.reshape(len(part.y), *per_example))

    data.clients = [
        ClientData(
            c.client_id,
            c.name,
            reshaped(c.train),
            reshaped(c.test) if c.test is not None else None,
        )
        for c in data.clients
    ]
    data.test = reshaped(data.test)
