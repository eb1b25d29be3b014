"""``mode = "vertical"``: align the parties' records by PSI, then train by split learning.

Registered in ``RUN_MODES`` (``fedloom.registry``): ``fedloom run`` hands this runner the
config and the run store, and writes the summary, history and plot from the round
records it stores, as for any run. One round is one epoch over the aligned training
rows (or ``vertical.steps_per_round`` batches). Each round's record has the test
accuracy and loss on the aligned test rows, the bytes sent up (activations) and down
(gradients and row indices), and, on binary tasks, the label-leakage attacks' AUC on
what feature party 0 received (``leak_norm_auc``, ``leak_cosine_auc``; Li et al. 2022).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save
from torch import nn

from fedloom.config import ConfigError, RunConfig, VerticalConfig, VerticalOptimizerConfig
from fedloom.registry import RUN_MODES
from fedloom.seeding import derive_seed
from fedloom.store import RunStore, atomic_write
from fedloom.vertical.data import VerticalDataset, build_vertical_dataset, train_test_rows
from fedloom.vertical.psi import PsiParty, align
from fedloom.vertical.split import (
    VERTICAL_INIT,
    BatchSchedule,
    FeatureParty,
    LabelParty,
    SplitTrainer,
    make_optimizer,
    mlp,
)

log = logging.getLogger("fedloom.vertical")


def check_vertical(cfg: RunConfig) -> None:
    """Refuse the settings split learning cannot honour (one line each)."""
    p = cfg.privacy
    if p.mechanism != "none" or p.secure_aggregation != "none" or p.local_dp:
        raise ConfigError(
            "mode = 'vertical' has no aggregation to add DP noise to or to secure; turn the "
            "privacy section off (vertical.defense protects the labels)"
        )


def bottom_optimizer(v: VerticalConfig, party: int) -> VerticalOptimizerConfig:
    return v.bottom[party] if len(v.bottom) > 1 else v.bottom[0]


def build_models(
    v: VerticalConfig, dims: Sequence[int], num_classes: int, seed: int, *, top_parties: int
) -> tuple[list[nn.Sequential], nn.Sequential]:
    """Bottom models (one per party, seeded by party) and a top over ``top_parties`` of them."""
    bottoms = [build_bottom(v, d, party=k, seed=seed) for k, d in enumerate(dims)]
    return bottoms, build_top(v, num_classes, seed=seed, top_parties=top_parties)


def build_bottom(v: VerticalConfig, columns: int, *, party: int, seed: int) -> nn.Sequential:
    """Feature party ``party``'s bottom model, from its own seed: every process that
    builds it (the simulation, or the party itself in a deployment) gets the same one."""
    torch.manual_seed(derive_seed(seed, VERTICAL_INIT, party))
    return mlp([columns, *v.bottom_hidden, v.embedding_dim], relu_out=True)


def build_top(v: VerticalConfig, num_classes: int, *, seed: int, top_parties: int) -> nn.Sequential:
    """The label party's top model over ``top_parties`` embeddings, from its own seed."""
    torch.manual_seed(derive_seed(seed, VERTICAL_INIT, 1000 + top_parties))
    return mlp([top_parties * v.embedding_dim, *v.top_hidden, num_classes], relu_out=False)


#: The trained split model in the run directory: ``top.*`` and ``bottom{k}.*`` tensors
#: (in a deployment each party writes only its own half to its own directory).
MODEL_FILE = "model.safetensors"


def save_model(path: Path, parts: dict[str, nn.Module]) -> None:
    """Write the named modules' parameters as one safetensors file (``PREFIX.name``)."""
    tensors = {
        f"{prefix}.{name}": t.detach().cpu().numpy().copy()
        for prefix, module in parts.items()
        for name, t in module.state_dict().items()
    }
    atomic_write(path, save(tensors))


def aligned_parties(
    data: VerticalDataset,
) -> tuple[np.ndarray, list[np.ndarray], dict[str, Any]]:
    """Run the PSI; return the labels and each party's columns in the common row order."""
    parties = [PsiParty(data.label_party.ids)] + [PsiParty(f.ids) for f in data.feature_parties]
    common, positions, report = align(parties)
    if len(common) < 4:
        raise ConfigError(
            f"the parties share only {len(common)} records; raise vertical.id_coverage"
        )
    assert data.label_party.labels is not None
    y = data.label_party.labels[positions[0]]
    xs = []
    for f, rows in zip(data.feature_parties, positions[1:], strict=True):
        assert f.features is not None
        xs.append(f.features[rows])
    return y, xs, report.as_dict()


def standardize(x: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    """A party scales its own columns by its own training rows' mean and spread."""
    mu = x[train_rows].mean(axis=0)
    sd = x[train_rows].std(axis=0)
    return ((x - mu) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def run_vertical(
    cfg: RunConfig,
    store: RunStore,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> np.ndarray:
    """The whole run; returns each party's participation count (label party first)."""
    check_vertical(cfg)
    v = cfg.vertical
    torch.set_num_threads(cfg.engine.torch_threads)
    data = build_vertical_dataset(
        v.dataset,
        parties=v.feature_parties,
        coverage=v.id_coverage,
        seed=cfg.seed,
        records=v.records,
    )
    y, xs, alignment = aligned_parties(data)
    log.info(
        "PSI: %d common records of %s in %.1f s, %d bytes",
        alignment["intersection_size"],
        alignment["set_sizes"],
        alignment["seconds"],
        alignment["bytes_exchanged"],
    )
    store.set_meta("alignment", alignment)
    train_rows, test_rows = train_test_rows(len(y), test_fraction=v.test_fraction, seed=cfg.seed)
    xs = [standardize(x, train_rows) for x in xs]
    trainer = make_trainer(v, y, xs, train_rows, test_rows, data.num_classes, cfg.seed)
    parties = 1 + len(xs)
    train_rounds(trainer, store, rounds=cfg.rounds, parties=parties, on_round=on_round)
    save_model(
        store.run_dir / MODEL_FILE,
        {"top": trainer.label.top}
        | {
            f"bottom{k}": f.bottom
            for k, f in enumerate(trainer.features)
            if isinstance(f, FeatureParty)
        },
    )
    if v.baselines:
        baselines = measure_baselines(
            v, y, xs, train_rows, test_rows, data.num_classes, cfg.seed, cfg.rounds
        )
        store.set_meta("baselines", baselines)
        store.set_meta("centralized_accuracy", baselines["centralized_same_network"])
    return np.full(parties, cfg.rounds, dtype=np.int64)


def train_rounds(
    trainer: SplitTrainer,
    store: RunStore,
    *,
    rounds: int,
    parties: int,
    on_round: Callable[[dict[str, Any]], None] | None,
    extra: Callable[[], dict[str, Any]] | None = None,
    started_round: Callable[[int], None] | None = None,
) -> None:
    """Train ``rounds`` rounds, evaluate after each, store each round's record.

    One loop for the simulation and the deployment (``extra`` adds the deployment's
    wire counts to each record; ``started_round`` tells it which round is running).
    """
    for rnd in range(1, rounds + 1):
        if started_round is not None:
            started_round(rnd)
        started = time.perf_counter()
        fields = trainer.run_round()
        record: dict[str, Any] = {
            "round": rnd,
            **trainer.evaluate(),
            **fields,
            "clients_sampled": parties,
            "clients_succeeded": parties,
            "clients_failed": 0,
        }
        if extra is not None:
            record.update(extra())
        record["round_s"] = time.perf_counter() - started
        store.record_round(record)
        if on_round is not None:
            on_round(record)


def make_trainer(
    v: VerticalConfig,
    y: np.ndarray,
    xs: Sequence[np.ndarray],
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    num_classes: int,
    seed: int,
) -> SplitTrainer:
    """The parties (models, optimizers, defense) and the schedule, from the config."""
    return SplitTrainer(
        make_label_party(v, y, num_classes, seed=seed, top_parties=len(xs)),
        [make_feature_party(v, x, party=k, seed=seed) for k, x in enumerate(xs)],
        train_rows=train_rows,
        test_rows=test_rows,
        schedule=make_schedule(v, len(train_rows), seed=seed),
        steps_per_round=v.steps_per_round,
    )


def make_label_party(
    v: VerticalConfig, y: np.ndarray, num_classes: int, *, seed: int, top_parties: int
) -> LabelParty:
    """The label party: its labels in the aligned order, top model, optimizer, defense."""
    top = build_top(v, num_classes, seed=seed, top_parties=top_parties)
    return LabelParty(y, top, v.top, defense=v.defense, noise_scale=v.noise_scale, seed=seed)


def make_feature_party(v: VerticalConfig, x: np.ndarray, *, party: int, seed: int) -> FeatureParty:
    """Feature party ``party``: its standardized, aligned columns, bottom model, optimizer."""
    bottom = build_bottom(v, x.shape[1], party=party, seed=seed)
    return FeatureParty(x, bottom, bottom_optimizer(v, party))


def make_schedule(v: VerticalConfig, n_train: int, *, seed: int) -> BatchSchedule:
    return BatchSchedule(n_train, batch_size=v.batch_size, shuffle=v.shuffle, seed=seed)


def train_central(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    x: np.ndarray,
    y: np.ndarray,
    *,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    schedule: BatchSchedule,
    steps: int | None,
    rounds: int,
) -> float:
    """Train ``model`` in one place with the run's schedule; its test accuracy."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    for _ in range(rounds):
        model.train()
        for batch in schedule.round(steps):
            rows = torch.as_tensor(train_rows[batch])
            loss = nn.functional.cross_entropy(model(xt[rows]), yt[rows])
            for o in optimizers:
                o.zero_grad()
            loss.backward()
            for o in optimizers:
                o.step()
    model.eval()
    with torch.no_grad():
        rows = torch.as_tensor(test_rows)
        return float((model(xt[rows]).argmax(1) == yt[rows]).float().mean().item())


class JointModel(nn.Module):
    """The split network as one model on the concatenated columns (centralized)."""

    def __init__(self, bottoms: Sequence[nn.Module], top: nn.Module, dims: Sequence[int]) -> None:
        super().__init__()
        self.bottoms = nn.ModuleList(bottoms)
        self.top = top
        self.edges = np.cumsum([0, *dims]).tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [b(x[:, self.edges[k] : self.edges[k + 1]]) for k, b in enumerate(self.bottoms)]
        return self.top(torch.cat(parts, dim=1))


def measure_baselines(
    v: VerticalConfig,
    y: np.ndarray,
    xs: Sequence[np.ndarray],
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    num_classes: int,
    seed: int,
    rounds: int,
) -> dict[str, Any]:
    """Each party alone, and all columns in one place, with the run's budget.

    A feature party alone trains its bottom model and a top over its embedding only
    (as if it held the labels); the label party alone can only predict its training
    majority class. ``centralized_same_network`` is the split network trained as one
    model; ``centralized_mlp`` a dense MLP of the same widths on all columns.
    """

    def schedule() -> BatchSchedule:
        return BatchSchedule(len(train_rows), batch_size=v.batch_size, shuffle=v.shuffle, seed=seed)

    def fit(model: nn.Module, opts: Sequence[torch.optim.Optimizer], x: np.ndarray) -> float:
        return train_central(
            model,
            opts,
            x,
            y,
            train_rows=train_rows,
            test_rows=test_rows,
            schedule=schedule(),
            steps=v.steps_per_round,
            rounds=rounds,
        )

    dims = [x.shape[1] for x in xs]
    alone = []
    for k, x in enumerate(xs):
        bottoms, top = build_models(v, dims, num_classes, seed, top_parties=1)
        model = nn.Sequential(bottoms[k], top)
        opts = [
            make_optimizer(bottoms[k].parameters(), bottom_optimizer(v, k)),
            make_optimizer(top.parameters(), v.top),
        ]
        alone.append(fit(model, opts, x))
    majority = int(np.bincount(y[train_rows]).argmax())
    label_alone = float((y[test_rows] == majority).mean())
    x_all = np.concatenate(list(xs), axis=1)
    bottoms, top = build_models(v, dims, num_classes, seed, top_parties=len(xs))
    joint = JointModel(bottoms, top, dims)
    opts = [make_optimizer(b.parameters(), bottom_optimizer(v, k)) for k, b in enumerate(bottoms)]
    opts.append(make_optimizer(top.parameters(), v.top))
    same = fit(joint, opts, x_all)
    torch.manual_seed(derive_seed(seed, VERTICAL_INIT, 2000))
    k = len(xs)
    dense = mlp(
        [
            x_all.shape[1],
            *(h * k for h in v.bottom_hidden),
            k * v.embedding_dim,
            *v.top_hidden,
            num_classes,
        ],
        relu_out=False,
    )
    dense_acc = fit(dense, [make_optimizer(dense.parameters(), v.top)], x_all)
    return {
        "feature_party_alone": alone,
        "label_party_alone": label_alone,
        "centralized_same_network": same,
        "centralized_mlp": dense_acc,
    }


RUN_MODES.add("vertical", run_vertical)
