"""Clients on a Ray cluster: long-lived actors that keep a model and their data.

Ray (Moritz et al. 2018) is what simulations at cluster scale already run on; this
engine uses it the way the pool engine uses processes. Each actor builds one
:class:`~fedloom.client.runtime.ClientRuntime` from the same picklable factory the
pool uses, so the model is made once and reset in place for every client it trains:
never one actor per client. The factory builds the data set on the actor itself
(generated from the seed, or read from ``data.path``, which every node must be able to
read), so per round only the broadcast (put in the object store once), each client's
id and state, and the updates travel.

Each actor reserves ``engine.actor_cpus`` CPUs (and, with ``engine.device`` on CUDA,
``engine.actor_gpus`` of one GPU, so several actors share it; the actor trains on the
GPU Ray assigns it) and runs one task at a time
(``max_concurrency=1``, stated rather than left to Ray's default: a runtime trains one
client at a time). Actors are spread over the nodes. Tasks are handed out largest
client first, two in flight per actor, so an actor never waits on the driver.

Client state lives in the driver's :class:`~fedloom.client_store.ClientStateStore`
and travels with each task, exactly as in the pool engine, so the result does not
depend on which actor ran which client. An actor that dies (its process killed, its
node lost) costs only the tasks it held: each becomes a :class:`ClientFailure` that the
round records, the round goes on with the other actors, and the dead actor is replaced
by a fresh one (once per actor and round, so an actor that cannot start does not loop).

Secure aggregation needs every held upload in one place; like the pool, this engine
answers no protocol exchange (the configuration refuses the combination).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import socket
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from fedloom.client.runtime import ClientRuntime
from fedloom.client.safety import run_safely
from fedloom.client_store import ClientState, ClientStateStore
from fedloom.config import ConfigError
from fedloom.engine.inprocess import LocalClients
from fedloom.exchange import ExchangeRequest
from fedloom.messages import Broadcast, ClientFailure, EvalResult, EvalTask, FitResult, FitTask

log = logging.getLogger("fedloom.engine")

Task = FitTask | EvalTask
Outcome = FitResult | EvalResult | ClientFailure
RuntimeFactory = Callable[[], ClientRuntime]

#: Tasks queued on one actor at a time: one running, one waiting, so the actor starts
#: its next client while the driver is still reading the last result.
IN_FLIGHT_PER_ACTOR = 2
#: How long to wait for a TCP answer from the cluster's head before giving up.
CONNECT_TIMEOUT_S = 10.0


class RayUnavailableError(ConfigError):
    """Ray is not installed, or the cluster cannot be reached; the message says which."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise RayUnavailableError(
            "engine.name = 'ray' needs Ray; install it with pip install 'fedloom[ray]'"
        ) from err
    return ray


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in one line when nothing answers at ``address``.

    ``ray.init`` retries an unreachable head for minutes while printing warnings;
    a plain TCP connection says in seconds whether there is anything to join.
    """
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnavailableError(
            f"engine.address '{address}' is not host:port (the address `ray start --head` "
            "prints, e.g. 10.0.0.5:6379)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise RayUnavailableError(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}); start it with "
            "`ray start --head` or fix engine.address"
        ) from err


class _ClientActor:
    """One model, built once; trains the clients it is sent one at a time."""

    def __init__(self, factory: RuntimeFactory, torch_threads: int, gpu: bool = False) -> None:
        import os

        import torch

        torch.set_num_threads(torch_threads)
        self.runtime = factory()
        if gpu:  # the GPU Ray assigned this actor (CUDA_VISIBLE_DEVICES lists it)
            ray = _import_ray()
            index = actor_cuda_index(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            self.runtime = self.runtime.on_device(torch.device("cuda", index))
        self._broadcast_id = -1
        self._broadcast: Broadcast = {}

    def num_parameters(self) -> int:
        return int(self.runtime.learner.num_parameters)

    def _use(self, broadcast_id: int, broadcast: Broadcast) -> Broadcast:
        # Arrays from the object store are read-only views; copy them once per round.
        if broadcast_id != self._broadcast_id:
            self._broadcast = {k: np.array(v, dtype=v.dtype) for k, v in broadcast.items()}
            self._broadcast_id = broadcast_id
        return self._broadcast

    def fit(
        self, task: FitTask, broadcast_id: int, broadcast: Broadcast, state: bytes
    ) -> tuple[FitResult | ClientFailure, bytes | None]:
        client_state = ClientState.from_bytes(state)
        out = run_safely(
            partial(self.runtime.fit, task, self._use(broadcast_id, broadcast), client_state),
            task,
        )
        return out, client_state.to_bytes() if isinstance(out, FitResult) else None

    def evaluate(
        self, task: EvalTask, broadcast_id: int, broadcast: Broadcast, state: bytes
    ) -> tuple[EvalResult | ClientFailure, None]:
        client_state = ClientState.from_bytes(state)
        out = run_safely(
            partial(self.runtime.evaluate, task, self._use(broadcast_id, broadcast), client_state),
            task,
        )
        return out, None

    def pid(self) -> int:
        import os

        return os.getpid()


@dataclass
class _Slot:
    actor: Any
    alive: bool = True
    replaced_this_round: bool = False


class RayExecutor(LocalClients):
    """Runs client tasks on ``actors`` Ray actors (0: as many as the cluster's CPUs hold).

    ``address`` joins a running cluster; None starts a Ray instance on this machine
    (with ``actors`` CPUs, or every core), which :meth:`close` shuts down again.
    """

    def __init__(
        self,
        factory: RuntimeFactory,
        client_sizes: Sequence[int],
        store: ClientStateStore,
        *,
        address: str | None = None,
        actors: int = 0,
        actor_cpus: float = 1.0,
        torch_threads: int = 1,
        device: str = "cpu",
        actor_gpus: float | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        ray = _import_ray()
        self._ray = ray
        self.client_sizes = list(client_sizes)
        self.store = store
        self._factory = factory
        self._torch_threads = torch_threads
        self._start_timeout_s = start_timeout_s
        self._owns_connection = False
        self._replaced = 0
        self._broadcast_id = 0
        self.slots: list[_Slot] = []
        self.size = 0
        if not ray.is_initialized():
            if address is not None:
                check_reachable(address)
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            else:
                ray.init(
                    address="local",
                    num_cpus=math.ceil(actors * actor_cpus) if actors else None,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            self._owns_connection = True
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        if actors == 0:
            actors = max(1, int(cpus // actor_cpus))
        if actors * actor_cpus > cpus:
            self.close()
            raise ConfigError(
                f"engine.workers = {actors} actors of engine.actor_cpus = {actor_cpus:g} need "
                f"{actors * actor_cpus:g} CPUs but the Ray cluster has {cpus:g}; lower one of them"
            )
        gpus = int(ray.cluster_resources().get("GPU", 0.0))  # the cluster's decide 'auto'
        self._use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
        try:
            self.actor_gpus = actor_gpu_share(actors, gpus, actor_gpus) if self._use_gpu else 0.0
        except ConfigError:
            self.close()
            raise
        self._actor_class = ray.remote(_ClientActor).options(
            num_cpus=actor_cpus,
            num_gpus=self.actor_gpus,
            max_concurrency=1,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        )
        try:
            self.slots = [_Slot(self._spawn()) for _ in range(actors)]
            sizes = ray.get(
                [s.actor.num_parameters.remote() for s in self.slots], timeout=start_timeout_s
            )
        except Exception as err:
            self.close()
            name, sep, text = _cause_line(err).partition(": ")
            if sep and name.rsplit(".", 1)[-1] == "ConfigError":  # e.g. refused on a GPU
                raise ConfigError(text) from err
            raise RayUnavailableError(
                f"Ray actors failed to start ({_cause_line(err)}); is this fedloom installed "
                "on every node?"
            ) from err
        self.size = int(sizes[0])

    def _spawn(self) -> Any:
        return self._actor_class.remote(self._factory, self._torch_threads, self._use_gpu)

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast
    ) -> list[FitResult | ClientFailure]:
        return [o for o in self._run(tasks, broadcast) if not isinstance(o, EvalResult)]

    def evaluate(
        self, tasks: Sequence[EvalTask], broadcast: Broadcast
    ) -> list[EvalResult | ClientFailure]:
        return [o for o in self._run(tasks, broadcast) if not isinstance(o, FitResult)]

    def exchange(self, request: ExchangeRequest, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        raise NotImplementedError(
            "the Ray engine runs no protocol exchange (secure aggregation is refused with it)"
        )

    def round_metrics(self) -> dict[str, Any]:
        """``actors_replaced``: actors that died during the round and were started again."""
        replaced, self._replaced = self._replaced, 0
        return {"actors_replaced": replaced} if replaced else {}

    def _run(self, tasks: Sequence[Task], broadcast: Broadcast) -> list[Outcome]:
        ray = self._ray
        for i, slot in enumerate(self.slots):
            slot.replaced_this_round = False
            if not slot.alive:
                self._replace(i)
        self._broadcast_id += 1
        ref = ray.put(dict(broadcast))
        pending = deque(sorted(tasks, key=lambda t: -self.client_sizes[t.client_id]))
        inflight: dict[Any, tuple[int, Any, Task]] = {}
        load = [0] * len(self.slots)
        results: dict[tuple[int, int], Outcome] = {}

        def dispatch(i: int) -> None:
            while pending and self.slots[i].alive and load[i] < IN_FLIGHT_PER_ACTOR:
                task = pending.popleft()
                actor = self.slots[i].actor
                method = actor.fit if isinstance(task, FitTask) else actor.evaluate
                state = self.store.get(task.client_id).to_bytes()
                inflight[method.remote(task, self._broadcast_id, ref, state)] = (i, actor, task)
                load[i] += 1

        for i in range(len(self.slots)):
            dispatch(i)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for done in ready:
                i, actor, task = inflight.pop(done)
                load[i] -= 1
                results[(task.client_id, task.round)] = self._receive(i, actor, task, done)
            for i, slot in enumerate(self.slots):
                if not slot.alive and not slot.replaced_this_round:
                    self._replace(i)
                    # The dead actor's queued tasks still come back (as failures).
                    load[i] = sum(1 for j, _, _ in inflight.values() if j == i)
                dispatch(i)
            if not inflight:
                while pending:
                    t = pending.popleft()
                    results[(t.client_id, t.round)] = ClientFailure(
                        client_id=t.client_id,
                        round=t.round,
                        error="no live Ray actor to run this client",
                    )
        return [results[(t.client_id, t.round)] for t in tasks]

    def _receive(self, i: int, actor: Any, task: Task, ref: Any) -> Outcome:
        ray = self._ray
        try:
            out, state = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            if self.slots[i].actor is actor:  # not a replacement started since
                self.slots[i].alive = False
            return ClientFailure(
                client_id=task.client_id,
                round=task.round,
                error=f"Ray actor died: {_first_line(err)}",
            )
        except ray.exceptions.RayError as err:
            return ClientFailure(
                client_id=task.client_id,
                round=task.round,
                error=f"Ray task failed: {_first_line(err)}",
            )
        if state is not None:
            self.store.put(task.client_id, ClientState.from_bytes(state), round=task.round)
        outcome: Outcome = out
        return outcome

    def _replace(self, i: int) -> None:
        """A fresh actor in a dead one's place; its work queues until it has started."""
        slot = self.slots[i]
        with contextlib.suppress(Exception):  # already gone
            self._ray.kill(slot.actor, no_restart=True)
        slot.actor = self._spawn()
        slot.alive = True
        slot.replaced_this_round = True
        self._replaced += 1
        log.warning("a Ray actor died; started a replacement")

    def save_client_state(self) -> dict[str, Any]:
        return self.store.manifest()

    def load_client_state(self, manifest: Mapping[str, Any]) -> None:
        self.store.restore(manifest)

    def close(self) -> None:
        ray = self._ray
        for slot in self.slots:
            with contextlib.suppress(Exception):  # the actor or the cluster is already gone
                ray.kill(slot.actor, no_restart=True)
        self.slots = []
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()
            self._owns_connection = False


def actor_gpu_share(actors: int, gpus: int, requested: float | None) -> float:
    """The GPU fraction each actor reserves (``engine.actor_gpus``), or one line why the
    cluster cannot hold them.

    A fractional request is placed on one GPU, never split across two, so a GPU holds
    ``floor(1 / share)`` actors. The default packs ``ceil(actors / gpus)`` actors on each
    GPU, the fewest per GPU that still start every actor.
    """
    if gpus < 1:
        raise ConfigError(
            "engine.device = 'cuda' but the Ray cluster has no GPUs; "
            "set engine.device = 'auto' or 'cpu'"
        )
    share = requested if requested is not None else 1.0 / math.ceil(actors / gpus)
    share = math.floor(share * 10_000) / 10_000  # Ray's resource precision
    if share <= 0.0 or actors > gpus * math.floor(1.0 / share + 1e-9):
        raise ConfigError(
            f"engine.workers = {actors} actors of engine.actor_gpus = {share:g} do not fit on "
            f"the Ray cluster's {gpus} GPUs ({math.floor(1.0 / share + 1e-9) if share else 0} "
            "per GPU); lower engine.actor_gpus or engine.workers"
        )
    return share


def actor_cuda_index(gpu_ids: Sequence[int | str], visible: str | None) -> int:
    """The torch CUDA index of the GPU Ray gave an actor: its position in
    ``CUDA_VISIBLE_DEVICES`` (which Ray sets to the actor's GPUs), or the id itself when
    Ray left the variable alone."""
    if not gpu_ids:
        raise RuntimeError("Ray assigned this actor no GPU although it asked for one")
    first = str(gpu_ids[0]).strip()
    listed = [v.strip() for v in visible.split(",")] if visible else []
    if first in listed:
        return listed.index(first)
    return 0 if listed else int(first)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _cause_line(err: BaseException) -> str:
    """The line of a Ray error that names the exception underneath, else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return causes[-1] if causes else _first_line(err)
