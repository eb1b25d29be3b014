"""The user's model, loss and metrics, trained by flat-vector SGD: what every client
algorithm builds on.

One :class:`Learner` serves every client a process simulates. It owns a single model
whose parameters live in one flat buffer (:func:`fedloom.params.bind_flat_parameters`),
so switching to a new client costs one vector copy, and the optimizer step is a few
vector operations. A client algorithm shapes the step through a *gradient correction*
(FedProx's proximal term, SCAFFOLD's control variates, Ditto's pull toward the global
model) instead of writing its own loop.

Loss and metrics are the user's: any ``(outputs, targets) -> mean loss`` and any
``(outputs, targets) -> sum over the batch`` (so metrics average over examples).
Classification (cross-entropy, accuracy) is the default; regression passes
``loss=mse_loss, metrics={}``. A custom ``train_step(model, x, y) -> loss`` replaces the
forward-and-loss part of a step (the optimizer stays flat SGD).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedloom.data.base import ArrayDataset
from fedloom.params import FlatBinding, bind_flat_parameters
from fedloom.seeding import STRAGGLER, derive_rng

B = TypeVar("B")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | float]
TrainStep = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``correction(w, g)`` edits the flat gradient ``g`` in place before the step, at weights ``w``.
GradientCorrection = Callable[[torch.Tensor, torch.Tensor], None]


class OnDevice:
    """A tensor a gradient correction holds (an anchor, a shift, a mask), built on the
    CPU from NumPy and copied once to the device of the weights it meets: a correction
    is made before anyone knows where the learner trains."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor
        self._copies: dict[torch.device, torch.Tensor] = {tensor.device: tensor}

    def like(self, ref: torch.Tensor) -> torch.Tensor:
        """The tensor on ``ref``'s device (the tensor itself when it is already there)."""
        found = self._copies.get(ref.device)
        if found is None:
            found = self._copies[ref.device] = self._tensor.to(ref.device)
        return found


def correct_count(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of examples whose arg-max class is the target (summed, for accuracy)."""
    return (outputs.argmax(dim=1) == targets).sum()


#: The default metrics of a classifier: accuracy as a share of examples.
CLASSIFICATION_METRICS: dict[str, MetricFn] = {"accuracy": correct_count}


@dataclass(frozen=True)
class WorkSettings:
    """How much local work a client does: the ``client`` section's work keys."""

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 16
    straggler_fraction: float = 0.0


@dataclass(frozen=True)
class SGDSettings:
    """Local optimizer: ``torch.optim.SGD`` semantics on the flat vectors."""

    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class WorkPlan:
    """How much local work a client does this round.

    Li et al. 2020 (FedProx, Sec. 5.2) model systems heterogeneity by giving a fraction
    of the selected devices a random amount of work less than the E epochs the others
    do: uniformly 1..E-1 epochs. With E = 1 we draw 1..(steps per epoch - 1) steps
    instead, so a straggler still does strictly less than the full amount.
    """

    epochs: int
    max_steps: int | None
    straggler: bool

    def batches(self, epoch: Callable[[], Iterable[B]]) -> Iterator[B]:
        """The batches this plan trains on: ``epochs`` passes over ``epoch()``, or with
        ``max_steps`` exactly that many batches (passes repeat; the last is cut short).

        ``epoch`` is called at the start of each pass, so a shuffle it draws happens then.
        A pass that yields nothing ends the plan (a client without examples).
        Plain SGD and DP-SGD both train through this, so their plans mean the same work.
        """
        steps = passes = 0
        while (passes < self.epochs) if self.max_steps is None else (steps < self.max_steps):
            before = steps
            for batch in epoch():
                yield batch
                steps += 1
                if self.max_steps is not None and steps >= self.max_steps:
                    return
            if steps == before:  # no data: another pass would not get closer to max_steps
                return
            passes += 1

    def capped(self, budget: int, *, num_examples: int, batch_size: int) -> WorkPlan:
        """This plan cut to at most ``budget`` steps: the partial work of a device that
        would miss the round's deadline (a straggler), or this plan if it fits."""
        full = (
            self.max_steps
            if self.max_steps is not None
            else self.epochs * max(1, math.ceil(num_examples / batch_size))
        )
        if budget >= full:
            return self
        return WorkPlan(self.epochs, max(0, budget), straggler=True)


def plan_work(
    work: WorkSettings, *, seed: int, round: int, client_id: int, num_examples: int
) -> WorkPlan:
    """The round's plan for one client, with its straggler draw (see :class:`WorkPlan`)."""
    steps_per_epoch = max(1, math.ceil(num_examples / work.batch_size))
    full = WorkPlan(work.epochs, work.steps, straggler=False)
    if work.straggler_fraction <= 0.0:
        return full
    rng = derive_rng(seed, STRAGGLER, round, client_id)
    if rng.random() >= work.straggler_fraction:
        return full
    if work.steps is not None:
        if work.steps < 2:
            return full
        return WorkPlan(work.epochs, int(rng.integers(1, work.steps)), straggler=True)
    if work.epochs >= 2:
        return WorkPlan(int(rng.integers(1, work.epochs)), None, straggler=True)
    if steps_per_epoch >= 2:
        return WorkPlan(1, int(rng.integers(1, steps_per_epoch)), straggler=True)
    return full


@dataclass
class TrainOutcome:
    """Where local training ended: the weights, the mean loss, and the steps taken."""

    weights: np.ndarray
    train_loss: float
    steps: int


class Learner:
    """A model bound to flat buffers, with its loss, metrics and optional train step."""

    def __init__(
        self,
        model: nn.Module,
        *,
        loss: LossFn = F.cross_entropy,
        metrics: Mapping[str, MetricFn] | None = None,
        train_step: TrainStep | None = None,
        initial: np.ndarray | None = None,
    ) -> None:
        """``initial``: the initial vector, when it is not the model's weights now (a copy
        on another device keeps the original's, whatever the original was loaded with)."""
        self.binding: FlatBinding = bind_flat_parameters(model)
        self.model = self.binding.module
        self.loss = loss
        self.metrics = dict(CLASSIFICATION_METRICS if metrics is None else metrics)
        self.train_step = train_step
        self._start = torch.empty_like(self.binding.weights)
        self._momentum = torch.zeros_like(self.binding.weights)
        self._initial = self.binding.vector() if initial is None else initial.copy()

    @property
    def num_parameters(self) -> int:
        return self.binding.spec.size

    @property
    def device(self) -> torch.device:
        """Where the model's flat buffers live (and so where it trains and evaluates)."""
        return self.binding.weights.device

    def on_device(self, device: torch.device) -> Learner:
        """This learner on ``device``: itself if it is there, else a copy of the model
        (same loss, metrics, train step and initial vector) bound to flat buffers there.

        A copy rather than a move, because the server holds the same learner for its own
        evaluation and transforms, which stay on the CPU.
        """
        if torch.device(device) == self.device:
            return self
        return Learner(
            self.unbound_copy().to(device),
            loss=self.loss,
            metrics=self.metrics,
            train_step=self.train_step,
            initial=self._initial,
        )

    def initial_vector(self) -> np.ndarray:
        """The deterministic initial model (same in every process built from the seed)."""
        return self._initial.copy()

    def unbound_copy(self) -> nn.Module:
        """A deep copy of the model with its own ordinary parameters (not views into the
        flat buffers), for code that manages ``p.grad`` itself, such as Opacus."""
        clone = copy.deepcopy(self.model)
        for p in clone.parameters():
            p.data = p.data.clone()
            p.grad = None
        return clone

    def _batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.train_step is not None:
            return self.train_step(self.model, x, y)
        return self.loss(self.model(x), y)

    def train(
        self,
        *,
        start: np.ndarray,
        data: ArrayDataset,
        plan: WorkPlan,
        batch_size: int,
        sgd: SGDSettings,
        generator: torch.Generator,
        correction: GradientCorrection | None = None,
    ) -> TrainOutcome:
        """Local SGD from ``start`` following ``plan``; the model is left at the result."""
        w, g, w0, buf = self.binding.weights, self.binding.grads, self._start, self._momentum
        w0.copy_(torch.from_numpy(np.ascontiguousarray(start, dtype=np.float32)))
        w.copy_(w0)
        buf.zero_()
        device = w.device
        x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
        on_cpu = device.type == "cpu"
        if not on_cpu:  # the client's examples go over once; batches are gathered there
            x, y = x.to(device), y.to(device)
        n = len(data)

        def shuffled() -> Iterator[torch.Tensor]:
            # Drawn on the CPU from the client's generator: the same shuffles on any device.
            perm = torch.randperm(n, generator=generator)
            if not on_cpu:
                perm = perm.to(device)
            return (perm[s : s + batch_size] for s in range(0, n, batch_size))

        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        steps = 0
        for idx in plan.batches(shuffled):
            g.zero_()
            loss = self._batch_loss(x[idx], y[idx])
            loss.backward()
            with torch.no_grad():
                _sgd_step(w, g, buf, sgd, correction)
            loss_sum += loss.detach()
            steps += 1
        return TrainOutcome(w.cpu().numpy().copy(), float(loss_sum) / max(steps, 1), steps)

    def evaluate(
        self, vector: np.ndarray, dataset: ArrayDataset, batch_size: int = 512
    ) -> dict[str, float]:
        """Mean loss and every metric of ``vector`` on ``dataset`` (empty for no examples)."""
        if len(dataset) == 0:
            return {}
        self.binding.load(np.ascontiguousarray(vector, dtype=np.float32))
        self.model.eval()
        x, y = torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
        device = self.device
        sums = dict.fromkeys(["loss", *self.metrics], 0.0)
        with torch.no_grad():
            for s in range(0, len(dataset), batch_size):
                xb, target = x[s : s + batch_size], y[s : s + batch_size]
                if device.type != "cpu":
                    xb, target = xb.to(device), target.to(device)
                out = self.model(xb)
                sums["loss"] += float(self.loss(out, target)) * len(target)
                for name, fn in self.metrics.items():
                    sums[name] += float(fn(out, target))
        return {k: v / len(dataset) for k, v in sums.items()}


def _sgd_step(
    w: torch.Tensor,
    g: torch.Tensor,
    buf: torch.Tensor,
    sgd: SGDSettings,
    correction: GradientCorrection | None,
) -> None:
    """``torch.optim.SGD`` semantics (momentum, weight decay) on flat vectors; the
    algorithm's correction joins the gradient after weight decay, before momentum."""
    if sgd.weight_decay:
        g.add_(w, alpha=sgd.weight_decay)
    if correction is not None:
        correction(w, g)
    if sgd.momentum:
        buf.mul_(sgd.momentum).add_(g)
        w.sub_(buf, alpha=sgd.lr)
    else:
        w.sub_(g, alpha=sgd.lr)
