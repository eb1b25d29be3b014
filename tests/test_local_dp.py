"""Local (example-level) DP on clients: DP-SGD through Opacus (fedloom.algorithms.dpsgd_opacus)."""

from functools import partial
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

import fedloom.algorithms.dpsgd_opacus as dpsgd_mod
from fedloom.algorithms.dpsgd import LEDGER_KEY
from fedloom.algorithms.dpsgd_opacus import (
    SecureNoiseDPOptimizer,
    check_opacus_compatible,
    epsilon_of,
    ledger_of,
    local_delta,
)
from fedloom.client.learner import Learner, WorkSettings, plan_work
from fedloom.client.models import CharLSTM
from fedloom.client_store import ClientStateStore
from fedloom.config import ConfigError, RunConfig, load_config
from fedloom.data import build_federated_dataset
from fedloom.data.base import FederatedDataset
from fedloom.engine.inprocess import InProcessExecutor
from fedloom.engine.pool import ProcessPoolExecutor
from fedloom.engine.simulation import run_simulation
from fedloom.messages import GLOBAL, FitResult, FitTask
from fedloom.store import RunStore
from fedloom.strategies import algorithm_settings, build_client_runtime, simulation_runtime

from .helpers import client_runtime, interrupt_after, latest_checkpoint, toy_dataset


def _cfg(*overrides: str) -> RunConfig:
    return load_config(
        None,
        [
            "model.hidden=[4]",
            "client.batch_size=8",
            "client.epochs=2",
            "privacy.local_dp=true",
            "privacy.local_noise_multiplier=1.1",
            *overrides,
        ],
    )


def _clients(cfg: RunConfig, data: FederatedDataset | None = None) -> InProcessExecutor:
    """The in-process engine over ``cfg``'s client side: it keeps each client's state
    (its DP-SGD ledger) in an in-memory store between fits, as a run does."""
    runtime = client_runtime(cfg, toy_dataset(clients=3) if data is None else data)
    return InProcessExecutor(runtime, ClientStateStore())


def _fit(clients: Any, client: int, rnd: int, w: np.ndarray) -> FitResult:
    (result,) = clients.fit(
        [FitTask(client_id=client, round=rnd, model_version=rnd - 1)], {GLOBAL: w}
    )
    assert isinstance(result, FitResult), result
    return result


def _delta_of(cfg: RunConfig, n: int) -> float:
    settings = algorithm_settings(cfg).local_dp
    assert settings is not None
    return local_delta(settings, n)


def _ledgers(store: ClientStateStore) -> dict[int, Any]:
    return {c: store.get(c).meta[LEDGER_KEY] for c in store.clients()}


def _run_ledgers(run_dir: Path) -> dict[int, Any]:
    """Every client's DP-SGD ledger as of a run directory's last checkpoint."""
    store = ClientStateStore(run_dir / "client_state")
    store.restore(latest_checkpoint(run_dir).meta["client_state"])
    return _ledgers(store)


def _dp_accounting_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


def test_epsilon_matches_accountants_and_composes_over_rounds() -> None:
    cfg = _cfg()
    clients = _clients(cfg)
    w = clients.runtime.initial_vector()
    # n = 40, B = 8: q = 1/5 and 5 steps per epoch, 2 epochs: 10 steps per round.
    r1 = _fit(clients, 1, 1, w)
    delta = _delta_of(cfg, 40)
    assert delta == pytest.approx(min(cfg.privacy.delta, 1 / 400))
    assert r1.metrics["local_delta"] == delta
    assert r1.metrics["steps"] == 10 and r1.metrics["local_sample_rate"] == pytest.approx(0.2)
    eps1 = r1.metrics["local_epsilon"]
    opacus = RDPAccountant()
    opacus.history = [(1.1, 0.2, 10)]
    assert eps1 == pytest.approx(opacus.get_epsilon(delta), rel=1e-9)
    assert eps1 == pytest.approx(_dp_accounting_epsilon(1.1, 0.2, 10, delta), rel=0.01)

    # Another client's training does not touch client 1's ledger.
    _fit(clients, 2, 2, w)
    r2 = _fit(clients, 1, 3, w)
    eps2 = r2.metrics["local_epsilon"]
    assert eps2 > eps1
    assert eps2 == pytest.approx(_dp_accounting_epsilon(1.1, 0.2, 20, delta), rel=0.01)
    # Opacus' RDP history composes the two rounds into one (σ, q, steps) entry.
    assert ledger_of(clients.store.get(1)) == [(1.1, 0.2, 20)]
    assert ledger_of(clients.store.get(2)) == [(1.1, 0.2, 10)]
    assert ledger_of(clients.store.get(0)) == []  # never trained
    assert epsilon_of(ledger_of(clients.store.get(0)), delta) == 0.0

    # The ledger is plain data and round-trips (for checkpoints).
    fresh = ClientStateStore()
    fresh.restore(clients.store.manifest())
    assert epsilon_of(ledger_of(fresh.get(1)), delta) == pytest.approx(eps2, rel=1e-12)


def test_deterministic_per_seed_client_round() -> None:
    cfg = _cfg()
    a, b = _clients(cfg), _clients(cfg)
    w = a.runtime.initial_vector()
    ra, rb = _fit(a, 1, 4, w), _fit(b, 1, 4, w)
    assert ra.delta is not None and rb.delta is not None
    np.testing.assert_array_equal(ra.delta, rb.delta)
    other = _fit(a, 1, 5, w)
    assert other.delta is not None and not np.array_equal(other.delta, ra.delta)
    assert np.all(np.isfinite(ra.delta)) and ra.delta.dtype == np.float32


@pytest.mark.parametrize("secure", [False, True])
def test_large_noise_dominates_the_update(secure: bool) -> None:
    """One plain SGD step: Δ = -lr·(Σ clipped g_i + N(0, σ²C²I)) / B, so ‖Δ‖ ≈ lr·σ·C·√d / B.

    The same scale with the seeded and with the CSPRNG (``secure_noise``) generator.
    """
    sigma, clip, lr, bs = 200.0, 1.0, 0.1, 8
    cfg = _cfg(
        "model.hidden=[64]",
        "client.steps=1",
        "client.momentum=0.0",
        f"client.lr={lr}",
        f"privacy.local_noise_multiplier={sigma}",
        f"privacy.local_max_grad_norm={clip}",
        f"privacy.secure_noise={str(secure).lower()}",
    )
    clients = _clients(cfg)
    w = clients.runtime.initial_vector()
    norms = []
    for rnd in range(4):
        r = _fit(clients, 0, rnd, w)
        assert r.delta is not None and r.metrics["steps"] == 1
        norms.append(float(np.linalg.norm(r.delta)))
    expected = lr * sigma * clip * np.sqrt(w.size) / bs
    # Signal is at most lr·C·(batch size)/B ≈ lr, far below the noise (≈ 57 here).
    assert np.mean(norms) == pytest.approx(expected, rel=0.1)


def test_stragglers_train_less_and_spend_less_epsilon() -> None:
    cfg = _cfg("client.epochs=3", "client.straggler_fraction=1.0")
    clients = _clients(cfg)
    work = WorkSettings(epochs=3, batch_size=8, straggler_fraction=1.0)
    plan = plan_work(work, seed=cfg.seed, round=1, client_id=1, num_examples=40)
    assert plan.straggler and plan.epochs < 3
    r = _fit(clients, 1, 1, clients.runtime.initial_vector())
    assert r.straggler and r.metrics["steps"] == 5 * plan.epochs
    opacus = RDPAccountant()
    opacus.history = [(1.1, 0.2, 5 * plan.epochs)]
    assert r.metrics["local_epsilon"] == pytest.approx(opacus.get_epsilon(_delta_of(cfg, 40)))


def test_local_dp_then_central_clipping_and_fedprox() -> None:
    cfg = _cfg(
        "privacy.mechanism='central'",
        "privacy.noise_multiplier=1.0",
        "privacy.clipping_norm=0.01",
    )
    clients = _clients(cfg)
    # The strategy tells clients the clipping norm in the task config (central DP's codec).
    task = FitTask(client_id=1, round=1, model_version=0, config={"clip_norm": 0.01})
    (r,) = clients.fit([task], {GLOBAL: clients.runtime.initial_vector()})
    assert isinstance(r, FitResult)
    assert r.delta is not None and np.linalg.norm(r.delta) <= 0.01 * (1 + 1e-5)
    assert r.metrics["local_epsilon"] > 0 and r.metrics["below_clip"] == 0.0

    plain, prox = _clients(_cfg()), _clients(_cfg("client.proximal_mu=1.0"))
    w = plain.runtime.initial_vector()
    d0, d1 = _fit(plain, 1, 1, w).delta, _fit(prox, 1, 1, w).delta
    assert d0 is not None and d1 is not None
    # Same batches and noise; the proximal pull towards w_t shrinks the update.
    assert np.linalg.norm(d1) < np.linalg.norm(d0)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.bn1 = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn1(self.fc(x))))


def test_unsupported_layer_is_refused_with_its_name() -> None:
    data = toy_dataset(clients=3)

    def build(cfg: RunConfig) -> Any:
        return build_client_runtime(
            cfg, Learner(_BNNet()), lambda c: data.clients[c], num_clients=3
        )

    with pytest.raises(ConfigError) as err:
        build(_cfg())  # refused when the client side is built, before any training
    msg = str(err.value)
    assert "\n" not in msg and "'bn1' (BatchNorm1d)" in msg and "GroupNorm" in msg
    # The same model trains normally without local DP.
    plain = InProcessExecutor(build(load_config(None, ["client.batch_size=8"])), ClientStateStore())
    assert _fit(plain, 0, 1, plain.runtime.initial_vector()).delta is not None

    with pytest.raises(ConfigError, match=r"'lstm' \(LSTM\)") as err2:
        check_opacus_compatible(CharLSTM(10, 4, 8, 1))
    assert "\n" not in str(err2.value)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["privacy.local_dp=true", "privacy.local_noise_multiplier=0"], "local_noise_multiplier"),
        (["privacy.local_dp=true", "privacy.local_max_grad_norm=-1"], "local_max_grad_norm"),
        (["privacy.local_dp=true", "privacy.local_delta=1.5"], "local_delta"),
        (["privacy.local_delta=1e-6"], "privacy.local_dp is false"),
    ],
)
def test_invalid_local_dp_config_is_one_line(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_valid_local_dp_config_round_trips() -> None:
    cfg = load_config(None, ["privacy.local_dp=true", "privacy.local_delta=1e-6"])
    assert cfg.privacy.local_dp and cfg.privacy.local_delta == 1e-6
    again = load_config(None, [])  # every local key at its default validates with DP off
    assert not again.privacy.local_dp
    # Both used to be refused: the pool ships ledgers, secure noise has its own optimizer.
    both = load_config(
        None, ["privacy.local_dp=true", "engine.name='pool'", "privacy.secure_noise=true"]
    )
    assert both.engine.name == "pool" and both.privacy.secure_noise


@pytest.mark.slow
def test_digits_learns_with_local_dp(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "rounds=6",
            "target_accuracy=0.999",
            "client.epochs=3",
            "privacy.local_dp=true",
            "privacy.local_noise_multiplier=1.0",
            "privacy.local_max_grad_norm=1.0",
        ],
    )
    summary = run_simulation(cfg, tmp_path)
    assert summary["rounds_completed"] == 6
    assert summary["final"]["accuracy"] >= 0.7
    eps = [r["local_epsilon_max"] for r in summary["history"]]
    assert all(e > 0 for e in eps) and eps == sorted(eps)  # the worst client's ε only grows


def test_resume_keeps_each_clients_local_dp_ledger(tmp_path: Path) -> None:
    """A resumed local-DP run reports the same client ε as the uninterrupted run."""
    overrides = [
        "rounds=3",
        "data.num_clients=4",
        "client.epochs=1",
        "privacy.local_dp=true",
        "privacy.local_noise_multiplier=1.0",
    ]
    whole = run_simulation(load_config(None, overrides), tmp_path / "whole")
    interrupt_after(load_config(None, overrides), tmp_path / "cut", 2)
    resumed = run_simulation(load_config(None), tmp_path / "cut", resume=True)
    assert [r["local_epsilon_max"] for r in resumed["history"]] == pytest.approx(
        [r["local_epsilon_max"] for r in whole["history"]]
    )


# ------------------------------------------------------------------ secure noise


def test_secure_noise_has_the_configured_standard_deviation() -> None:
    """One ``add_noise`` on zero gradients: every coordinate is N(0, (σC)²), shapes kept.

    n = 401 000 draws. The sample standard deviation has relative standard error
    1/√(2n) ≈ 0.11 %, the mean σC/√n ≈ 0.16 % of σC, the share within ±σC
    √(0.683·0.317/n) ≈ 0.07 %: the tolerances (1 %, 1 % of σC, 0.5 %) are 9, 6 and 7
    standard errors, so a correct sampler fails this with probability below 1e-8.
    """
    sigma, clip = 1.3, 0.7
    weight, bias = nn.Parameter(torch.zeros(800, 500)), nn.Parameter(torch.zeros(1000))
    opt = SecureNoiseDPOptimizer(
        torch.optim.SGD([weight, bias], lr=0.1),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=8,
    )

    def one_step() -> np.ndarray:
        for p in (weight, bias):
            p.summed_grad = torch.zeros_like(p)  # clipped per-example sum of a zero gradient
        opt.add_noise()
        assert weight.grad is not None and bias.grad is not None
        assert weight.grad.shape == weight.shape and bias.grad.shape == bias.shape
        assert weight.grad.dtype == bias.grad.dtype == torch.float32
        return torch.cat([weight.grad.reshape(-1), bias.grad]).numpy().astype(np.float64)

    noise, again = one_step(), one_step()
    std = sigma * clip
    assert noise.std() == pytest.approx(std, rel=0.01)
    assert abs(noise.mean()) < 0.01 * std
    assert np.mean(np.abs(noise) < std) == pytest.approx(0.6827, abs=0.005)
    assert not np.array_equal(noise, again)  # fresh CSPRNG draws every step


def test_secure_noise_is_not_reproducible_and_leaves_epsilon_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draws: list[int] = []
    original = dpsgd_mod.secure_standard_normal

    def counting(size: int) -> np.ndarray:
        draws.append(size)
        return original(size)

    monkeypatch.setattr(dpsgd_mod, "secure_standard_normal", counting)
    results = {}
    for secure in (False, True):
        cfg = _cfg(f"privacy.secure_noise={str(secure).lower()}")
        a, b = _clients(cfg), _clients(cfg)
        w = a.runtime.initial_vector()
        results[secure] = (_fit(a, 1, 4, w), _fit(b, 1, 4, w), a)
    (seeded_a, seeded_b, seeded_clients), (secure_a, secure_b, secure_clients) = (
        results[False],
        results[True],
    )
    assert seeded_a.delta is not None and seeded_b.delta is not None
    np.testing.assert_array_equal(seeded_a.delta, seeded_b.delta)  # seeded: bit-identical
    assert secure_a.delta is not None and secure_b.delta is not None
    assert np.all(np.isfinite(secure_a.delta))
    assert not np.array_equal(secure_a.delta, secure_b.delta)  # CSPRNG: differs every run
    # Every step of the two secure fits drew its noise from the CSPRNG, for every weight.
    assert draws == [secure_a.delta.size] * int(secure_a.metrics["steps"] * 2)
    # The accountant sees the same (σ, q, steps) whatever the generator: same ε.
    for key in ("local_epsilon", "local_delta", "local_sample_rate", "steps"):
        assert secure_a.metrics[key] == secure_b.metrics[key] == seeded_a.metrics[key]
    assert _ledgers(secure_clients.store) == _ledgers(seeded_clients.store) != {}


# ------------------------------------------------------------------ pool engine

POOL_DP = ["data.num_clients=4", "client.epochs=1", "privacy.local_dp=true"]


@pytest.mark.slow
def test_pool_ships_each_clients_ledger_to_whichever_worker_trains_it() -> None:
    """Per-client ε and Δ on the pool equal the in-process ones, bit for bit."""
    cfg = load_config(None, POOL_DP)
    data = build_federated_dataset(cfg.data, cfg.seed)
    sizes = data.client_sizes().tolist()
    small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
    inproc = _clients(cfg, data)
    w = inproc.runtime.initial_vector()
    factory = partial(simulation_runtime, cfg.model_dump_json())
    pool = ProcessPoolExecutor(factory, sizes, ClientStateStore(), workers=2)
    try:
        # Tasks go out largest client first, to worker 0, then 1: `small` trains on
        # worker 0, then on worker 1 (beside `big`), then on worker 0 again, where a
        # per-worker ledger would have missed its second round.
        for rnd, clients in enumerate([[small], [big, small], [small]], start=1):
            tasks = [FitTask(client_id=c, round=rnd, model_version=rnd - 1) for c in clients]
            pairs = zip(inproc.fit(tasks, {GLOBAL: w}), pool.fit(tasks, {GLOBAL: w}), strict=True)
            for a, b in pairs:
                assert isinstance(a, FitResult) and isinstance(b, FitResult)
                assert a.delta is not None and b.delta is not None
                assert b.metrics == a.metrics  # local_epsilon included, exactly
                np.testing.assert_array_equal(b.delta, a.delta)
        ledgers = _ledgers(pool.store)
        assert ledgers == _ledgers(inproc.store)
        assert set(ledgers) == {small, big}

        # A restored pool continues from the restored ledger, not from its workers'.
        pool.load_client_state(ClientStateStore().manifest())
        fresh = _fit(pool, small, 9, w)
        first = _fit(_clients(cfg, data), small, 9, w)
        assert fresh.metrics["local_epsilon"] == first.metrics["local_epsilon"]
    finally:
        pool.close()


def _final_checkpoint(run_dir: Path) -> tuple[np.ndarray, dict[int, Any]]:
    return latest_checkpoint(run_dir).tensors["global"], _run_ledgers(run_dir)


@pytest.mark.slow
def test_digits_on_the_pool_and_resumed_equals_in_process(tmp_path: Path) -> None:
    """Same per-client ledgers, ε and final model on pool (2 workers, resumed) and in-process."""
    overrides = [*POOL_DP, "rounds=3", "server.fraction_fit=0.5"]
    whole = run_simulation(load_config(None, overrides), tmp_path / "inproc")
    pool_cfg = load_config(None, [*overrides, "engine.name='pool'", "engine.workers=2"])
    interrupt_after(pool_cfg, tmp_path / "pool", 2)
    resumed = run_simulation(load_config(None), tmp_path / "pool", resume=True)
    assert resumed["config"]["engine"]["name"] == "pool"
    assert all(r["clients_failed"] == 0 for r in resumed["history"])
    eps = [r["local_epsilon_max"] for r in resumed["history"]]
    assert eps == [r["local_epsilon_max"] for r in whole["history"]]
    weights, ledgers = _final_checkpoint(tmp_path / "pool")
    expected_weights, expected_ledgers = _final_checkpoint(tmp_path / "inproc")
    assert ledgers == expected_ledgers and len(ledgers) >= 3
    np.testing.assert_array_equal(weights, expected_weights)


# ------------------------------------------------------------------ secure aggregation


def test_local_dp_composes_with_secure_aggregation(tmp_path: Path) -> None:
    """SecAgg+ sums local-DP updates: the round-1 model is w0 + mean Δ (to quantization)."""
    overrides = [
        *POOL_DP,
        "rounds=3",
        "privacy.secure_aggregation=secagg+",
        "privacy.secagg_clip_range=4.0",
    ]
    cfg = load_config(None, overrides)
    summary = run_simulation(cfg, tmp_path / "run")
    history = summary["history"]
    assert all(r["secagg_contributors"] == 4 and r["aggregated"] for r in history)
    eps = [r["local_epsilon_max"] for r in history]
    assert all(e > 0 for e in eps) and eps == sorted(eps)
    assert history[-1]["accuracy"] > history[0]["accuracy"] + 0.2  # it learns

    clients = _clients(cfg, build_federated_dataset(cfg.data, cfg.seed))
    w0 = clients.runtime.initial_vector()
    results = [_fit(clients, c, 1, w0) for c in range(4)]
    with RunStore.open(tmp_path / "run") as store:
        round1 = store.load_checkpoint(store.checkpoint_path(1))
        last = store.latest_checkpoint()
    assert last is not None
    step = 4.0 / (2**15 - 1)  # quantization step of the default 16 bits over [-4, 4]
    expected = w0 + np.mean([r.delta for r in results], axis=0)
    np.testing.assert_allclose(round1.tensors["global"], expected, atol=step)
    # Every client reported its ε, and its ledger goes on composing over the rounds.
    ledgers = _run_ledgers(tmp_path / "run")
    assert set(ledgers) == {0, 1, 2, 3}
    for c, r in enumerate(results):
        assert r.metrics["local_epsilon"] > 0
        history = [(float(s), float(q), int(n)) for s, q, n in ledgers[c]]
        assert epsilon_of(history, r.metrics["local_delta"]) > r.metrics["local_epsilon"]
