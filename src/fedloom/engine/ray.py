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
GPU Ray assigns it) and runs one call at a time
(``max_concurrency=1``, stated rather than left to Ray's default: a runtime trains one
client at a time). Actors are spread over the nodes. Tasks are handed out largest
client first, in chunks that shrink as the round's queue empties (guided
self-scheduling, Polychronopoulos and Kuck 1987, by work rather than count: a chunk
holds at most the queued examples over four times the actors, and at least one client,
so a large client travels alone), two chunks in flight per actor, so an actor never
waits on the driver. A Ray call costs about a millisecond of driver and actor time
whatever it carries, about as much as training one small client; chunks pay it a few
times per actor and round instead of once per client, while the last, one-client
chunks still even out the actors' finishing times.

Client state lives in the driver's :class:`~fedloom.client_store.ClientStateStore`
and travels with each task, exactly as in the pool engine, so the result does not
depend on which actor ran which client. An actor that dies (its process killed, its
node lost) costs only the tasks it held (the chunks it was running or had queued):
each becomes a :class:`ClientFailure` that the round records, the round goes on with
the other actors, and the dead actor is replaced by a fresh one (once per actor and
round, so an actor that cannot start does not loop).

With ``engine.vectorize = true`` an actor trains the clients of a chunk at once,
through the vectorized engine's :class:`~fedloom.engine.vectorized.BatchFit` (the same
checks, refused at start-up with one line, and the same updates to float tolerance).
Batching pays with many clients per call, so then a round is cut into one chunk per
actor (by examples, largest clients first; what is left over goes to whichever actor
finishes first) and each actor holds one chunk at a time.

Secure aggregation needs every held upload in one place; like the pool, this engine
answers no protocol exchange (the configuration refuses the combination).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import socket
import time
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
from fedloom.engine.vectorized import BatchFit
from fedloom.exchange import ExchangeRequest
from fedloom.messages import Broadcast, ClientFailure, EvalResult, EvalTask, FitResult, FitTask

log = logging.getLogger("fedloom.engine")

Task = FitTask | EvalTask
Outcome = FitResult | EvalResult | ClientFailure
RuntimeFactory = Callable[[], ClientRuntime]

#: Chunks queued on one actor at a time: one running, one waiting, so the actor starts
#: its next chunk while the driver is still reading the last result.
IN_FLIGHT_PER_ACTOR = 2
#: A chunk holds at most the round's queued examples over this many times the actors
#: (and at least one client).
CHUNKS_PER_ACTOR = 4
#: ``engine.vectorize``: the refusals name this setting, and the way out.
VECTORIZE_SETTING = ("engine.vectorize = true", "set engine.vectorize = false")
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


def _join(ray: Any, address: str) -> None:
    """``ray.init`` on an existing cluster; a cluster that answers but will not take this
    driver (most often token authentication) fails in one line that says what to set."""
    # AuthenticationError is Ray's own (2.5x on); older releases raise ConnectionError only.
    refused = (ConnectionError, getattr(ray.exceptions, "AuthenticationError", ConnectionError))
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except refused as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RayUnavailableError(
            f"the Ray cluster at {address} answers but did not accept this driver ({reason}); if "
            "it uses token authentication (Ray 2.60 turns it on for `ray start --head` when "
            "~/.ray/auth_token exists), copy that token file here and set RAY_AUTH_MODE=token"
        ) from err


class _ClientActor:
    """One model, built once; trains the clients it is sent one at a time, or a chunk's
    clients at once (``vectorize``)."""

    def __init__(
        self,
        factory: RuntimeFactory,
        torch_threads: int,
        gpu: bool = False,
        vectorize: bool = False,
    ) -> None:
        import os

        started = time.perf_counter()
        import torch

        torch.set_num_threads(torch_threads)
        self.runtime = factory()
        if gpu:  # the GPU Ray assigned this actor (CUDA_VISIBLE_DEVICES lists it)
            ray = _import_ray()
            index = actor_cuda_index(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            self.runtime = self.runtime.on_device(torch.device("cuda", index))
        self._batch = (
            BatchFit(self.runtime, device=self.runtime.learner.device, setting=VECTORIZE_SETTING)
            if vectorize
            else None
        )
        self._built_s = time.perf_counter() - started
        self._broadcast_id = -1
        self._broadcast: Broadcast = {}

    def started(self) -> tuple[int, float]:
        """The model's size, and the seconds this actor took to import torch and build."""
        return int(self.runtime.learner.num_parameters), self._built_s

    def _use(self, broadcast_id: int, broadcast: Broadcast) -> Broadcast:
        # Arrays from the object store are read-only views; copy them once per round.
        if broadcast_id != self._broadcast_id:
            self._broadcast = {k: np.array(v, dtype=v.dtype) for k, v in broadcast.items()}
            self._broadcast_id = broadcast_id
        return self._broadcast

    def run(
        self, tasks: list[Task], broadcast_id: int, broadcast: Broadcast, states: list[bytes]
    ) -> list[tuple[Outcome, bytes | None]]:
        """Train (or evaluate) a chunk of clients in order; each one's outcome and new state."""
        model = self._use(broadcast_id, broadcast)
        fits = [t for t in tasks if isinstance(t, FitTask)]
        if self._batch is not None and fits and len(fits) == len(tasks):
            kept = self._batch.fit(fits, model, [ClientState.from_bytes(s) for s in states])
            return [(o, None if st is None else st.to_bytes()) for o, st in kept]
        out: list[tuple[Outcome, bytes | None]] = []
        for task, state in zip(tasks, states, strict=True):
            client_state = ClientState.from_bytes(state)
            if isinstance(task, FitTask):
                fitted = run_safely(partial(self.runtime.fit, task, model, client_state), task)
                keep = isinstance(fitted, FitResult)  # a failed fit leaves the state as it was
                out.append((fitted, client_state.to_bytes() if keep else None))
            else:
                evaluated = run_safely(
                    partial(self.runtime.evaluate, task, model, client_state), task
                )
                out.append((evaluated, None))
        return out

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
        vectorize: bool = False,
    ) -> None:
        ray = _import_ray()
        self._ray = ray
        self.client_sizes = list(client_sizes)
        self.store = store
        self._factory = factory
        self._torch_threads = torch_threads
        self.vectorize = vectorize
        self._start_timeout_s = start_timeout_s
        self._owns_connection = False
        self._replaced = 0
        self._broadcast_id = 0
        self.slots: list[_Slot] = []
        self.size = 0
        #: Where start-up went (seconds): ``ray`` starting or joining Ray (0 if this
        #: process was already connected), ``actors`` until every actor answered,
        #: ``actor_build`` the slowest actor's own import and runtime build within it.
        self.startup_s: dict[str, float] = {"ray": 0.0}
        started = time.perf_counter()
        if not ray.is_initialized():
            if address is not None:
                check_reachable(address)
                _join(ray, address)
            else:
                ray.init(
                    address="local",
                    num_cpus=math.ceil(actors * actor_cpus) if actors else None,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            self._owns_connection = True
        self.startup_s["ray"] = time.perf_counter() - started
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
        started = time.perf_counter()
        try:
            self.slots = [_Slot(self._spawn()) for _ in range(actors)]
            answers = ray.get(
                [s.actor.started.remote() for s in self.slots], timeout=start_timeout_s
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
        self.startup_s["actors"] = time.perf_counter() - started
        self.startup_s["actor_build"] = max(built for _, built in answers)
        self.size = int(answers[0][0])

    def _spawn(self) -> Any:
        return self._actor_class.remote(
            self._factory, self._torch_threads, self._use_gpu, self.vectorize
        )

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
        inflight: dict[Any, tuple[int, Any, list[Task]]] = {}
        load = [0] * len(self.slots)
        results: dict[tuple[int, int], Outcome] = {}

        size_of = [max(1, self.client_sizes[t.client_id]) for t in pending]
        left = [sum(size_of)]  # examples still queued (a client's work is about its size)
        sizes = deque(size_of)
        # Vectorized actors: one chunk of the round's share each, one at a time.
        whole_round, in_flight = left[0], 1 if self.vectorize else IN_FLIGHT_PER_ACTOR

        def take_chunk() -> list[Task]:
            n = chunk_length(
                sizes,
                queued=whole_round if self.vectorize else left[0],
                actors=len(self.slots),
                chunks_per_actor=1 if self.vectorize else CHUNKS_PER_ACTOR,
            )
            left[0] -= sum(sizes.popleft() for _ in range(n))
            return [pending.popleft() for _ in range(n)]

        def dispatch(i: int) -> None:
            while pending and self.slots[i].alive and load[i] < in_flight:
                chunk = take_chunk()
                states = [self.store.get(t.client_id).to_bytes() for t in chunk]
                actor = self.slots[i].actor
                inflight[actor.run.remote(chunk, self._broadcast_id, ref, states)] = (
                    i,
                    actor,
                    chunk,
                )
                load[i] += 1

        for i in range(len(self.slots)):
            dispatch(i)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for done in ready:
                i, actor, chunk = inflight.pop(done)
                load[i] -= 1
                for task, outcome in zip(chunk, self._receive(i, actor, chunk, done), strict=True):
                    results[(task.client_id, task.round)] = outcome
            for i, slot in enumerate(self.slots):
                if not slot.alive and not slot.replaced_this_round:
                    self._replace(i)
                    # The dead actor's queued chunks still come back (as failures).
                    load[i] = sum(1 for j, _, _ in inflight.values() if j == i)
                dispatch(i)
            if not inflight:
                while pending:
                    t = pending.popleft()
                    sizes.popleft()
                    results[(t.client_id, t.round)] = ClientFailure(
                        client_id=t.client_id,
                        round=t.round,
                        error="no live Ray actor to run this client",
                    )
        return [results[(t.client_id, t.round)] for t in tasks]

    def _receive(self, i: int, actor: Any, chunk: list[Task], ref: Any) -> list[Outcome]:
        ray = self._ray
        try:
            answers = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            if self.slots[i].actor is actor:  # not a replacement started since
                self.slots[i].alive = False
            return _failures(chunk, f"Ray actor died: {_first_line(err)}")
        except ray.exceptions.RayError as err:
            return _failures(chunk, f"Ray task failed: {_first_line(err)}")
        outcomes: list[Outcome] = []
        for task, (out, state) in zip(chunk, answers, strict=True):
            if state is not None:
                self.store.put(task.client_id, ClientState.from_bytes(state), round=task.round)
            outcomes.append(out)
        return outcomes

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


def chunk_length(
    sizes: Sequence[int],
    *,
    queued: float,
    actors: int,
    chunks_per_actor: int = CHUNKS_PER_ACTOR,
) -> int:
    """How many of the queued clients (their sizes, largest first) the next chunk takes.

    At most ``queued / (chunks_per_actor * actors)`` examples, and at least one client:
    a large client travels alone, small ones in shrinking groups.
    """
    target = queued / (chunks_per_actor * actors)
    n, work = 1, sizes[0]
    while n < len(sizes) and work + sizes[n] <= target:
        work += sizes[n]
        n += 1
    return n


def _failures(chunk: Sequence[Task], error: str) -> list[Outcome]:
    return [ClientFailure(client_id=t.client_id, round=t.round, error=error) for t in chunk]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _cause_line(err: BaseException) -> str:
    """The line of a Ray error that names the exception underneath, else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return causes[-1] if causes else _first_line(err)
