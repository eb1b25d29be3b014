"""The vectorized engine: every sampled client's local SGD at once, as batched tensor
operations over stacked parameters (``engine.name = "vectorized"``).

Why not one client after another: a small model's SGD step is a microsecond of
arithmetic under tens of microseconds of framework overhead (autograd, optimizer, Python).
Here the clients of a round advance in lock-step: step t multiplies every active client's
batch by its own weights in one ``bmm``, and the gradient is written out by hand, so a
round costs about (longest client's steps) × (a dozen tensor operations) instead of
(everyone's steps) × (a full autograd step). Clients are sorted by their number of steps,
so the clients still training at step t are a prefix of the stack (bucketing by step
count without copies); a client's last, shorter batch is padded and masked.

Same updates as the in-process engine (float tolerance): each client draws its shuffles
from the same per-(seed, round, client) generator through the same
:meth:`~fedloom.client.learner.WorkPlan.batches`, and the step has
``torch.optim.SGD`` semantics (weight decay, then the proximal pull, then momentum),
as :meth:`fedloom.client.learner.Learner.train`. Everything around training (the work
plan and stragglers, codecs, uploads held for secure aggregation, evaluation, protocol
stages) is the client runtime's own code.

What it trains, and what it refuses (with one line, at start-up, never a silent
fallback to one-by-one training, so a benchmark cannot measure something else):

* models: fedloom's ``MLP`` (the built-in ``logreg`` and ``mlp``) or an
  ``nn.Sequential`` of ``Flatten``, ``Linear`` and ``ReLU`` layers ending in a
  ``Linear``; with the learner's default cross-entropy loss and no ``train_step``;
* client algorithms that implement
  :class:`~fedloom.algorithms.vectorizable.VectorizableAlgorithm` (``sgd``: FedAvg,
  FedProx). SCAFFOLD's correction, DP-SGD, FedNova and the personalization algorithms
  are refused.

A built-in check compares the hand-written gradient with autograd's on the actual model
at start-up, so a model this engine misreads is refused rather than trained wrongly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedloom.algorithms.vectorizable import LocalTraining, VectorizableAlgorithm
from fedloom.client.device import resolve_device
from fedloom.client.learner import Learner, SGDSettings, TrainOutcome, WorkPlan
from fedloom.client.models import MLP
from fedloom.client.runtime import ClientRuntime, PreparedFit
from fedloom.client.safety import run_safely
from fedloom.client_store import ClientState, ClientStateStore
from fedloom.config import ConfigError
from fedloom.data.base import ArrayDataset
from fedloom.engine.inprocess import InProcessExecutor
from fedloom.messages import Broadcast, ClientFailure, FitResult, FitTask
from fedloom.seeding import SHUFFLE, torch_generator

log = logging.getLogger("fedloom.engine")


#: How the refusals name the setting that asked for vectorized training, and the way out.
VECTORIZED_ENGINE = ("engine.name = 'vectorized'", "use engine.name = 'inprocess'")


def linear_layers(
    model: nn.Module, *, setting: tuple[str, str] = VECTORIZED_ENGINE
) -> list[nn.Linear]:
    """The model's Linear layers, if it is a ReLU network this engine can train.

    Raises ConfigError naming what is not: the one line the user sees (``setting``: the
    option that asked for vectorized training and what to set instead).
    """
    asked, fix = setting
    body = model.net if isinstance(model, MLP) else model
    if not isinstance(body, nn.Sequential):
        raise ConfigError(
            f"{asked} trains fedloom's logreg/mlp models or an "
            f"nn.Sequential of Flatten, Linear and ReLU layers, not {type(model).__name__}; "
            f"{fix}"
        )
    layers = list(body)
    while layers and isinstance(layers[0], nn.Flatten):
        layers.pop(0)
    linears: list[nn.Linear] = []
    expect_linear = True
    for layer in layers:
        ok = isinstance(layer, nn.Linear) if expect_linear else isinstance(layer, nn.ReLU)
        if not ok:
            raise ConfigError(
                f"{asked} cannot train a model with a "
                f"{type(layer).__name__} layer here (it trains alternating Linear and ReLU "
                f"layers after an optional Flatten); {fix}"
            )
        if isinstance(layer, nn.Linear):
            linears.append(layer)
        expect_linear = not expect_linear
    if not linears or expect_linear:  # empty, or ends in a ReLU
        raise ConfigError(f"{asked} needs a model that ends in a Linear layer; {fix}")
    return linears


def check_vectorizable(
    learner: Learner, runtime: ClientRuntime, *, setting: tuple[str, str] = VECTORIZED_ENGINE
) -> list[nn.Linear]:
    """Everything the vectorized engine needs, or one ConfigError saying what is not met."""
    asked, fix = setting
    if not isinstance(runtime.algorithm, VectorizableAlgorithm):
        raise ConfigError(
            f"{asked} cannot train the client algorithm "
            f"{type(runtime.algorithm).__name__} (its fit is not one plain local SGD run: "
            f"only sgd, i.e. FedAvg/FedProx, is vectorized); {fix}"
        )
    if learner.train_step is not None:
        raise ConfigError(f"{asked} cannot run a custom train_step; {fix}")
    if learner.loss is not F.cross_entropy:
        raise ConfigError(
            f"{asked} trains with the default cross-entropy loss only; {fix} for another loss"
        )
    if any(True for _ in learner.model.buffers()):
        raise ConfigError(f"{asked} cannot train a model with buffers (e.g. BatchNorm); {fix}")
    linears = linear_layers(learner.model, setting=setting)
    params = [p for layer in linears for p in (layer.weight, layer.bias)]
    if any(p is None for p in params) or len(params) != len(list(learner.model.parameters())):
        raise ConfigError(
            f"{asked} needs every Linear layer to have a bias and no other parameters; {fix}"
        )
    return linears


#: Upper bound on the training batches one call gathers (inputs, weighted targets,
#: weights); a round whose clients need more is trained in several chunks.
MAX_BATCH_BYTES = 256 << 20


@dataclass(frozen=True)
class TrainingJob:
    """One client's local training: its data, plan, shuffle generator and request."""

    data: ArrayDataset
    plan: WorkPlan
    generator: torch.Generator
    training: LocalTraining


class BatchedReLUNet:
    """Local SGD of many clients of one ReLU network at once (see the module docstring)."""

    def __init__(
        self,
        linears: Sequence[nn.Linear],
        *,
        batch_size: int,
        sgd: SGDSettings,
        device: torch.device,
    ) -> None:
        self.shapes = [(layer.out_features, layer.in_features) for layer in linears]
        self.in_features = self.shapes[0][1]
        self.classes = self.shapes[-1][0]
        self.batch_size = batch_size
        self.sgd = sgd
        self.device = device
        #: (start, stop) of each layer's weight and bias in the flat vector (spec order).
        self.slices: list[tuple[tuple[int, int], tuple[int, int]]] = []
        at = 0
        for out_f, in_f in self.shapes:
            w = (at, at + out_f * in_f)
            b = (w[1], w[1] + out_f)
            self.slices.append((w, b))
            at = b[1]
        self.size = at

    # ------------------------------------------------------------------ batches
    def _plan_batches(self, job: TrainingJob) -> tuple[np.ndarray, np.ndarray]:
        """Example indices of every step (concatenated) and each step's batch size,
        drawn exactly as :meth:`Learner.train` draws them."""
        n, bs, gen = len(job.data), self.batch_size, job.generator

        def shuffled() -> list[np.ndarray]:
            perm = torch.randperm(n, generator=gen).numpy()
            return [perm[s : s + bs] for s in range(0, n, bs)]

        batches = list(job.plan.batches(shuffled))
        if not batches:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        sizes = np.fromiter((len(b) for b in batches), dtype=np.int64, count=len(batches))
        return np.concatenate(batches), sizes

    # ------------------------------------------------------------------ training
    def train(self, jobs: Sequence[TrainingJob]) -> list[TrainOutcome]:
        """Train every job; jobs with different proximal μ train in separate groups."""
        out: list[TrainOutcome | None] = [None] * len(jobs)
        by_mu: dict[float, list[int]] = {}
        for i, job in enumerate(jobs):
            by_mu.setdefault(float(job.training.proximal_mu), []).append(i)
        for mu, members in by_mu.items():
            for chunk in self._chunks(jobs, members):
                group = self._train_group([jobs[i] for i in chunk], mu)
                for i, outcome in zip(chunk, group, strict=True):
                    out[i] = outcome
        return [o for o in out if o is not None]

    def _chunks(self, jobs: Sequence[TrainingJob], members: list[int]) -> list[list[int]]:
        """Split a group so that no chunk's gathered batches pass ``MAX_BATCH_BYTES``
        (every example a round trains on is gathered up front)."""
        per_example = 4 * (self.in_features + self.classes + 1)
        chunks: list[list[int]] = [[]]
        used = 0
        for i in members:
            plan, n = jobs[i].plan, len(jobs[i].data)
            examples = (
                n * plan.epochs if plan.max_steps is None else plan.max_steps * self.batch_size
            )
            cost = examples * per_example
            if chunks[-1] and used + cost > MAX_BATCH_BYTES:
                chunks.append([])
                used = 0
            chunks[-1].append(i)
            used += cost
        return chunks

    def _train_group(self, jobs: Sequence[TrainingJob], mu: float) -> list[TrainOutcome]:
        bs, dev, sgd = self.batch_size, self.device, self.sgd
        plans = [self._plan_batches(job) for job in jobs]
        steps = np.array([len(sizes) for _, sizes in plans], dtype=np.int64)
        order = np.argsort(-steps, kind="stable")  # rank r trains jobs[order[r]]
        k = len(jobs)
        horizon = int(steps.max()) if k else 0
        # active[t] = clients still training at step t: a prefix of the sorted stack.
        active = (steps[order][None, :] > np.arange(horizon)[:, None]).sum(axis=1)
        base = np.concatenate([[0], np.cumsum(active)])[:-1] * bs  # slot of (t, rank 0)
        slots = int(active.sum()) * bs

        positions, xs, ys, example_w = [], [], [], []
        for rank, j in enumerate(order.tolist()):
            flat, sizes = plans[j]
            if not len(sizes):
                continue
            step_of = np.repeat(np.arange(len(sizes)), sizes)
            first = np.repeat(np.cumsum(sizes) - sizes, sizes)
            positions.append(base[step_of] + rank * bs + (np.arange(len(flat)) - first))
            data = jobs[j].data
            xs.append(np.asarray(data.x[flat], dtype=np.float32).reshape(len(flat), -1))
            ys.append(np.asarray(data.y[flat], dtype=np.int64))
            example_w.append(np.repeat(1.0 / sizes, sizes).astype(np.float32))
        x_all = torch.zeros(slots, self.in_features, dtype=torch.float32)
        # onehot_w[s, c] = -w_s if y_s = c: the target part of the weighted CE gradient.
        target_w = torch.zeros(slots, self.classes, dtype=torch.float32)
        w_all = torch.zeros(slots, 1, dtype=torch.float32)
        if positions:
            pos = torch.from_numpy(np.concatenate(positions))
            w_flat = torch.from_numpy(np.concatenate(example_w))
            x_all[pos] = torch.from_numpy(np.concatenate(xs))
            target_w[pos, torch.from_numpy(np.concatenate(ys))] = -w_flat
            w_all[pos, 0] = w_flat
        x_all, target_w, w_all = x_all.to(dev), target_w.to(dev), w_all.to(dev)

        starts = np.stack([jobs[j].training.start for j in order.tolist()])
        flat_w = torch.from_numpy(np.ascontiguousarray(starts, dtype=np.float32)).to(dev)
        params = [
            (flat_w[:, a:b].unflatten(1, shape), flat_w[:, c:d])
            for shape, ((a, b), (c, d)) in zip(self.shapes, self.slices, strict=True)
        ]
        anchor = flat_w.clone() if mu else None
        anchors = (
            [
                (anchor[:, a:b].unflatten(1, shape), anchor[:, c:d])
                for shape, ((a, b), (c, d)) in zip(self.shapes, self.slices, strict=True)
            ]
            if anchor is not None
            else []
        )
        momentum = torch.zeros_like(flat_w) if sgd.momentum else None
        buffers = (
            [
                (momentum[:, a:b].unflatten(1, shape), momentum[:, c:d])
                for shape, ((a, b), (c, d)) in zip(self.shapes, self.slices, strict=True)
            ]
            if momentum is not None
            else []
        )
        loss_sum = torch.zeros(k, dtype=torch.float64, device=dev)
        last = len(self.shapes) - 1
        with torch.no_grad():
            for t in range(horizon):
                m = int(active[t])
                lo, hi = int(base[t]), int(base[t]) + m * bs
                x = x_all[lo:hi].view(m, bs, self.in_features)
                # Forward, keeping each layer's input (ReLU outputs) for the backward.
                inputs = [x]
                h = x
                for i, (w, b) in enumerate(params):
                    h = torch.baddbmm(b[:m].unsqueeze(1), h, w[:m].transpose(1, 2))
                    if i < last:
                        h = torch.relu(h)
                        inputs.append(h)
                logp = torch.log_softmax(h, dim=2)
                tw = target_w[lo:hi].view(m, bs, self.classes)
                loss_sum[:m] += (logp * tw).sum(dim=(1, 2))  # = mean CE of the batch
                # d(mean CE)/d logits = w * softmax - w * onehot
                d = torch.addcmul(tw, logp.exp(), w_all[lo:hi].view(m, bs, 1))
                grads: list[tuple[torch.Tensor, torch.Tensor]] = []
                for i in range(last, -1, -1):
                    w = params[i][0]
                    a_in = inputs[i]
                    grads.append((torch.bmm(d.transpose(1, 2), a_in), d.sum(dim=1)))
                    if i > 0:
                        d = torch.bmm(d, w[:m]) * (a_in > 0)
                grads.reverse()
                for i, (gw, gb) in enumerate(grads):
                    for j, g in enumerate((gw, gb)):
                        p = params[i][j][:m]
                        if sgd.weight_decay:
                            g.add_(p, alpha=sgd.weight_decay)
                        if anchors:
                            g.add_(p, alpha=mu).sub_(anchors[i][j][:m], alpha=mu)
                        if buffers:
                            buf = buffers[i][j][:m]
                            buf.mul_(sgd.momentum).add_(g)
                            p.sub_(buf, alpha=sgd.lr)
                        else:
                            p.sub_(g, alpha=sgd.lr)
        weights = flat_w.cpu().numpy()
        losses = loss_sum.cpu().numpy()
        out: list[TrainOutcome | None] = [None] * k
        for rank, j in enumerate(order.tolist()):
            n_steps = int(steps[j])
            out[j] = TrainOutcome(
                weights[rank].copy(), float(losses[rank]) / max(n_steps, 1), n_steps
            )
        return [o for o in out if o is not None]


def self_check(
    linears: Sequence[nn.Linear], learner: Learner, *, setting: tuple[str, str] = VECTORIZED_ENGINE
) -> None:
    """Two hand-written SGD steps (momentum, weight decay, proximal pull, a short last
    batch) against the learner's autograd steps on random data: a model the engine would
    misread is refused, not trained wrongly."""
    rng = np.random.default_rng(0)
    classes = linears[-1].out_features
    data = ArrayDataset(
        rng.normal(size=(5, linears[0].in_features)).astype(np.float32),
        rng.integers(0, classes, size=5).astype(np.int64),
    )
    start = learner.initial_vector()
    plan = WorkPlan(1, None, straggler=False)
    sgd = SGDSettings(lr=0.1, momentum=0.5, weight_decay=0.01)
    mu = 0.1
    trainer = BatchedReLUNet(linears, batch_size=3, sgd=sgd, device=torch.device("cpu"))
    job = TrainingJob(
        data, plan, torch.Generator().manual_seed(1), LocalTraining(start=start, proximal_mu=mu)
    )
    ours = trainer.train([job])[0].weights
    anchor = torch.from_numpy(start.copy())

    def proximal(w: torch.Tensor, g: torch.Tensor) -> None:
        g.add_(w, alpha=mu).sub_(anchor, alpha=mu)

    reference = learner.train(
        start=start,
        data=data,
        plan=plan,
        batch_size=3,
        sgd=sgd,
        generator=torch.Generator().manual_seed(1),
        correction=proximal,
    ).weights
    if not np.allclose(ours, reference, atol=1e-5, rtol=1e-4):
        raise ConfigError(
            f"{setting[0]} does not reproduce this model's gradient "
            f"(max difference {np.max(np.abs(ours - reference)):.3g}); {setting[1]}"
        )


def vectorizable(
    runtime: ClientRuntime, *, setting: tuple[str, str] = VECTORIZED_ENGINE
) -> list[nn.Linear]:
    """The model's Linear layers once the runtime passed every check and the gradient
    self-check; else one ConfigError (so a caller can refuse before it starts anything)."""
    linears = check_vectorizable(runtime.learner, runtime, setting=setting)
    self_check(linears, runtime.learner, setting=setting)
    return linears


class BatchFit:
    """Prepare every task, train them all at once, complete each: one vectorized fit of
    a batch of clients, with each client's failure its own.

    The vectorized engine runs a round through it; a Ray actor (``engine.vectorize``)
    runs the chunk of clients it receives through it, so both train exactly alike.
    """

    def __init__(
        self,
        runtime: ClientRuntime,
        *,
        device: torch.device,
        setting: tuple[str, str] = VECTORIZED_ENGINE,
    ) -> None:
        self.runtime = runtime
        self.trainer = BatchedReLUNet(
            vectorizable(runtime, setting=setting),
            batch_size=runtime.work.batch_size,
            sgd=runtime.sgd,
            device=device,
        )
        self.algorithm: VectorizableAlgorithm = runtime.algorithm  # type: ignore[assignment]

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast, states: Sequence[ClientState]
    ) -> list[tuple[FitResult | ClientFailure, ClientState | None]]:
        """Each task's outcome, and the client state to keep (None: a failed or dropped
        fit leaves the stored state as it was). ``states`` are updated in place."""
        out: dict[int, tuple[FitResult | ClientFailure, ClientState | None]] = {}
        ready: list[tuple[int, PreparedFit, LocalTraining]] = []
        for i, (task, state) in enumerate(zip(tasks, states, strict=True)):
            prepared = run_safely(_bind(self.runtime.prepare_fit, task, broadcast, state), task)
            if not isinstance(prepared, PreparedFit):
                out[i] = (prepared, None)
                continue
            training = run_safely(_bind(self.algorithm.local_training, prepared.ctx), task)
            if isinstance(training, ClientFailure):
                out[i] = (training, None)
                continue
            ready.append((i, prepared, training))
        jobs = [
            TrainingJob(
                p.ctx.data.train,
                p.ctx.plan,  # type: ignore[arg-type]
                torch_generator(self.runtime.seed, SHUFFLE, p.task.round, p.task.client_id),
                training,
            )
            for _, p, training in ready
        ]
        try:
            outcomes = self.trainer.train(jobs) if jobs else []
        except Exception as err:  # the batch failed: every client in it failed
            for i, p, _ in ready:
                out[i] = (run_safely(_raise(err), p.task), None)
            return [out[i] for i in range(len(tasks))]
        for (i, p, training), outcome in zip(ready, outcomes, strict=True):
            result = run_safely(_bind(self._complete, p, training, outcome), p.task)
            out[i] = (result, p.ctx.state if isinstance(result, FitResult) else None)
        return [out[i] for i in range(len(tasks))]

    def _complete(
        self, prepared: PreparedFit, training: LocalTraining, outcome: TrainOutcome
    ) -> FitResult:
        update = self.algorithm.finish(prepared.ctx, training, outcome)
        return self.runtime.complete_fit(prepared, update)


class VectorizedExecutor(InProcessExecutor):
    """The in-process engine with every fit task of a round trained at once."""

    def __init__(
        self,
        runtime: ClientRuntime,
        store: ClientStateStore,
        *,
        device: str = "cpu",
    ) -> None:
        super().__init__(runtime, store)
        self.batch = BatchFit(runtime, device=resolve_device(device))
        self.trainer = self.batch.trainer
        log.info("vectorized engine: training on %s", self.trainer.device)

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast
    ) -> list[FitResult | ClientFailure]:
        states = [self.store.get(task.client_id) for task in tasks]
        out: list[FitResult | ClientFailure] = []
        for task, (outcome, state) in zip(
            tasks, self.batch.fit(tasks, broadcast, states), strict=True
        ):
            if state is not None:
                self.store.put(task.client_id, state, round=task.round)
            out.append(outcome)
        return out


def _bind(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: fn(*args)


def _raise(err: Exception) -> Callable[[], Any]:
    def fail() -> Any:
        raise err

    return fail
