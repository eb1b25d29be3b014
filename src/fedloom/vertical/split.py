"""Split learning between feature parties and a label party (SplitNN).

Vepakomma, Gupta, Swedish and Raskar 2018 ("Split learning for health", Section 2,
the "vertically partitioned data" configuration): feature party k runs a bottom model
on its own columns, h_k = f_k(x_k; θ_k), and sends the activations h_k up; the label
party runs the top model on their concatenation, ŷ = g([h_1, …, h_K]; φ), computes the
loss, updates φ and sends each party ∂L/∂h_k back down, from which the party finishes
back-propagation, ∂L/∂θ_k = (∂h_k/∂θ_k)ᵀ ∂L/∂h_k (the chain rule), and updates θ_k.
Without a defense these are exactly the gradients of the same network trained centrally
on the concatenated columns (``tests/test_vertical_split.py`` checks it). No raw
features and no labels cross; activations and gradients do.

Each party keeps its own model and optimizer; the :class:`SplitTrainer` only moves
tensors between them (counting the bytes) in the order of a shared batch schedule.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from fedloom.config import VerticalOptimizerConfig
from fedloom.seeding import derive_rng
from fedloom.vertical.leakage import cosine_attack_auc, defend, norm_attack_auc

#: Purpose tags of this package's seeded draws.
VERTICAL_SHUFFLE = 132
VERTICAL_INIT = 133
VERTICAL_DEFENSE = 134


def mlp(sizes: Sequence[int], *, relu_out: bool) -> nn.Sequential:
    """Linear layers of ``sizes`` with ReLU between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or relu_out:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_optimizer(
    params: Iterator[nn.Parameter], cfg: VerticalOptimizerConfig
) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class BatchSchedule:
    """The batches every party trains on, in order: a stream of seeded epoch permutations.

    The label party draws it and sends each step's row indices down with the step; a
    round takes ``steps`` batches from the stream, or the rest of the current epoch.
    """

    def __init__(self, n: int, *, batch_size: int, shuffle: bool, seed: int) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.epoch = 0
        self._queue: list[np.ndarray] = []

    def _refill(self) -> None:
        order = (
            derive_rng(self.seed, VERTICAL_SHUFFLE, self.epoch).permutation(self.n)
            if self.shuffle
            else np.arange(self.n)
        )
        self.epoch += 1
        self._queue = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]

    def round(self, steps: int | None) -> list[np.ndarray]:
        if steps is None:
            if not self._queue:
                self._refill()
            out, self._queue = self._queue, []
            return out
        out = []
        for _ in range(steps):
            if not self._queue:
                self._refill()
            out.append(self._queue.pop(0))
        return out


class BottomHalf(Protocol):
    """What the trainer asks of a feature party: a :class:`FeatureParty` here, or its
    proxy at the label party in a deployment (``fedloom.vertical.party``)."""

    def forward(self, rows: np.ndarray) -> torch.Tensor: ...

    def backward(self, grad: torch.Tensor) -> None: ...

    def embed(self, rows: np.ndarray) -> torch.Tensor: ...


class FeatureParty:
    """Holds its columns (aligned rows) and its bottom model; never sees a label."""

    def __init__(
        self, x: np.ndarray, bottom: nn.Module, optimizer: VerticalOptimizerConfig
    ) -> None:
        self.x = torch.as_tensor(x, dtype=torch.float32)
        self.bottom = bottom
        self.optimizer = make_optimizer(bottom.parameters(), optimizer)
        self._out: torch.Tensor | None = None

    def forward(self, rows: np.ndarray) -> torch.Tensor:
        """h_k for ``rows``; the graph is kept for :meth:`backward`. Sent: a detached copy."""
        self.bottom.train()
        self._out = self.bottom(self.x[torch.as_tensor(rows)])
        return self._out.detach()

    def backward(self, grad: torch.Tensor) -> None:
        """Finish back-propagation from the label party's ∂L/∂h_k, then step."""
        if self._out is None or grad.shape != self._out.shape:
            raise RuntimeError("a gradient arrived for activations this party did not send")
        self.optimizer.zero_grad()
        self._out.backward(grad)
        self.optimizer.step()
        self._out = None

    @torch.no_grad()
    def embed(self, rows: np.ndarray) -> torch.Tensor:
        self.bottom.eval()
        return self.bottom(self.x[torch.as_tensor(rows)])


class LabelParty:
    """Holds the labels and the top model; turns activations into loss and gradients."""

    def __init__(
        self,
        y: np.ndarray,
        top: nn.Module,
        optimizer: VerticalOptimizerConfig,
        *,
        defense: str = "none",
        noise_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.y = torch.as_tensor(y, dtype=torch.int64)
        self.top = top
        self.optimizer = make_optimizer(top.parameters(), optimizer)
        self.defense, self.noise_scale = defense, noise_scale
        self.generator = torch.Generator().manual_seed(
            int(derive_rng(seed, VERTICAL_DEFENSE).integers(2**62))
        )
        #: The undefended gradients of the last step, for the leakage measurement.
        self.last_clean: list[torch.Tensor] = []

    def step(
        self, rows: np.ndarray, activations: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], float]:
        """One training step of the top model; returns ∂L/∂h_k per party (defended)."""
        self.top.train()
        hs = [h.detach().requires_grad_(True) for h in activations]
        logits = self.top(torch.cat(hs, dim=1))
        loss = nn.functional.cross_entropy(logits, self.y[torch.as_tensor(rows)])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        clean = [h.grad for h in hs if h.grad is not None]
        self.last_clean = clean
        sent = [
            defend(g, defense=self.defense, scale=self.noise_scale, generator=self.generator)
            for g in clean
        ]
        return sent, float(loss.item())

    @torch.no_grad()
    def evaluate(self, rows: np.ndarray, activations: Sequence[torch.Tensor]) -> dict[str, float]:
        self.top.eval()
        logits = self.top(torch.cat(list(activations), dim=1))
        y = self.y[torch.as_tensor(rows)]
        return {
            "loss": float(nn.functional.cross_entropy(logits, y).item()),
            "accuracy": float((logits.argmax(1) == y).float().mean().item()),
        }


class SplitTrainer:
    """Moves activations up and gradients down in the schedule's order; counts bytes.

    In simulation the parties are objects in this process; what crosses between them
    is only what a wire would carry (row indices, activations, gradients).
    """

    def __init__(
        self,
        label: LabelParty,
        features: Sequence[BottomHalf],
        *,
        train_rows: np.ndarray,
        test_rows: np.ndarray,
        schedule: BatchSchedule,
        steps_per_round: int | None,
    ) -> None:
        self.label, self.features = label, list(features)
        self.train_rows, self.test_rows = train_rows, test_rows
        self.schedule, self.steps_per_round = schedule, steps_per_round
        y = label.y[torch.as_tensor(train_rows)].numpy()
        counts = np.bincount(y, minlength=2)
        #: The minority class is the attack's "positive" (Li et al.: the rare class).
        self.positive = int(np.argmin(counts)) if len(counts) == 2 else None

    def run_round(self) -> dict[str, float | int]:
        bytes_up = bytes_down = steps = 0
        losses: list[float] = []
        norm_aucs: list[float] = []
        cos_aucs: list[float] = []
        for batch in self.schedule.round(self.steps_per_round):
            rows = self.train_rows[batch]
            acts = self.forward(rows)
            bytes_down += 4 * len(rows) * len(acts)  # the step's row indices
            bytes_up += sum(4 * a.numel() for a in acts)
            grads, loss = self.label.step(rows, acts)
            losses.append(loss)
            bytes_down += sum(4 * g.numel() for g in grads)
            self.backward(grads)
            steps += 1
            if self.positive is not None:
                # The attack runs on what feature party 0 received (defended or not).
                pos = (self.label.y[torch.as_tensor(rows)] == self.positive).numpy()
                g0 = grads[0].detach().numpy()
                norm_aucs.append(norm_attack_auc(g0, pos))
                cos_aucs.append(cosine_attack_auc(g0, pos))
        out: dict[str, float | int] = {
            "train_loss": float(np.mean(losses)),
            "steps": steps,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
        }
        if self.positive is not None:
            out["leak_norm_auc"] = _nanmean(norm_aucs)
            out["leak_cosine_auc"] = _nanmean(cos_aucs)
        return out

    def evaluate(self, rows: np.ndarray | None = None) -> dict[str, float]:
        rows = self.test_rows if rows is None else rows
        return self.label.evaluate(rows, self.embed(rows))

    # How tensors reach the feature parties: method calls here; over the network in a
    # deployment (``fedloom.vertical.party.RemoteSplitTrainer`` overrides these three).
    def forward(self, rows: np.ndarray) -> list[torch.Tensor]:
        """Each feature party's activations h_k for ``rows`` (the step's upload)."""
        return [f.forward(rows) for f in self.features]

    def backward(self, grads: Sequence[torch.Tensor]) -> None:
        """Each feature party finishes back-propagation from its ∂L/∂h_k."""
        for f, g in zip(self.features, grads, strict=True):
            f.backward(g)

    def embed(self, rows: np.ndarray) -> list[torch.Tensor]:
        """Each feature party's activations for ``rows`` in evaluation mode."""
        return [f.embed(rows) for f in self.features]


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
