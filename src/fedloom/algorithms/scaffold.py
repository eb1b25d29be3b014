"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al. 2020, Algorithm 1).

Client drift under heterogeneous data comes from each client following its own
gradient for K local steps. SCAFFOLD keeps a server control variate c (an estimate of
the full gradient) and one per client, c_i (an estimate of client i's), and corrects
every local step to g_i(y) − c_i + c, so each client follows the global direction.

Client (Algorithm 1, lines 7–13, option II):

    y_i ← x;  K times: y_i ← y_i − η_l (g_i(y_i) + c − c_i)
    c_i⁺ ← c_i − c + (x − y_i) / (K η_l)
    upload Δy_i = y_i − x and Δc_i = c_i⁺ − c_i;  keep c_i⁺

Server (lines 16–17): x ← x + η_g · mean(Δy_i),  c ← c + (|S|/N) · mean(Δc_i).

Choices made here:

* K is the number of local steps the client actually took (a straggler's fewer steps,
  a last batch cut short all count once each); η_l is ``client.lr``.
* Client momentum ρ is allowed. With momentum the weights move by η_l Σ_k v_k, so a
  gradient that stays constant over the K steps moves them by η_l a g with
  a = Σ_{k=1}^{K} (1 − ρ^k)/(1 − ρ) (FedNova's normalizer, Wang et al. 2020), and
  option II divides by a η_l instead of K η_l. That keeps c_i⁺ an estimate of the client's
  gradient and makes the constant correction c − c_i cancel exactly in c_i⁺; for ρ = 0
  it is K, the paper's formula.
* The correction joins the gradient after weight decay (weight decay is part of the
  client's objective, so c_i estimates its gradient too).
* Δy_i is combined by the configured aggregator (``mean``: weighted by examples, as
  FedAvg; the paper's mean is unweighted), and η_g is the server optimizer's ``lr``.
  Δc_i is always the plain mean over the round's contributors, as in line 17.
* A client that took no step (no training data) uploads zeros and keeps its c_i.

c_i lives in the client's persisted state (``"scaffold/c"``, zeros until the client is
first sampled); c is the server half's checkpointed state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedloom.algorithms.base import (
    AlgorithmSettings,
    ClientContext,
    ClientUpdate,
    PlainServer,
    StageContext,
    full_global,
)
from fedloom.algorithms.fednova import local_step_normalizer
from fedloom.algorithms.sgd import evaluate_global, train_locally
from fedloom.client.learner import GradientCorrection, OnDevice
from fedloom.messages import DELTA, GLOBAL, FitResult
from fedloom.registry import CLIENT_ALGORITHMS, SERVER_ALGORITHMS

#: The broadcast and upload name of the control variates (c down, Δc_i up).
CONTROL = "control"
#: Where a client keeps its own control variate c_i in its persisted state.
STATE_KEY = "scaffold/c"


def control_correction(shift: torch.Tensor) -> GradientCorrection:
    """g ← g + (c − c_i): SCAFFOLD's corrected local gradient (Algorithm 1, line 10)."""

    held = OnDevice(shift)

    def correct(w: torch.Tensor, g: torch.Tensor) -> None:
        g.add_(held.like(g))

    return correct


class ScaffoldClient:
    """The client half: corrected local SGD and the option-II control update."""

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        x = full_global(ctx)
        c = np.asarray(ctx.broadcast[CONTROL], dtype=np.float32)
        c_i = ctx.state.tensors.get(STATE_KEY)
        if c_i is None:
            c_i = np.zeros_like(x)
        c_i = np.asarray(c_i, dtype=np.float32)
        shift = torch.from_numpy((c - c_i).astype(np.float32))
        out = train_locally(ctx, x, control_correction(shift))
        steps = local_step_normalizer(out.steps, ctx.sgd.momentum)
        metrics = {"train_loss": out.train_loss, "steps": float(out.steps)}
        if steps <= 0:
            zeros = np.zeros_like(x)
            return ClientUpdate({DELTA: zeros, CONTROL: zeros.copy()}, metrics)
        x64, y64 = x.astype(np.float64), out.weights.astype(np.float64)
        c_new = (
            c_i.astype(np.float64) - c.astype(np.float64) + (x64 - y64) / (steps * ctx.sgd.lr)
        ).astype(np.float32)
        ctx.state.tensors[STATE_KEY] = c_new
        return ClientUpdate(
            {
                DELTA: (y64 - x64).astype(np.float32),
                CONTROL: (c_new.astype(np.float64) - c_i.astype(np.float64)).astype(np.float32),
            },
            metrics,
        )

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        return evaluate_global(ctx)


class ScaffoldServer(PlainServer):
    """The server half: broadcasts x and c, moves c by (|S|/N) mean(Δc_i)."""

    uploads: tuple[str, ...] = (DELTA, CONTROL)

    def __init__(self, *, dimension: int, num_clients: int) -> None:
        self.num_clients = num_clients
        self.control = np.zeros(dimension, dtype=np.float32)

    def broadcast(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        return {GLOBAL: weights, CONTROL: self.control}

    def upload_sizes(self, dimension: int) -> dict[str, int]:
        return {DELTA: dimension, CONTROL: dimension}

    def combine(
        self,
        *,
        rnd: int,
        aggregate: np.ndarray,
        extras: Mapping[str, np.ndarray],
        contributors: Sequence[FitResult],
    ) -> tuple[np.ndarray, dict[str, Any]]:
        share = len(contributors) / self.num_clients
        self.control = (
            self.control.astype(np.float64) + share * extras[CONTROL].astype(np.float64)
        ).astype(np.float32)
        return aggregate, {"scaffold_control_norm": float(np.linalg.norm(self.control))}

    def state(self) -> dict[str, np.ndarray]:
        return {CONTROL: self.control.copy()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if CONTROL not in state:
            raise ValueError("the checkpoint has no SCAFFOLD control variate; start a new run")
        self.control = np.asarray(state[CONTROL], dtype=np.float32).copy()


@CLIENT_ALGORITHMS.register("scaffold")
def make_scaffold_client(settings: AlgorithmSettings, context: StageContext) -> ScaffoldClient:
    return ScaffoldClient()


@SERVER_ALGORITHMS.register("scaffold")
def make_scaffold_server(settings: AlgorithmSettings, context: StageContext) -> ScaffoldServer:
    return ScaffoldServer(dimension=context.dimension, num_clients=context.num_clients)
