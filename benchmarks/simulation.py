"""Simulation speed: fedloom's engines against a bare PyTorch loop (the floor) and Flower.

Run: ``python benchmarks/simulation.py`` (``make bench`` installs Flower first).

Workload: Synthetic(1, 1) of Li et al. 2020 (FedProx) with 1000 devices, one client per
device; each round samples 100 clients, each runs E = 1 epoch of plain SGD (B = 10,
lr = 0.01, no momentum, no weight decay) on multinomial logistic regression (60 -> 10);
the server takes the example-weighted FedAvg average. Nothing is evaluated in the
timed rounds.

Contenders, all in one invocation on the same machine and the same data:

* **bare loop (the floor)**: what a competent user writes without a framework. One
  ``nn.Linear``; per client ``load_state_dict``, a fresh ``torch.optim.SGD``, a
  ``torch.randperm`` per epoch and index slicing over tensors converted once up front,
  ``zero_grad / cross_entropy / backward / step``; then the weighted average of the
  clients' weights. Single process, with torch's default thread count and with
  ``torch.set_num_threads(1)``; the faster of the two is the floor.
* **fedloom in-process**: :class:`~fedloom.server.loop.FederatedServer` running the
  FedAvg strategy of :func:`~fedloom.strategies.build_strategy` with the
  :class:`~fedloom.engine.inprocess.InProcessExecutor` over the client runtime of
  :func:`~fedloom.strategies.build_client_runtime` and an in-memory
  :class:`~fedloom.client_store.ClientStateStore` (no run store, no evaluation), with
  torch's default thread count and with one thread.
* **fedloom pool**: the same server with the
  :class:`~fedloom.engine.pool.ProcessPoolExecutor`, one worker per core, each building
  its runtime with :func:`~fedloom.strategies.simulation_runtime`.
* **fedloom vectorized**: the same server with the
  :class:`~fedloom.engine.vectorized.VectorizedExecutor` (every sampled client's SGD at
  once, batched over stacked parameters), one thread, on the CPU.
* **fedloom on Ray** (when ``ray`` is importable): the same server with the
  :class:`~fedloom.engine.ray.RayExecutor` (``engine.name = "ray"``), which starts a
  local Ray instance with one CPU per core and one actor per core, each building its
  runtime with :func:`~fedloom.strategies.simulation_runtime` (as the pool's workers do),
  and shuts it down on close. It runs on its own between Flower's two runs (two Ray
  instances cannot share the process, and the Ray-vs-Ray ratios should see the same
  machine), so its rows are compared with Flower's in particular.
* **fedloom on Ray, vectorized** (likewise): the same, with ``engine.vectorize = true``:
  each actor trains the clients of the chunk it receives at once (the vectorized
  engine's batched SGD), one chunk of about a round's share per actor. It runs right
  after fedloom on Ray, on its own fresh local Ray instance.
* **Flower** (when ``flwr`` is importable): ``flwr.simulation.run_simulation`` (Ray)
  with FedAvg sampling 10% of 1000 virtual clients and no evaluation, written two ways:
  the Message API (``@app.train()`` + ``flwr.serverapp.strategy.FedAvg``, what current
  Flower templates use) and the legacy API (``NumPyClient`` +
  ``flwr.server.strategy.FedAvg`` in a ``ServerApp``). Their client code is the bare
  loop's. Ray gets one CPU per core and each client actor one CPU, so all cores train.

Why it is fair: every contender does *the same client work*. Each round's clients come
from fedloom's sampler with the same seed (Flower's strategy samples its virtual clients
as usual, then tells each which device's data to train on), and every client shuffles
with fedloom's per-(seed, round, client) generator, so all contenders compute the same
global models up to float rounding; the script checks that. Each builds the data set
itself during its start-up (Flower's actors, like fedloom's pool workers, build it once
per process and keep it). Imports are outside every timing. The single-process
contenders and the pool run interleaved, round 1 of each, then round 2 of each, ..., so
that a shared VM's drifting speed affects them alike; then Flower's Message API,
fedloom on Ray, fedloom on Ray vectorized and Flower's legacy API run one after another.

Results are only printed when they are results: if any finished contender's global model
after round 1 or after the last round differs from the floor's by more than
``ROUND1_TOLERANCE`` / ``FINAL_TOLERANCE`` (it did other work, or did it wrongly), the
script prints the disagreement, no table and no ratios, writes ``"valid": false`` and
no aims to ``--json``, and exits with status 1.

Measures: start-up (until the first round can start; for Flower, whose server loop
starts while Ray and its actors are still coming up, until the first client starts
training), "steady" seconds per round = median over rounds 2..N (identical work for
every contender), and total = start-up + every round + teardown. A default-thread
contender whose own time passes ``--budget-s`` is stopped: on an oversubscribed VM
torch's intra-op threads can make a step hundreds of times slower.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedloom.client.learner import Learner
from fedloom.client.models import build_model
from fedloom.client.runtime import ClientRuntime
from fedloom.client_store import ClientState, ClientStateStore
from fedloom.config import RunConfig, config_from_dict, config_from_json
from fedloom.data import build_federated_dataset
from fedloom.data.base import FederatedDataset
from fedloom.engine.inprocess import InProcessExecutor
from fedloom.engine.pool import ProcessPoolExecutor
from fedloom.engine.vectorized import VectorizedExecutor
from fedloom.messages import GLOBAL, Broadcast, ClientFailure, FitResult, FitTask
from fedloom.params import module_to_vector
from fedloom.seeding import SAMPLING, SHUFFLE, derive_rng, torch_generator
from fedloom.server.callbacks import RoundRecorder
from fedloom.server.loop import ClientExecutor, FederatedServer
from fedloom.server.sampling import select_clients
from fedloom.strategies import (
    build_client_runtime,
    build_learner,
    build_strategy,
    simulation_runtime,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Largest allowed |w_contender - w_floor| after round 1 (same clients, same shuffles).
ROUND1_TOLERANCE = 1e-5
#: Largest allowed |w_contender - w_floor| after the last round: float32 rounding in a
#: different order (batched matmuls, Flower's aggregation) over all rounds, not more.
FINAL_TOLERANCE = 1e-4

Tensors = list[tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- workload


def build_config(args: argparse.Namespace) -> RunConfig:
    """The benchmark's run config: Synthetic(1,1), logreg, E=1, B=10, lr=0.01, FedAvg."""
    cfg = config_from_dict(
        {
            "name": "bench-synthetic",
            "seed": args.seed,
            "rounds": args.rounds,
            "strategy": "fedavg",
            "data": {
                "name": "synthetic",
                "num_clients": args.clients,
                "partition": "natural",
                "synthetic": {"alpha": 1.0, "beta": 1.0},
            },
            "model": {"name": "logreg"},
            "client": {
                "epochs": 1,
                "batch_size": 10,
                "lr": 0.01,
                "momentum": 0.0,
                "weight_decay": 0.0,
            },
            "server": {"fraction_fit": args.per_round / args.clients, "min_fit_clients": 1},
            # The floor and Flower weight each client by its true example count; the
            # guard rails' cap on claimed counts (a defense against lying clients, of
            # which there are none here) would weight Synthetic's largest devices less.
            "guards": {"examples_median_multiple": 0},
            "eval": {"centralized": False, "federated": False},
            "engine": {"name": "inprocess", "workers": args.workers},
        }
    )
    k = len(sampled_clients(cfg, 1))
    if k != args.per_round:
        raise SystemExit(f"--per-round {args.per_round} of {args.clients} gives {k} clients")
    return cfg


def sampled_clients(cfg: RunConfig, rnd: int) -> np.ndarray:
    """The clients fedloom's strategy samples in round ``rnd`` (sorted ids), every client
    being available (:meth:`fedloom.server.strategy.Strategy.sample`)."""
    return select_clients(cfg.server, cfg.data.num_clients, derive_rng(cfg.seed, SAMPLING, rnd))


def initial_vector(cfg: RunConfig, data: FederatedDataset) -> np.ndarray:
    """fedloom's deterministic initial model, as its flat vector (weight, then bias)."""
    return module_to_vector(build_model(cfg.model, data, cfg.seed))


def vector_to_state(vector: np.ndarray, in_features: int, classes: int) -> dict[str, torch.Tensor]:
    k = in_features * classes
    return {
        "weight": torch.from_numpy(vector[:k].reshape(classes, in_features).copy()),
        "bias": torch.from_numpy(vector[k:].copy()),
    }


def state_to_vector(state: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([state["weight"].reshape(-1).numpy(), state["bias"].numpy()])


def bare_model(
    data: FederatedDataset, init: np.ndarray
) -> tuple[nn.Linear, dict[str, torch.Tensor]]:
    """The bare loop's model (one ``nn.Linear``) and fedloom's initial model as its state."""
    in_features = int(np.prod(data.input_shape))
    model = nn.Linear(in_features, data.num_classes)
    return model, vector_to_state(init, in_features, data.num_classes)


def sgd_steps(num_examples: int, cfg: RunConfig) -> int:
    """Local SGD steps of a client with ``num_examples`` examples (last batch may be short)."""
    return -(-num_examples // cfg.client.batch_size) * cfg.client.epochs


def client_runtime(
    cfg: RunConfig, data: FederatedDataset, learner: Learner | None = None
) -> ClientRuntime:
    """fedloom's client side for ``cfg`` over ``data`` (what the in-process engine runs)."""
    learner = build_learner(cfg, data) if learner is None else learner
    clients = data.clients
    return build_client_runtime(
        cfg, learner, lambda cid: clients[cid], num_clients=data.num_clients
    )


def client_tensors(data: FederatedDataset) -> Tensors:
    """Every client's training set as tensors, converted once."""
    return [(torch.from_numpy(c.train.x), torch.from_numpy(c.train.y)) for c in data.clients]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (``None``: leave torch's default), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------- the bare loop


def train_client(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    epochs: int,
    batch_size: int,
    lr: float,
) -> None:
    """Plain local SGD, written as a user would: the bare loop's and Flower's client code."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = len(y)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()


def bare_round(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    tensors: Tensors,
    clients: np.ndarray,
    rnd: int,
    cfg: RunConfig,
    deadline: float = float("inf"),
) -> dict[str, torch.Tensor]:
    """One FedAvg round without a framework: train each client, then weighted-average."""
    cc = cfg.client
    acc = {k: torch.zeros_like(v) for k, v in global_state.items()}
    total = 0
    for cid in clients.tolist():
        if time.perf_counter() > deadline:
            raise BudgetExceededError
        x, y = tensors[cid]
        model.load_state_dict(global_state)
        gen = torch_generator(cfg.seed, SHUFFLE, rnd, cid)
        train_client(model, x, y, gen, cc.epochs, cc.batch_size, cc.lr)
        n = len(y)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                acc[k].add_(v, alpha=n)
        total += n
    return {k: v / total for k, v in acc.items()}


# ------------------------------------------------------------------------ results


class BudgetExceededError(Exception):
    """A contender ran past its time budget (checked between clients)."""


@dataclass
class EngineResult:
    """Timings of one contender. ``rounds_s[i]`` is the wall time of round ``i + 1``."""

    name: str
    startup_s: float
    rounds_s: list[float] = field(default_factory=list)
    teardown_s: float = 0.0
    internal_rounds_s: list[float] = field(default_factory=list)
    note: str = ""
    stopped: str | None = None
    weights_round1: np.ndarray | None = None
    weights_final: np.ndarray | None = None

    @property
    def steady_s(self) -> float:
        """Median round time after the first (warm-up) round."""
        rounds = self.rounds_s[1:] if len(self.rounds_s) > 1 else self.rounds_s
        return statistics.median(rounds) if rounds else float("nan")

    @property
    def total_s(self) -> float:
        return self.startup_s + sum(self.rounds_s) + self.teardown_s

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "startup_s": self.startup_s,
            "rounds_s": self.rounds_s,
            "internal_rounds_s": self.internal_rounds_s,
            "teardown_s": self.teardown_s,
            "steady_s": self.steady_s,
            "total_s": self.total_s,
            "note": self.note,
            "stopped": self.stopped,
        }


class Contender:
    """One way of running the rounds; the driver times ``start``, ``run_round``, ``close``."""

    def __init__(
        self, key: str, name: str, cfg: RunConfig, threads: int | None, budgeted: bool = False
    ) -> None:
        self.key, self.name, self.cfg, self.threads = key, name, cfg, threads
        self.budgeted = budgeted
        self.deadline = float("inf")

    def start(self) -> None:
        raise NotImplementedError

    def run_round(self, rnd: int) -> float | None:
        """Run round ``rnd``; may return the engine's own measure of the round time."""
        raise NotImplementedError

    def weights(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        return None


class BareLoop(Contender):
    """The floor: no framework, one ``nn.Linear``, ``torch.optim.SGD`` per client."""

    def start(self) -> None:
        cfg = self.cfg
        data = build_federated_dataset(cfg.data, cfg.seed)
        self.tensors = client_tensors(data)
        self.model, self.state = bare_model(data, initial_vector(cfg, data))

    def run_round(self, rnd: int) -> float | None:
        clients = sampled_clients(self.cfg, rnd)
        self.state = bare_round(
            self.model, self.state, self.tensors, clients, rnd, self.cfg, self.deadline
        )
        return None

    def weights(self) -> np.ndarray:
        return state_to_vector(self.state)


class _BudgetedExecutor:
    """Hands an executor its tasks one at a time so a hopeless run can stop mid-round.

    Everything but ``fit`` is delegated unchanged to the wrapped engine.
    """

    def __init__(self, inner: ClientExecutor, owner: Contender) -> None:
        self.inner, self.owner = inner, owner

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast
    ) -> list[FitResult | ClientFailure]:
        out: list[FitResult | ClientFailure] = []
        for task in tasks:
            if time.perf_counter() > self.owner.deadline:
                raise BudgetExceededError
            out.extend(self.inner.fit([task], broadcast))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class FedloomEngine(Contender):
    """fedloom's own round loop with the in-process, process-pool, vectorized or Ray engine."""

    def start(self) -> None:
        cfg = self.cfg
        data = build_federated_dataset(cfg.data, cfg.seed)
        learner = build_learner(cfg, data)
        executor: ClientExecutor
        if cfg.engine.name == "pool":
            # Each worker builds data, model and runtime once from the config, as
            # run_simulation's pool does.
            factory = functools.partial(simulation_runtime, cfg.model_dump_json())
            sizes = data.client_sizes().tolist()
            executor = ProcessPoolExecutor(
                factory, sizes, ClientStateStore(), workers=cfg.engine.workers
            )
        elif cfg.engine.name == "vectorized":
            executor = VectorizedExecutor(client_runtime(cfg, data, learner), ClientStateStore())
        elif cfg.engine.name == "ray":
            from fedloom.engine.ray import RayExecutor

            # A local Ray instance (num_cpus = actors), one actor per core; each actor
            # builds data, model and runtime once from the config, as the pool's workers.
            factory = functools.partial(simulation_runtime, cfg.model_dump_json())
            executor = RayExecutor(
                factory,
                data.client_sizes().tolist(),
                ClientStateStore(),
                actors=cfg.engine.workers,
                actor_cpus=cfg.engine.actor_cpus,
                torch_threads=cfg.engine.torch_threads,
                vectorize=cfg.engine.vectorize,
            )
        else:
            executor = InProcessExecutor(client_runtime(cfg, data, learner), ClientStateStore())
        if self.budgeted:
            executor = cast(ClientExecutor, _BudgetedExecutor(executor, self))
        self.executor = executor
        strategy = build_strategy(
            cfg, num_clients=data.num_clients, spec=learner.binding.spec, roles_in_process=True
        )
        self.server = FederatedServer(
            strategy=strategy,
            executor=executor,
            initial_weights=learner.initial_vector(),
            num_clients=data.num_clients,
            rounds=cfg.rounds,
            seed=cfg.seed,
            # RoundRecorder without a run store only times the round (record["round_s"]).
            callbacks=[*strategy.callbacks, RoundRecorder()],
        )

    def run_round(self, rnd: int) -> float | None:
        return float(self.server.run_round(rnd)["round_s"])

    def weights(self) -> np.ndarray:
        return self.server.state.weights.copy()

    def close(self) -> None:
        self.executor.close()


def run_interleaved(
    contenders: list[Contender], rounds: int, budget_s: float
) -> dict[str, EngineResult]:
    """Start every contender, then run round 1 of each, round 2 of each, ...

    Interleaving exposes every contender to the same machine conditions (a shared VM's
    speed drifts over minutes); the order within a round rotates. A ``budgeted``
    contender (one using torch's default intra-op threads, which can collapse on a
    shared VM) whose own time, start-up included, passes ``budget_s`` is stopped
    between two clients.
    """
    results: dict[str, EngineResult] = {}
    for c in contenders:
        print(f"starting {c.name} ...", flush=True)
        with torch_threads(c.threads):
            t = time.perf_counter()
            c.start()
            results[c.key] = EngineResult(c.name, time.perf_counter() - t)
    active = list(contenders)
    for rnd in range(1, rounds + 1):
        shift = (rnd - 1) % max(len(active), 1)
        for c in active[shift:] + active[:shift]:
            res = results[c.key]
            with torch_threads(c.threads):
                t = time.perf_counter()
                if c.budgeted:
                    c.deadline = t + budget_s - res.startup_s - sum(res.rounds_s)
                try:
                    internal = c.run_round(rnd)
                except BudgetExceededError:
                    done = ", ".join(f"{x:.2f}" for x in res.rounds_s) or "none"
                    res.stopped = f"stopped in round {rnd}, over the {budget_s:g} s budget"
                    res.note = f"rounds done (s): {done}"
                    continue
                res.rounds_s.append(time.perf_counter() - t)
            if internal is not None:
                res.internal_rounds_s.append(internal)
            if rnd == 1:
                res.weights_round1 = c.weights()
        active = [c for c in active if results[c.key].stopped is None]
        print(f"  round {rnd} done", flush=True)
    for c in contenders:
        res = results[c.key]
        if res.stopped is None:
            res.weights_final = c.weights()
        t = time.perf_counter()
        c.close()
        res.teardown_s = time.perf_counter() - t
    return results


# ------------------------------------------------------------------------- Flower
#
# The Flower client code must be importable *by reference* in Ray's actor processes
# (``benchmarks.simulation``), so that each actor builds the data set once and keeps it
# between calls, as a real Flower app keeps a cached partition. ``run_flower`` therefore
# imports this file as ``benchmarks.simulation`` and hands Flower that module's functions.
#
# Two ways of writing the same Flower app are measured, and the faster one is compared:
# "legacy" is the long-standing NumPyClient + ``flwr.server.strategy.FedAvg`` (run inside
# a ServerApp through Flower's compatibility layer); "message" is the Message API that
# current Flower templates use (``@app.train()`` + ``flwr.serverapp.strategy.FedAvg``).

FLOWER_APIS = ("message", "legacy")


@dataclass
class _FlowerActorState:
    """What one Ray actor keeps between client calls: data tensors and one model."""

    cfg: RunConfig
    tensors: Tensors
    model: nn.Module
    keys: list[str]


_ACTOR_STATE: dict[str, _FlowerActorState] = {}


def _actor_state(cfg_json: str) -> _FlowerActorState:
    state = _ACTOR_STATE.get(cfg_json)
    if state is None:
        torch.set_num_threads(1)  # one CPU per actor (Ray also sets OMP_NUM_THREADS=1)
        cfg = config_from_json(cfg_json)
        data = build_federated_dataset(cfg.data, cfg.seed)
        model = nn.Linear(int(np.prod(data.input_shape)), data.num_classes)
        state = _FlowerActorState(cfg, client_tensors(data), model, list(model.state_dict()))
        _ACTOR_STATE[cfg_json] = state
    return state


def _flower_fit(st: _FlowerActorState, cid: int, rnd: int) -> int:
    """Train client ``cid`` from the model already loaded in ``st.model``."""
    cc = st.cfg.client
    x, y = st.tensors[cid]
    gen = torch_generator(st.cfg.seed, SHUFFLE, rnd, cid)
    train_client(st.model, x, y, gen, cc.epochs, cc.batch_size, cc.lr)
    return len(y)


@functools.cache
def _flower_client_class() -> type[Any]:
    from flwr.client import NumPyClient

    class BenchClient(NumPyClient):
        """Trains the client named in the fit config with the bare loop's code."""

        def __init__(self, state: _FlowerActorState) -> None:
            self.state = state

        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return [v.detach().numpy().copy() for v in self.state.model.state_dict().values()]

        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            st = self.state
            t_train_start = time.time()
            st.model.load_state_dict(
                {k: torch.from_numpy(v) for k, v in zip(st.keys, parameters, strict=True)}
            )
            n = _flower_fit(st, int(config["client_id"]), int(config["round"]))
            weights = [v.detach().numpy().copy() for v in st.model.state_dict().values()]
            return weights, n, {"t_train_start": t_train_start}

    return BenchClient


def flower_client_fn(cfg_json: str, context: Any) -> Any:
    """Legacy API ``client_fn``: a fresh (cheap) client around this actor's cached state."""
    return _flower_client_class()(_actor_state(cfg_json)).to_client()


def flower_train(cfg_json: str, msg: Any, context: Any) -> Any:
    """Message API ``@app.train()`` function: the same local training."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    st = _actor_state(cfg_json)
    t_train_start = time.time()
    st.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    config = msg.content["config"]
    n = _flower_fit(st, int(config["client_id"]), int(config["round"]))
    content = RecordDict(
        {
            "arrays": ArrayRecord(st.model.state_dict()),
            "metrics": MetricRecord({"num-examples": n, "t_train_start": t_train_start}),
        }
    )
    return Message(content=content, reply_to=msg)


def flower_version() -> str | None:
    return installed_version("flwr")


def installed_version(package: str) -> str | None:
    try:
        return package_version(package)
    except PackageNotFoundError:
        return None


def quiet_ray_environment() -> None:
    """The same Ray settings for Flower's instance and fedloom's: no usage reporting."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@dataclass
class _FlowerClock:
    """Round boundaries seen by the strategy (wall clock: clients run in other processes)."""

    rounds: int
    marks: dict[int, float] = field(default_factory=dict)  # end of round r
    train_starts: dict[int, float] = field(default_factory=dict)  # first client of round r
    snapshots: dict[int, np.ndarray] = field(default_factory=dict)

    def round_end(self, rnd: int, arrays: list[np.ndarray]) -> None:
        self.marks[rnd] = time.time()
        if rnd in (1, self.rounds):
            self.snapshots[rnd] = np.concatenate([a.reshape(-1) for a in arrays])


def _legacy_server_app(cfg: RunConfig, init: dict[str, torch.Tensor], clock: _FlowerClock) -> Any:
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.serverapp import ServerApp

    class TimedFedAvg(FedAvg):
        """Flower's FedAvg; gives the sampled clients fedloom's sampled ids; timestamps."""

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            # FedAvg sizes the sample from the clients registered *now*; wait for all.
            client_manager.wait_for(cfg.data.num_clients)
            pairs = super().configure_fit(server_round, parameters, client_manager)
            ids = sampled_clients(cfg, server_round)
            if len(pairs) != len(ids):
                raise RuntimeError(f"Flower sampled {len(pairs)} clients, fedloom {len(ids)}")
            return [
                (proxy, FitIns(ins.parameters, {"client_id": int(c), "round": server_round}))
                for (proxy, ins), c in zip(pairs, ids, strict=True)
            ]

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            if failures or len(results) != len(sampled_clients(cfg, server_round)):
                raise RuntimeError(
                    f"Flower round {server_round}: {len(results)} results, {len(failures)} failures"
                )
            clock.train_starts[server_round] = min(
                float(res.metrics["t_train_start"]) for _, res in results
            )
            return super().aggregate_fit(server_round, results, failures)

        def evaluate(self, server_round: int, parameters: Any) -> None:
            # Flower's server loop calls this after every round's aggregation.
            if server_round > 0:
                clock.round_end(server_round, parameters_to_ndarrays(parameters))
            return None

    strategy = TimedFedAvg(
        fraction_fit=cfg.server.fraction_fit,
        fraction_evaluate=0.0,
        min_fit_clients=1,
        min_evaluate_clients=0,
        min_available_clients=cfg.data.num_clients,
        initial_parameters=ndarrays_to_parameters([v.numpy() for v in init.values()]),
    )

    def server_fn(context: Any) -> Any:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=clock.rounds))

    return ServerApp(server_fn=server_fn)


def _message_server_app(cfg: RunConfig, init: dict[str, torch.Tensor], clock: _FlowerClock) -> Any:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    class TimedFedAvg(FedAvg):
        """Flower's FedAvg; gives the sampled nodes fedloom's sampled ids; timestamps."""

        def configure_train(
            self, server_round: int, arrays: Any, config: Any, grid: Any
        ) -> list[Any]:
            # FedAvg sizes the sample from the nodes registered *now*; wait for all.
            while len(list(grid.get_node_ids())) < cfg.data.num_clients:
                time.sleep(0.1)
            messages = list(super().configure_train(server_round, arrays, config, grid))
            ids = sampled_clients(cfg, server_round)
            if len(messages) != len(ids):
                raise RuntimeError(f"Flower sampled {len(messages)} nodes, fedloom {len(ids)}")
            return [
                Message(
                    content=RecordDict(
                        {
                            "arrays": arrays,
                            "config": ConfigRecord({"client_id": int(c), "round": server_round}),
                        }
                    ),
                    message_type=MessageType.TRAIN,
                    dst_node_id=m.metadata.dst_node_id,
                )
                for m, c in zip(messages, ids, strict=True)
            ]

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            errors = [m for m in replies if m.has_error()]
            if errors or len(replies) != len(sampled_clients(cfg, server_round)):
                raise RuntimeError(
                    f"Flower round {server_round}: {len(replies)} replies, {len(errors)} errors"
                )
            clock.train_starts[server_round] = min(
                float(m.content["metrics"]["t_train_start"]) for m in replies
            )
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is None:
                raise RuntimeError(f"Flower round {server_round}: nothing aggregated")
            clock.round_end(server_round, arrays.to_numpy_ndarrays())
            return arrays, metrics

    strategy = TimedFedAvg(
        fraction_train=cfg.server.fraction_fit,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=cfg.data.num_clients,
    )
    app = ServerApp()

    @app.main()
    def _main(grid: Any, context: Any) -> None:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(init), num_rounds=clock.rounds)

    return app


def run_flower(cfg: RunConfig, workers: int, init: np.ndarray, api: str) -> EngineResult:
    """Flower's simulation runtime (Ray) on the same clients, data, model and local loop."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    quiet_ray_environment()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    bench = importlib.import_module("benchmarks.simulation")

    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)

    num_classes = 10
    init_state = vector_to_state(init, init.size // num_classes - 1, num_classes)
    clock = _FlowerClock(cfg.rounds)
    cfg_json = cfg.model_dump_json()
    if api == "legacy":
        server_app = _legacy_server_app(cfg, init_state, clock)
        client_app = ClientApp(client_fn=functools.partial(bench.flower_client_fn, cfg_json))
    else:
        server_app = _message_server_app(cfg, init_state, clock)
        client_app = ClientApp()
        client_app.train()(functools.partial(bench.flower_train, cfg_json))
    backend_config: dict[str, Any] = {
        "init_args": {
            "num_cpus": workers,
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
        },
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }
    t0 = time.time()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.data.num_clients,
        backend_config=backend_config,
    )
    t_end = time.time()
    marks, rounds = clock.marks, cfg.rounds
    if any(r not in marks for r in range(1, rounds + 1)):
        raise RuntimeError(f"Flower completed only rounds {sorted(marks)}")
    # Flower's server loop starts round 1 while Ray and the actors are still starting, so
    # its start-up is taken to end when the first client starts training (after Ray, the
    # actors, node registration and that actor's data build); round 1 is the rest.
    startup_end = clock.train_starts[1]
    per_round = [marks[1] - startup_end] + [marks[r] - marks[r - 1] for r in range(2, rounds + 1)]
    return EngineResult(
        f"Flower {flower_version()} {api} API",
        startup_end - t0,
        per_round,
        t_end - marks[rounds],
        note=f"Ray with num_cpus={workers}, 1 CPU per client actor ({workers} actors)",
        weights_round1=clock.snapshots.get(1),
        weights_final=clock.snapshots.get(rounds),
    )


# ------------------------------------------------------------------ machine probes


def _spin(n: int) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t


def _spin_worker(barrier: Any, n: int, out: Any) -> None:
    barrier.wait()
    out.put(_spin(n))


def parallel_speedup(workers: int, n: int = 5_000_000) -> float:
    """Throughput of ``workers`` concurrent CPU-bound processes relative to one.

    About ``workers`` on dedicated cores; about 1 where the "cores" share one CPU's worth
    of time (an oversubscribed VM), in which case no engine can gain from parallelism.
    """
    single = _spin(n)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_spin_worker, args=(barrier, n, out)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    times = [float(out.get(timeout=300)) for _ in procs]
    for proc in procs:
        proc.join()
    return workers * single / max(times)


def probe_client_steps(
    cfg: RunConfig, data: FederatedDataset, init: np.ndarray, threads: int | None
) -> dict[str, float]:
    """Microseconds per SGD step of the bare loop's and fedloom's client code, one client.

    Lets the script skip a full run whose thread setting makes it hopeless (on an
    oversubscribed VM, torch's intra-op threads can be hundreds of times slower).
    """
    sizes = data.client_sizes()
    target = int(np.argmin(np.abs(sizes - 300)))
    warm = int(np.argmin(sizes))
    steps = sgd_steps(int(sizes[target]), cfg)
    tensors = client_tensors(data)
    cc = cfg.client
    out: dict[str, float] = {}
    with torch_threads(threads):
        model, state = bare_model(data, init)
        for cid, timed in ((warm, False), (target, True)):
            model.load_state_dict(state)
            x, y = tensors[cid]
            t = time.perf_counter()
            train_client(model, x, y, torch.Generator(), cc.epochs, cc.batch_size, cc.lr)
            if timed:
                out["bare"] = (time.perf_counter() - t) / steps * 1e6
        runtime = client_runtime(cfg, data)
        for cid, timed in ((warm, False), (target, True)):
            task = FitTask(client_id=cid, round=1, model_version=0)
            t = time.perf_counter()
            runtime.fit(task, {GLOBAL: init}, ClientState())
            if timed:
                out["fedloom"] = (time.perf_counter() - t) / steps * 1e6
    return out


# ------------------------------------------------------------------------ report


def max_abs_diff(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None:
        return float("nan")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "flwr": flower_version(),
        "ray": installed_version("ray"),
    }


def print_report(
    cfg: RunConfig,
    info: dict[str, Any],
    data_info: dict[str, Any],
    results: dict[str, EngineResult],
    floor_key: str,
    inproc_key: str,
    flower_note: str | None,
) -> dict[str, Any]:
    floor = results[floor_key]
    print()
    print(
        f"machine: {info['cores']} cores (throughput of {info['cores']} concurrent processes: "
        f"{info['parallel_speedup']:.2f}x one before the runs, "
        f"{info['parallel_speedup_after']:.2f}x after), {info['platform']}, "
        f"Python {info['python']}, "
        f"torch {info['torch']} (default threads {info['torch_default_threads']}), "
        f"flwr {info['flwr'] or 'not installed'}, ray {info['ray'] or 'not installed'}"
    )
    print(
        "load average (1, 5, 15 min): "
        + "; ".join(
            f"{k.removeprefix('load_')} {' '.join(f'{x:.2f}' for x in info[k])}"
            for k in ("load_before", "load_after")
            if k in info
        )
    )
    print(
        f"work: Synthetic(1,1), {cfg.data.num_clients} devices "
        f"({data_info['train_examples']} training examples), "
        f"{data_info['per_round']} sampled per round, E={cfg.client.epochs}, "
        f"B={cfg.client.batch_size}, lr={cfg.client.lr}, logreg 60->10, {cfg.rounds} rounds, "
        f"seed {cfg.seed}; SGD steps per round: "
        f"{', '.join(str(n) for n in data_info['steps_per_round'])}"
    )
    probe = data_info["probe_us_per_step"]
    print(
        f"client-code probe, us per SGD step (one client): bare loop {probe['default']['bare']:.0f}"
        f" at default threads / {probe['1']['bare']:.0f} at 1 thread; fedloom "
        f"{probe['default']['fedloom']:.0f} / {probe['1']['fedloom']:.0f}"
    )
    print()
    header = (
        f"{'contender':<40}{'start-up s':>11}{'s/round':>10}{'total s':>10}{'vs floor':>10}"
        f"{'round 1 s':>11}"
    )
    print(header)
    print("-" * len(header))
    notes: list[str] = []
    for key, r in results.items():
        if r.note:
            notes.append(f"  {r.name}: {r.stopped + '; ' if r.stopped else ''}{r.note}")
        if r.stopped is not None:
            steady = f"{r.steady_s:>10.3f}" if len(r.rounds_s) > 1 else f"{'-':>10}"
            print(f"{r.name:<40}{r.startup_s:>11.2f}{steady}{'-':>10}{'-':>10}   {r.stopped}")
            continue
        mark = "  <- floor" if key == floor_key else ""
        print(
            f"{r.name:<40}{r.startup_s:>11.2f}{r.steady_s:>10.3f}{r.total_s:>10.2f}"
            f"{r.steady_s / floor.steady_s:>9.2f}x{r.rounds_s[0]:>11.3f}{mark}"
        )
    print(
        f"(s/round = median over rounds 2..{cfg.rounds}; total = start-up + all rounds + "
        "teardown; vs floor = s/round over the floor's)"
    )
    for note in notes:
        print(note)
    if flower_note:
        print(flower_note)

    inproc, pool = results[inproc_key], results.get("pool")
    aims: dict[str, Any] = {}
    lines: list[str] = []
    if pool is not None:
        ratio = pool.steady_s / floor.steady_s
        aims["pool_over_floor"] = ratio
        lines.append(
            f"pool per round <= floor: {ratio:.2f}x  [{'met' if ratio <= 1 else 'MISSED'}]"
        )
    ratio = inproc.steady_s / floor.steady_s
    aims["inprocess_over_floor"] = ratio
    lines.append(
        f"in-process per round <= 1.2x floor: {ratio:.2f}x  [{'met' if ratio <= 1.2 else 'MISSED'}]"
    )
    vec = results.get("vectorized")
    if vec is not None and vec.stopped is None:
        speedup = floor.steady_s / vec.steady_s
        aims["floor_over_vectorized"] = speedup
        verdict = "met" if speedup >= 5 else "MISSED"
        if speedup >= 20:
            verdict += ", moonshot 20x met"
        lines.append(
            f"vectorized per round >= 5x faster than the floor: {speedup:.2f}x  [{verdict}]"
        )
    flowers = [k for k in results if k.startswith("flower") and results[k].stopped is None]
    # The Flower aims compare the engines that run any model (as before the vectorized
    # engine existed); the vectorized engine and fedloom on Ray get their own rows and
    # lines (fedloom on Ray against Flower on Ray is its own aim).
    fedlooms = [k for k in (inproc_key, "pool") if k in results]
    rays = [
        key for key, _ in RAY_VARIANTS.values() if key in results and results[key].stopped is None
    ]
    extra = [k for k in ("vectorized", *(key for key, _ in RAY_VARIANTS.values())) if k in results]
    if flowers:
        print()
        print(f"{'Flower time / fedloom time':<62}{'per steady round':>18}{'whole run':>12}")
        for fk in flowers:
            for key in [*fedlooms, *extra]:
                fl, other = results[fk], results[key]
                if other.stopped is not None:
                    continue
                per_round, whole = fl.steady_s / other.steady_s, fl.total_s / other.total_s
                aims[f"{fk}_over_{key}"] = {"per_round": per_round, "whole_run": whole}
                label = f"  Flower {fk.removeprefix('flower_')} API / {other.name}"
                print(f"{label:<62}{per_round:>17.2f}x{whole:>11.2f}x")
        # Conservative: fedloom's faster engine against Flower's faster API, per metric.
        best_round = min(results[k].steady_s for k in flowers) / min(
            results[k].steady_s for k in fedlooms
        )
        best_total = min(results[k].total_s for k in flowers) / min(
            results[k].total_s for k in fedlooms
        )
        aims["flower_over_fedloom_best"] = {"per_round": best_round, "whole_run": best_total}
        lines.append(
            f">= 2x faster than Flower per steady round: {best_round:.2f}x  "
            f"[{'met' if best_round >= 2 else 'MISSED'}]"
        )
        lines.append(
            f">= 5x faster than Flower over the whole run: {best_total:.2f}x  "
            f"[{'met' if best_total >= 5 else 'MISSED'}]"
        )
        if vec is not None and vec.stopped is None:
            vec_round = min(results[k].steady_s for k in flowers) / vec.steady_s
            vec_total = min(results[k].total_s for k in flowers) / vec.total_s
            aims["flower_over_vectorized"] = {"per_round": vec_round, "whole_run": vec_total}
            lines.append(
                f"vectorized vs Flower's faster API: {vec_round:.2f}x per steady round, "
                f"{vec_total:.2f}x over the whole run"
            )
        if rays:
            print()
            for key in rays:
                ray = results[key]
                for fk in flowers:
                    fl = results[fk]
                    print(
                        f"{ray.name} vs Flower on Ray ({fk.removeprefix('flower_')} API): "
                        f"steady {fl.steady_s / ray.steady_s:.2f}x, "
                        f"whole run {fl.total_s / ray.total_s:.2f}x"
                    )
            # fedloom's best Ray variant against Flower's faster API, per metric (each
            # line names the variant).
            round_key = min(rays, key=lambda k: results[k].steady_s)
            total_key = min(rays, key=lambda k: results[k].total_s)
            ray_round = min(results[k].steady_s for k in flowers) / results[round_key].steady_s
            ray_total = min(results[k].total_s for k in flowers) / results[total_key].total_s
            aims["flower_over_ray"] = {
                "per_round": ray_round,
                "whole_run": ray_total,
                "per_round_by": round_key,
                "whole_run_by": total_key,
            }
            lines.append(
                f"fedloom on Ray >= 3x faster than Flower on Ray per steady round: "
                f"{ray_round:.2f}x by {results[round_key].name}  "
                f"[{'met' if ray_round >= 3 else 'MISSED'}]"
            )
            lines.append(
                f"fedloom on Ray >= 3x faster than Flower on Ray over the whole run: "
                f"{ray_total:.2f}x by {results[total_key].name}  "
                f"[{'met' if ray_total >= 3 else 'MISSED'}]"
            )
    print()
    print(
        "aims (fedloom's engines vs the floor; in-process/pool's faster vs Flower's faster "
        "API; fedloom's faster Ray variant vs Flower's faster API):"
    )
    for line in lines:
        print("  " + line)
    return aims


#: fedloom's Ray variants: ``api`` of the phase -> (result key, contender name).
RAY_VARIANTS = {
    "": ("ray", "fedloom on Ray"),
    "vectorized": ("ray_vectorized", "fedloom on Ray, vectorized"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="fedloom vs a bare PyTorch loop vs Flower on Synthetic(1,1)."
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="pool workers / Ray CPUs; 0 = cores")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--skip-ray", action="store_true", help="no fedloom on Ray contender")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=30.0,
        help="stop a default-thread contender whose run (from its start) passes this",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is the warm-up)")
    workers = args.workers or os.cpu_count() or 1
    cfg = build_config(args)
    info = machine_info()
    info["load_before"] = list(os.getloadavg())
    info["parallel_speedup"] = parallel_speedup(workers)

    # Outside every timing: the data summary, the probes, the initial model for Flower.
    data = build_federated_dataset(cfg.data, cfg.seed)
    sizes = data.client_sizes()
    steps_per_round = [
        sum(sgd_steps(int(n), cfg) for n in sizes[sampled_clients(cfg, r)])
        for r in range(1, cfg.rounds + 1)
    ]
    init = initial_vector(cfg, data)
    probe = {
        "default": probe_client_steps(cfg, data, init, None),
        "1": probe_client_steps(cfg, data, init, 1),
    }
    data_info = {
        "train_examples": int(sizes.sum()),
        "per_round": args.per_round,
        "steps_per_round": steps_per_round,
        "probe_us_per_step": probe,
    }
    del data

    default_threads = torch.get_num_threads()
    pool_cfg = cfg.model_copy(deep=True)
    pool_cfg.engine.name = "pool"
    pool_cfg.engine.workers = workers
    vec_cfg = cfg.model_copy(deep=True)
    vec_cfg.engine.name = "vectorized"
    contenders: list[Contender] = [
        BareLoop("bare_default", f"bare loop ({default_threads} threads)", cfg, None, True),
        BareLoop("bare_1", "bare loop (1 thread)", cfg, 1),
        FedloomEngine(
            "inprocess_default",
            f"fedloom in-process ({default_threads} thr)",
            cfg,
            None,
            budgeted=True,
        ),
        FedloomEngine("inprocess_1", "fedloom in-process (1 thread)", cfg, 1),
        FedloomEngine("pool", f"fedloom pool ({workers} workers)", pool_cfg, None),
        FedloomEngine("vectorized", "fedloom vectorized (1 thread)", vec_cfg, 1),
    ]
    results = run_interleaved(contenders, cfg.rounds, args.budget_s)

    # Flower's Message API, fedloom on Ray, Flower's legacy API: one Ray instance at a
    # time, the Ray-vs-Ray comparison close together in time.
    flower_note: str | None = None
    flower_apis: tuple[str, ...] = FLOWER_APIS
    if args.skip_flower:
        flower_note = "Flower skipped (--skip-flower)"
        flower_apis = ()
    elif flower_version() is None:
        flower_note = "flwr not installed — run `make bench`"
        print(flower_note)
        flower_apis = ()
    ray_note: str | None = None
    run_ray = not args.skip_ray
    if args.skip_ray:
        ray_note = "fedloom on Ray skipped (--skip-ray)"
    elif installed_version("ray") is None:
        ray_note = "ray not installed: no fedloom-on-Ray row (pip install 'fedloom[ray]')"
        print(ray_note)
        run_ray = False
    if flower_apis or run_ray:
        info["parallel_speedup_before_flower"] = parallel_speedup(workers)
        quiet_ray_environment()
    phases = [*(("flower", api) for api in flower_apis)]
    if run_ray:  # fedloom's two Ray variants between Flower's two APIs
        phases[min(1, len(phases)) : min(1, len(phases))] = [("ray", ""), ("ray", "vectorized")]
    for kind, api in phases:
        if kind == "ray":
            importlib.import_module("ray")  # imports are outside every timing
            ray_cfg = cfg.model_copy(deep=True)
            ray_cfg.engine.name = "ray"
            ray_cfg.engine.workers = workers
            ray_cfg.engine.vectorize = api == "vectorized"
            key, label = RAY_VARIANTS[api]
            on_ray = FedloomEngine(key, f"{label} ({workers} actors)", ray_cfg, 1)
            try:
                results.update(run_interleaved([on_ray], cfg.rounds, args.budget_s))
                split = on_ray.executor.startup_s  # type: ignore[attr-defined]
                results[key].note = (
                    f"local Ray with num_cpus={workers}, {workers} actors of 1 CPU; start-up: "
                    f"Ray {split['ray']:.2f} s, actors {split['actors']:.2f} s (the slowest "
                    f"actor's own torch import and runtime build {split['actor_build']:.2f} s)"
                )
            except Exception as exc:
                failed = f"{label} failed: {type(exc).__name__}: {exc}"
                ray_note = f"{ray_note}; {failed}" if ray_note else failed
                print(failed)
            continue
        print(f"running Flower {flower_version()} ({api} API) ...", flush=True)
        try:
            results[f"flower_{api}"] = run_flower(cfg, workers, init, api)
        except Exception as exc:
            flower_note = f"Flower ({api} API) failed: {type(exc).__name__}: {exc}"
            print(flower_note)

    finished = {k: r for k, r in results.items() if r.stopped is None}
    floor_key = min(
        (k for k in finished if k.startswith("bare")), key=lambda k: results[k].steady_s
    )
    inproc_key = min(
        (k for k in finished if k.startswith("inprocess")), key=lambda k: results[k].steady_s
    )
    info["parallel_speedup_after"] = parallel_speedup(workers)
    info["load_after"] = list(os.getloadavg())

    # Same work? From the same start every contender takes the floor's SGD steps, so
    # every finished contender's models must equal the floor's (float tolerance).
    checks, failures = same_work_checks(results, floor_key)
    print()
    print(f"same work (max |w_contender - w_floor| over the {init.size} global parameters):")
    for name, value in checks.items():
        print(f"  {name}: {value:.3g}")
    aims: dict[str, Any] | None = None
    if not failures:
        notes = "\n".join(n for n in (ray_note, flower_note) if n) or None
        aims = print_report(cfg, info, data_info, results, floor_key, inproc_key, notes)

    if args.json is not None:
        payload = {
            "machine": info,
            "config": cfg.to_dict(),
            "data": data_info,
            "results": {k: r.to_json() for k, r in results.items()},
            "floor": floor_key,
            "inprocess": inproc_key,
            "checks": checks,
            "valid": not failures,
            "failures": failures,
        }
        if aims is not None:
            payload["aims"] = aims
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")

    if failures:
        print()
        for failure in failures:
            print(f"ERROR: {failure}")
        print("no timings or ratios are reported: a contender did not do the floor's work")
        return 1
    return 0


def same_work_checks(
    results: dict[str, EngineResult], floor_key: str
) -> tuple[dict[str, float], list[str]]:
    """Every finished contender's round-1 and final global models against the floor's.

    A contender stopped by its time budget has no final model and no ratio in the
    report; any other missing model is a failure (NaN never passes the comparison).
    """
    floor = results[floor_key]
    checks: dict[str, float] = {}
    failures: list[str] = []
    for key, res in results.items():
        if key == floor_key or res.stopped is not None:
            continue
        for stage, mine, ref, tolerance in (
            ("round 1", res.weights_round1, floor.weights_round1, ROUND1_TOLERANCE),
            ("the last round", res.weights_final, floor.weights_final, FINAL_TOLERANCE),
        ):
            diff = max_abs_diff(mine, ref)
            checks[f"{'round1' if stage == 'round 1' else 'final'}_{key}_vs_floor"] = diff
            if not diff <= tolerance:
                failures.append(
                    f"{res.name} differs from the floor after {stage} "
                    f"({diff:.3g} > {tolerance:g}): not the same work"
                )
    return checks, failures


if __name__ == "__main__":
    sys.exit(main())
