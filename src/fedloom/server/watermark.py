"""WAFFLE: the server watermarks the global model so that a stolen copy can be recognised.

Tekgul, Xia, Marchal and Asokan 2021 ("WAFFLE: Watermarking in Federated Learning",
SRDS 2021, arXiv:2008.07298) let the
aggregator, who owns no training data, embed a backdoor-style watermark: a secret
*trigger set* of synthetic inputs with assigned labels. After every aggregation the
server retrains the global model on the trigger set alone until the watermark accuracy
reaches a threshold or a step cap (their retraining step), so the clients'
training cannot wash it out. Ownership is shown by the trigger-set accuracy of a
suspect model: far above chance means the model descends from the watermarked one.

Trigger set (their WAFFLEPattern, with one change). WAFFLE draws one random
pattern per class and adds noise to make several images of each. Here *every* trigger
input is its own random pattern (each pixel independently the data's low or high
value) and *every* label is drawn uniformly from ``num_labels`` classes, independently
of the inputs. That makes the verification test exact: for any model that was trained
without the secret, each trigger input is classified correctly with probability exactly
``1 / num_labels``, independently of the others, so the number correct is
Binomial(n, 1 / num_labels) and :func:`binomial_p_value` is a true p-value. With shared
per-class patterns, the inputs of one class succeed or fail together and a binomial
p-value would be overconfident.

The trigger set comes from a seed that is secret (drawn from the OS CSPRNG when
``watermark.seed`` is unset) and is kept in the run store, never in the config: in the
checkpoints (stage state, so a resume continues with the same trigger set) and in
``watermark.safetensors`` in the run directory, which ``fedloom watermark verify`` reads.
Whoever holds the run directory holds the secret.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from fedloom.algorithms.base import StageContext
from fedloom.callbacks import Callback, RunContext
from fedloom.client.learner import Learner, SGDSettings, WorkPlan
from fedloom.config import ConfigError, WatermarkConfig
from fedloom.data.base import ArrayDataset
from fedloom.registry import MODEL_TRANSFORMS
from fedloom.seeding import WATERMARK, derive_rng, torch_generator
from fedloom.server.transforms import ServerModel
from fedloom.store import atomic_write

#: The trigger set in a run directory (what ``fedloom watermark verify`` reads).
WATERMARK_FILE = "watermark.safetensors"
_FORMAT = "fedloom-watermark/1"


class WatermarkError(ValueError):
    """A watermark file or model that cannot be verified; the message is one line."""


@dataclass(frozen=True)
class TriggerSet:
    """Secret inputs ``x`` with their assigned labels ``y`` (drawn from ``num_labels``)."""

    x: np.ndarray
    y: np.ndarray
    num_labels: int

    def __len__(self) -> int:
        return len(self.y)

    def dataset(self) -> ArrayDataset:
        return ArrayDataset(self.x, self.y)

    def to_bytes(self) -> bytes:
        return save(
            {"x": np.ascontiguousarray(self.x), "y": np.ascontiguousarray(self.y)},
            metadata={"fedloom.format": _FORMAT, "num_labels": str(self.num_labels)},
        )

    @staticmethod
    def load(path: Path) -> TriggerSet:
        """Read a trigger file written by a watermarked run; one-line error otherwise."""
        try:
            with safe_open(str(path), framework="numpy") as fh:
                metadata = fh.metadata() or {}
                arrays = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
        except FileNotFoundError:
            raise WatermarkError(f"{path} does not exist; pass a watermark trigger file") from None
        except (SafetensorError, OSError) as err:
            raise WatermarkError(f"{path} is not a readable trigger file ({err})") from None
        if metadata.get("fedloom.format") != _FORMAT or not {"x", "y"} <= set(arrays):
            raise WatermarkError(f"{path} is not a fedloom watermark trigger file")
        return TriggerSet(arrays["x"], arrays["y"].astype(np.int64), int(metadata["num_labels"]))


def make_trigger_set(
    *,
    seed: int,
    size: int,
    num_labels: int,
    input_shape: tuple[int, ...],
    low: float,
    high: float,
) -> TriggerSet:
    """``size`` independent random patterns (each value ``low`` or ``high`` with
    probability 1/2) with labels drawn uniformly from ``range(num_labels)``: the same
    set for the same arguments, on any machine."""
    rng = derive_rng(seed, WATERMARK)
    bits = rng.random((size, *input_shape)) < 0.5
    x = np.where(bits, np.float32(high), np.float32(low)).astype(np.float32)
    y = rng.integers(0, num_labels, size=size, dtype=np.int64)
    return TriggerSet(x, y, num_labels)


def binomial_p_value(correct: int, total: int, num_labels: int) -> float:
    """P(X >= correct) for X ~ Binomial(total, 1 / num_labels), computed exactly.

    The chance that a model trained without the secret gets at least ``correct`` of
    ``total`` trigger inputs right (see the module docstring for why this is exact).
    Integer arithmetic: sum_{i>=k} C(n, i) (L-1)^(n-i) / L^n, so tiny p-values do not
    underflow to 0 before they are compared.
    """
    if not 0 <= correct <= total:
        raise ValueError(f"correct must be in 0..{total}, got {correct}")
    if num_labels < 2:
        raise ValueError(f"num_labels must be at least 2, got {num_labels}")
    tail = sum(
        math.comb(total, i) * (num_labels - 1) ** (total - i) for i in range(correct, total + 1)
    )
    return float(Fraction(tail, num_labels**total))


def predictions(learner: Learner, weights: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """The arg-max class of the model ``weights`` for each input."""
    learner.binding.load(np.ascontiguousarray(weights, dtype=np.float32))
    learner.model.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(inputs))
        for s in range(0, len(x), 512):
            out.append(learner.model(x[s : s + 512]).argmax(dim=1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def count_correct(learner: Learner, weights: np.ndarray, trigger: TriggerSet) -> int:
    return int((predictions(learner, weights, trigger.x) == trigger.y).sum())


@dataclass(frozen=True)
class Verdict:
    """Whether a model carries the watermark: k of n trigger inputs right, and the test."""

    correct: int
    total: int
    num_labels: int
    p_value: float
    alpha: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def carries_watermark(self) -> bool:
        return self.p_value < self.alpha


def verify(
    learner: Learner, weights: np.ndarray, trigger: TriggerSet, *, alpha: float = 1e-6
) -> Verdict:
    """Test H0 "this model was trained without the secret trigger set" at level ``alpha``."""
    if len(trigger) == 0:
        raise WatermarkError("the trigger set is empty; nothing to verify against")
    k = count_correct(learner, weights, trigger)
    p = binomial_p_value(k, len(trigger), trigger.num_labels)
    return Verdict(k, len(trigger), trigger.num_labels, p, alpha)


class WaffleEmbedding(Callback):
    """The server half of WAFFLE (Tekgul et al. 2021): after each aggregation, SGD on the
    trigger set alone until its accuracy reaches ``threshold`` or ``max_steps`` steps.

    A :class:`~fedloom.server.transforms.ModelTransform`; also a callback, to write the
    trigger set into the run directory when the run (or a resume) starts.
    """

    def __init__(self, cfg: WatermarkConfig, model: ServerModel, *, seed: int) -> None:
        self.cfg = cfg
        self.learner = model.learner
        self.num_labels = cfg.num_labels or model.num_classes
        self.seed = seed
        self.trigger = make_trigger_set(
            seed=seed,
            size=cfg.trigger_size,
            num_labels=self.num_labels,
            input_shape=model.input_shape,
            low=model.input_low,
            high=model.input_high,
        )

    def accuracy(self, weights: np.ndarray) -> float:
        return count_correct(self.learner, weights, self.trigger) / len(self.trigger)

    def transform(self, rnd: int, weights: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        cfg = self.cfg
        before = acc = self.accuracy(weights)
        data = self.trigger.dataset()
        sgd = SGDSettings(lr=cfg.lr, momentum=cfg.momentum)
        generator = torch_generator(self.seed, WATERMARK, rnd)
        per_pass = math.ceil(len(data) / cfg.batch_size)
        steps = 0
        while acc < cfg.threshold and steps < cfg.max_steps:
            # One pass over the trigger set (or what is left of the cap), then re-check.
            plan = WorkPlan(1, min(per_pass, cfg.max_steps - steps), straggler=False)
            outcome = self.learner.train(
                start=weights,
                data=data,
                plan=plan,
                batch_size=cfg.batch_size,
                sgd=sgd,
                generator=generator,
            )
            weights, steps = outcome.weights, steps + outcome.steps
            acc = self.accuracy(weights)
        fields = {
            "watermark_accuracy_before": before,
            "watermark_accuracy": acc,
            "watermark_steps": steps,
        }
        return weights.astype(np.float32, copy=False), fields

    def state(self) -> dict[str, Any]:
        return {
            "x": self.trigger.x,
            "y": self.trigger.y,
            "seed": self.seed,
            "num_labels": self.num_labels,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        if not state:  # a checkpoint from a run without a watermark: keep the fresh one
            return
        self.seed = int(state["seed"])
        self.num_labels = int(state["num_labels"])
        self.trigger = TriggerSet(
            np.asarray(state["x"], dtype=np.float32),
            np.asarray(state["y"], dtype=np.int64),
            self.num_labels,
        )

    def on_run_start(self, run: RunContext) -> None:
        if run.store is not None:
            atomic_write(Path(run.store.run_dir) / WATERMARK_FILE, self.trigger.to_bytes())


@MODEL_TRANSFORMS.register("waffle")
def make_waffle(cfg: WatermarkConfig, context: StageContext, model: ServerModel) -> WaffleEmbedding:
    if not model.real_inputs:
        raise ConfigError(
            "watermark.enabled needs a model with real-valued inputs (images, features); "
            "this data set feeds token ids, turn the watermark off"
        )
    if model.num_classes < 2:
        raise ConfigError(
            "watermark.enabled needs a classifier (a trigger set has labels); this model "
            "has one output, turn the watermark off"
        )
    labels = cfg.num_labels or model.num_classes
    if labels > model.num_classes:
        raise ConfigError(
            f"watermark.num_labels = {labels} exceeds the model's {model.num_classes} "
            "classes; lower it"
        )
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    return WaffleEmbedding(cfg, model, seed=seed)
