"""Server optimizers: how the aggregated update moves the global model.

FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2) treats the
negated average client update as a pseudo-gradient. With ``Δ_t`` the weighted mean of
``w_local - w_global`` (already a descent direction):

* SGD:      x_{t+1} = x_t + η Δ_t              (η = 1 is FedAvg, McMahan et al. 2017)
* Momentum: v_t = β v_{t-1} + Δ_t; x_{t+1} = x_t + η v_t    (FedAvgM, Hsu et al. 2019)
* m_t = β1 m_{t-1} + (1 - β1) Δ_t for the adaptive three, then
  - Adagrad: v_t = v_{t-1} + Δ_t²
  - Adam:    v_t = β2 v_{t-1} + (1 - β2) Δ_t²
  - Yogi:    v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)
  and x_{t+1} = x_t + η m_t / (√v_t + τ).

As in the paper there is no bias correction, and v starts at τ² (Algorithm 2 requires
v_{-1} ≥ τ²). State is a dict of named vectors so it checkpoints as safetensors.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from fedloom.config import ServerConfig
from fedloom.registry import SERVER_OPTIMIZERS


class ServerOptimizer(Protocol):
    name: str

    def step(self, weights: np.ndarray, update: np.ndarray) -> np.ndarray:
        """Return the new global weights given the aggregated client update."""
        ...

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


class ServerSGD:
    """x ← x + η Δ. With η = 1 this is FedAvg."""

    name = "sgd"

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(self, weights: np.ndarray, update: np.ndarray) -> np.ndarray:
        # η Δ, then x added in place: one model-sized array, the same float32 sums.
        out = np.float32(self.lr) * update
        out += weights
        return out.astype(np.float32, copy=False)

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        return None


class ServerMomentum:
    """FedAvgM (Hsu et al. 2019, Algorithm 1): heavy-ball momentum on the server."""

    name = "momentum"

    def __init__(self, lr: float, momentum: float, size: int) -> None:
        self.lr, self.momentum = lr, momentum
        self.velocity = np.zeros(size, dtype=np.float32)

    def step(self, weights: np.ndarray, update: np.ndarray) -> np.ndarray:
        # A new velocity array (a checkpoint may hold the old one), summed in place: the
        # same float32 arithmetic as m·v + Δ and x + η·v with one temporary each.
        velocity = np.float32(self.momentum) * self.velocity
        velocity += update
        self.velocity = velocity.astype(np.float32, copy=False)
        out = np.float32(self.lr) * self.velocity
        out += weights
        return out.astype(np.float32, copy=False)

    def state(self) -> dict[str, np.ndarray]:
        return {"velocity": self.velocity}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.velocity = state["velocity"].astype(np.float32)


class ServerAdaptive:
    """FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2)."""

    def __init__(
        self, name: str, lr: float, beta1: float, beta2: float, tau: float, size: int
    ) -> None:
        if name not in ("adagrad", "adam", "yogi"):
            raise ValueError(f"unknown adaptive server optimizer '{name}'")
        self.name = name
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m = np.zeros(size, dtype=np.float64)
        self.v = np.full(size, tau * tau, dtype=np.float64)

    def step(self, weights: np.ndarray, update: np.ndarray) -> np.ndarray:
        d = update.astype(np.float64)
        d2 = d * d
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * d
        if self.name == "adagrad":
            self.v = self.v + d2
        elif self.name == "adam":
            self.v = self.beta2 * self.v + (1.0 - self.beta2) * d2
        else:
            self.v = self.v - (1.0 - self.beta2) * d2 * np.sign(self.v - d2)
        step = self.lr * self.m / (np.sqrt(self.v) + self.tau)
        return (weights.astype(np.float64) + step).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {"m": self.m, "v": self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.m = state["m"].astype(np.float64)
        self.v = state["v"].astype(np.float64)


def make_server_optimizer(cfg: ServerConfig, size: int) -> ServerOptimizer:
    """The optimizer ``cfg.optimizer`` names, built from the ``server`` section's keys."""
    return SERVER_OPTIMIZERS.create(cfg.optimizer, cfg, size)


SERVER_OPTIMIZERS.add("sgd", lambda cfg, size: ServerSGD(cfg.lr))
SERVER_OPTIMIZERS.add("momentum", lambda cfg, size: ServerMomentum(cfg.lr, cfg.momentum, size))
for _name in ("adam", "yogi", "adagrad"):
    SERVER_OPTIMIZERS.add(
        _name,
        lambda cfg, size, _name=_name: ServerAdaptive(
            _name, cfg.lr, cfg.beta1, cfg.beta2, cfg.tau, size
        ),
    )
