"""Local training on a client: SGD with momentum and weight decay, optionally FedProx.

One :class:`LocalTrainer` serves every client a process simulates. It owns a single
model whose parameters live in one flat buffer (:func:`fedloom.params.bind_flat_parameters`),
so switching to a new client costs one vector copy, and the optimizer step is a few
vector operations. Each client's shuffling and straggler draw come from generators
derived from (run seed, round, client id), so results do not depend on which process
runs the client or in what order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from fedloom.client.dpsgd import LocalDPSGD
from fedloom.client.models import build_model
from fedloom.config import ClientConfig, RunConfig
from fedloom.data.base import ArrayDataset, ClientData, FederatedDataset
from fedloom.messages import EvalResult, EvalTask, FitResult, FitTask
from fedloom.params import FlatBinding, bind_flat_parameters
from fedloom.privacy.central import clip_update
from fedloom.seeding import SHUFFLE, STRAGGLER, derive_rng, torch_generator

B = TypeVar("B")


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


def plan_work(cfg: ClientConfig, seed: int, task: FitTask, num_examples: int) -> WorkPlan:
    steps_per_epoch = max(1, math.ceil(num_examples / cfg.batch_size))
    full = WorkPlan(cfg.epochs, cfg.steps, straggler=False)
    if cfg.straggler_fraction <= 0.0:
        return full
    rng = derive_rng(seed, STRAGGLER, task.round, task.client_id)
    if rng.random() >= cfg.straggler_fraction:
        return full
    if cfg.steps is not None:
        if cfg.steps < 2:
            return full
        return WorkPlan(cfg.epochs, int(rng.integers(1, cfg.steps)), straggler=True)
    if cfg.epochs >= 2:
        return WorkPlan(int(rng.integers(1, cfg.epochs)), None, straggler=True)
    if steps_per_epoch >= 2:
        return WorkPlan(1, int(rng.integers(1, steps_per_epoch)), straggler=True)
    return full


class LocalTrainer:
    """Trains and evaluates the configured model on any client's data, in place."""

    def __init__(self, cfg: RunConfig, data: FederatedDataset) -> None:
        self.cfg = cfg
        self.data = data
        #: Set when this process holds only its own data (a deployment client).
        self.own_data: ClientData | None = None
        #: DP-SGD through Opacus when ``privacy.local_dp`` is on; it trains its own plain
        #: (unbound) copy of the model and keeps every client's privacy ledger.
        self.local_dp: LocalDPSGD | None = None
        if cfg.privacy.local_dp:
            self.local_dp = LocalDPSGD(cfg, build_model(cfg.model, data, cfg.seed))
        self.binding: FlatBinding = bind_flat_parameters(build_model(cfg.model, data, cfg.seed))
        self.model = self.binding.module
        self._global = torch.empty_like(self.binding.weights)
        self._momentum = torch.zeros_like(self.binding.weights)

    @property
    def num_parameters(self) -> int:
        return self.binding.spec.size

    def client_data(self, client_id: int) -> ClientData:
        """The data of client ``client_id``: its partition of the run's data set.

        A deployment client that reads its own files serves its single data set for
        whatever id the server assigned it.
        """
        if self.own_data is not None:
            return self.own_data
        return self.data.clients[client_id]

    def client_state(self, client_id: int | None = None) -> dict[str, Any]:
        """JSON-able state kept across rounds for every client (or one): ``{part: {id: …}}``.

        Today the only part is local DP's ledger (``"local_dp"``: client id → its
        (σ, q, steps) history). The in-process engine checkpoints all of it; the pool
        engine keeps it in its parent and ships one client's share with each task, so a
        client's state does not depend on which worker trains it.
        """
        if self.local_dp is None:
            return {}
        return {"local_dp": self.local_dp.ledger(client_id)}

    def restore_client_state(self, state: dict[str, Any]) -> None:
        """Replace the state with what :meth:`client_state` returned (absent: fresh)."""
        if self.local_dp is not None:
            self.local_dp.restore_ledger(state.get("local_dp", {}))

    def initial_vector(self) -> np.ndarray:
        """The deterministic initial global model (same in every process)."""
        return self.binding.vector()

    def fit(self, task: FitTask, global_vector: np.ndarray) -> FitResult:
        """Run local SGD from ``global_vector``; return ``delta = w_local - w_global``.

        With ``privacy.local_dp`` the local training is DP-SGD (:mod:`fedloom.client.dpsgd`)
        and the metrics carry the client's cumulative ``local_epsilon`` at ``local_delta``;
        central-DP clipping, when also on, applies to the result afterwards.
        """
        train = self.client_data(task.client_id).train
        cc = self.cfg.client
        plan = plan_work(cc, self.cfg.seed, task, len(train))
        if plan.straggler and task.drop_stragglers:
            return FitResult(task.client_id, task.round, None, len(train), straggler=True)

        if self.local_dp is not None:
            delta, metrics = self.local_dp.fit(task, train, global_vector, plan)
        else:
            delta, metrics = self._fit_sgd(task, train, global_vector, plan)
        if self.cfg.privacy.mechanism == "central":
            delta = self._encode_private(delta, task, metrics)
        return FitResult(
            task.client_id, task.round, delta, len(train), straggler=plan.straggler, metrics=metrics
        )

    def _fit_sgd(
        self, task: FitTask, train: ArrayDataset, global_vector: np.ndarray, plan: WorkPlan
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Plain local SGD (momentum, weight decay, FedProx) on the flat buffers."""
        cc = self.cfg.client
        w, g, w0, buf = self.binding.weights, self.binding.grads, self._global, self._momentum
        w0.copy_(torch.from_numpy(global_vector))
        w.copy_(w0)
        buf.zero_()
        x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
        gen = torch_generator(self.cfg.seed, SHUFFLE, task.round, task.client_id)
        n, bs = len(train), cc.batch_size

        def shuffled() -> Iterator[torch.Tensor]:
            perm = torch.randperm(n, generator=gen)
            return (perm[start : start + bs] for start in range(0, n, bs))

        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        steps = 0
        for idx in plan.batches(shuffled):
            g.zero_()
            loss = F.cross_entropy(self.model(x[idx]), y[idx])
            loss.backward()
            with torch.no_grad():
                self._sgd_step(w, g, w0, buf, cc)
            loss_sum += loss.detach()
            steps += 1
        delta = (w - w0).numpy().copy()
        metrics = {"train_loss": float(loss_sum) / max(steps, 1), "steps": float(steps)}
        return delta, metrics

    def _encode_private(
        self, delta: np.ndarray, task: FitTask, metrics: dict[str, float]
    ) -> np.ndarray:
        """Clip the update before it leaves the client (central DP, McMahan et al. 2018).

        Clipping belongs to the client's update encoding, not to the server: the server
        then only ever sees bounded updates, and the step composes with secure
        aggregation, where the server sees only the sum. The metrics carry the clipped-count
        bit b = 1[‖Δ‖ ≤ C] that adaptive clipping aggregates with noise (Andrew et al.
        2021), and the pre-clip norm as a simulation diagnostic the server does not use.
        """
        privacy = self.cfg.privacy
        clip_norm = task.clip_norm
        if clip_norm is None:
            if privacy.adaptive_clipping:
                raise RuntimeError(
                    "adaptive clipping needs the round's clipping norm in the task, and this "
                    "engine did not send one"
                )
            clip_norm = privacy.clipping_norm
        clipped = clip_update(delta, clip_norm)
        metrics["update_norm"] = clipped.norm
        metrics["below_clip"] = 1.0 if clipped.below_clip else 0.0
        return clipped.delta

    @staticmethod
    def _sgd_step(
        w: torch.Tensor, g: torch.Tensor, w0: torch.Tensor, buf: torch.Tensor, cc: ClientConfig
    ) -> None:
        """``torch.optim.SGD`` semantics on flat vectors, plus the FedProx proximal term.

        The proximal gradient is μ(w - w_t) from Li et al. 2020, Eq. (2):
        h_k(w; w_t) = F_k(w) + μ/2 ||w - w_t||².
        """
        if cc.weight_decay:
            g.add_(w, alpha=cc.weight_decay)
        if cc.proximal_mu:
            g.add_(w, alpha=cc.proximal_mu).sub_(w0, alpha=cc.proximal_mu)
        if cc.momentum:
            buf.mul_(cc.momentum).add_(g)
            w.sub_(buf, alpha=cc.lr)
        else:
            w.sub_(g, alpha=cc.lr)

    def evaluate(
        self, dataset: ArrayDataset, vector: np.ndarray, batch_size: int = 512
    ) -> tuple[float, float]:
        """Mean cross-entropy loss and accuracy of ``vector`` on ``dataset``."""
        self.binding.load(vector)
        self.model.eval()
        x, y = torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                logits = self.model(x[start : start + batch_size])
                target = y[start : start + batch_size]
                loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
                correct += int((logits.argmax(dim=1) == target).sum())
        n = max(len(dataset), 1)
        return loss_sum / n, correct / n

    def evaluate_client(self, task: EvalTask, global_vector: np.ndarray) -> EvalResult:
        test = self.client_data(task.client_id).test
        if test is None or len(test) == 0:
            return EvalResult(task.client_id, task.round, 0, 0.0, 0.0)
        loss, acc = self.evaluate(test, global_vector, self.cfg.eval.batch_size)
        return EvalResult(task.client_id, task.round, len(test), loss, acc)
