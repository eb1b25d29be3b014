"""Local (example-level) DP on clients: DP-SGD through Opacus (fedloom.client.dpsgd)."""

from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

import fedloom.client.dpsgd as dpsgd_mod
import fedloom.client.trainer as trainer_mod
from fedloom.client.dpsgd import SecureNoiseDPOptimizer, check_opacus_compatible, local_delta
from fedloom.client.models import CharLSTM
from fedloom.client.trainer import LocalTrainer, plan_work
from fedloom.config import ConfigError, RunConfig, load_config
from fedloom.data import build_federated_dataset
from fedloom.engine.inprocess import InProcessExecutor
from fedloom.engine.pool import ProcessPoolExecutor
from fedloom.engine.simulation import run_simulation
from fedloom.messages import FitResult, FitTask
from fedloom.store import RunStore

from .helpers import interrupt_after, latest_checkpoint, toy_dataset


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


def _dp_accounting_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


def test_epsilon_matches_accountants_and_composes_over_rounds() -> None:
    cfg = _cfg()
    trainer = LocalTrainer(cfg, toy_dataset(clients=3))
    w = trainer.initial_vector()
    # n = 40, B = 8: q = 1/5 and 5 steps per epoch, 2 epochs: 10 steps per round.
    r1 = trainer.fit(FitTask(1, 1), w)
    delta = local_delta(cfg, 40)
    assert delta == pytest.approx(min(cfg.privacy.delta, 1 / 400))
    assert r1.metrics["local_delta"] == delta
    assert r1.metrics["steps"] == 10 and r1.metrics["local_sample_rate"] == pytest.approx(0.2)
    eps1 = r1.metrics["local_epsilon"]
    opacus = RDPAccountant()
    opacus.history = [(1.1, 0.2, 10)]
    assert eps1 == pytest.approx(opacus.get_epsilon(delta), rel=1e-9)
    assert eps1 == pytest.approx(_dp_accounting_epsilon(1.1, 0.2, 10, delta), rel=0.01)

    # Another client's training does not touch client 1's ledger.
    trainer.fit(FitTask(2, 2), w)
    r2 = trainer.fit(FitTask(1, 3), w)
    eps2 = r2.metrics["local_epsilon"]
    assert eps2 > eps1
    assert eps2 == pytest.approx(_dp_accounting_epsilon(1.1, 0.2, 20, delta), rel=0.01)
    assert trainer.local_dp is not None
    assert trainer.local_dp.histories[1] == [(1.1, 0.2, 20)]
    assert trainer.local_dp.epsilon(0, delta) == 0.0  # never trained

    # The ledger is plain data and round-trips (for checkpoints).
    fresh = LocalTrainer(cfg, toy_dataset(clients=3))
    assert fresh.local_dp is not None
    fresh.local_dp.restore_ledger(trainer.local_dp.ledger())
    assert fresh.local_dp.epsilon(1, delta) == pytest.approx(eps2, rel=1e-12)


def test_deterministic_per_seed_client_round() -> None:
    cfg = _cfg()
    a, b = LocalTrainer(cfg, toy_dataset(clients=3)), LocalTrainer(cfg, toy_dataset(clients=3))
    w = a.initial_vector()
    ra, rb = a.fit(FitTask(1, 4), w), b.fit(FitTask(1, 4), w)
    assert ra.delta is not None and rb.delta is not None
    np.testing.assert_array_equal(ra.delta, rb.delta)
    other = a.fit(FitTask(1, 5), w)
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
    trainer = LocalTrainer(cfg, toy_dataset(clients=3))
    w = trainer.initial_vector()
    norms = []
    for rnd in range(4):
        r = trainer.fit(FitTask(0, rnd), w)
        assert r.delta is not None and r.metrics["steps"] == 1
        norms.append(float(np.linalg.norm(r.delta)))
    expected = lr * sigma * clip * np.sqrt(w.size) / bs
    # Signal is at most lr·C·(batch size)/B ≈ lr, far below the noise (≈ 57 here).
    assert np.mean(norms) == pytest.approx(expected, rel=0.1)


def test_stragglers_train_less_and_spend_less_epsilon() -> None:
    cfg = _cfg("client.epochs=3", "client.straggler_fraction=1.0")
    trainer = LocalTrainer(cfg, toy_dataset(clients=3))
    task = FitTask(1, 1)
    plan = plan_work(cfg.client, cfg.seed, task, 40)
    assert plan.straggler and plan.epochs < 3
    r = trainer.fit(task, trainer.initial_vector())
    assert r.straggler and r.metrics["steps"] == 5 * plan.epochs
    opacus = RDPAccountant()
    opacus.history = [(1.1, 0.2, 5 * plan.epochs)]
    assert r.metrics["local_epsilon"] == pytest.approx(opacus.get_epsilon(local_delta(cfg, 40)))


def test_local_dp_then_central_clipping_and_fedprox() -> None:
    cfg = _cfg(
        "privacy.mechanism='central'",
        "privacy.noise_multiplier=1.0",
        "privacy.clipping_norm=0.01",
    )
    trainer = LocalTrainer(cfg, toy_dataset(clients=3))
    r = trainer.fit(FitTask(1, 1), trainer.initial_vector())
    assert r.delta is not None and np.linalg.norm(r.delta) <= 0.01 * (1 + 1e-5)
    assert r.metrics["local_epsilon"] > 0 and r.metrics["below_clip"] == 0.0

    plain, prox = (
        LocalTrainer(_cfg(), toy_dataset(clients=3)),
        LocalTrainer(_cfg("client.proximal_mu=1.0"), toy_dataset(clients=3)),
    )
    w = plain.initial_vector()
    d0, d1 = plain.fit(FitTask(1, 1), w).delta, prox.fit(FitTask(1, 1), w).delta
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


def test_unsupported_layer_is_refused_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_mod, "build_model", lambda *args: _BNNet())
    with pytest.raises(ConfigError) as err:
        LocalTrainer(_cfg(), toy_dataset(clients=3))
    msg = str(err.value)
    assert "\n" not in msg and "'bn1' (BatchNorm1d)" in msg and "GroupNorm" in msg
    # The same model trains normally without local DP.
    LocalTrainer(load_config(None, ["client.batch_size=8"]), toy_dataset(clients=3))

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
        a, b = LocalTrainer(cfg, toy_dataset(clients=3)), LocalTrainer(cfg, toy_dataset(clients=3))
        w = a.initial_vector()
        results[secure] = (a.fit(FitTask(1, 4), w), b.fit(FitTask(1, 4), w), a)
    (seeded_a, seeded_b, seeded_trainer), (secure_a, secure_b, secure_trainer) = (
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
    assert seeded_trainer.local_dp is not None and secure_trainer.local_dp is not None
    assert secure_trainer.local_dp.ledger() == seeded_trainer.local_dp.ledger()


# ------------------------------------------------------------------ pool engine

POOL_DP = ["data.num_clients=4", "client.epochs=1", "privacy.local_dp=true"]


def test_pool_ships_each_clients_ledger_to_whichever_worker_trains_it() -> None:
    """Per-client ε and Δ on the pool equal the in-process ones, bit for bit."""
    cfg = load_config(None, POOL_DP)
    data = build_federated_dataset(cfg.data, cfg.seed)
    sizes = data.client_sizes().tolist()
    small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
    inproc = InProcessExecutor(LocalTrainer(cfg, data))
    w = inproc.trainer.initial_vector()
    pool = ProcessPoolExecutor(cfg, sizes, workers=2)
    try:
        # Tasks go out largest client first, to worker 0, then 1: `small` trains on
        # worker 0, then on worker 1 (beside `big`), then on worker 0 again, where a
        # per-worker ledger would have missed its second round.
        for rnd, clients in enumerate([[small], [big, small], [small]], start=1):
            tasks = [FitTask(c, rnd) for c in clients]
            for a, b in zip(inproc.fit(tasks, w), pool.fit(tasks, w), strict=True):
                assert isinstance(a, FitResult) and isinstance(b, FitResult)
                assert a.delta is not None and b.delta is not None
                assert b.metrics == a.metrics  # local_epsilon included, exactly
                np.testing.assert_array_equal(b.delta, a.delta)
        state = pool.client_state()
        assert state == inproc.client_state()
        assert set(state["local_dp"]) == {str(small), str(big)}

        # A restored pool continues from the restored ledger, not from its workers'.
        pool.restore_client_state({})
        (fresh,) = pool.fit([FitTask(small, 9)], w)
        assert isinstance(fresh, FitResult)
        first = LocalTrainer(cfg, data).fit(FitTask(small, 9), w)
        assert fresh.metrics["local_epsilon"] == first.metrics["local_epsilon"]
    finally:
        pool.close()


def _final_checkpoint(run_dir: Path) -> tuple[np.ndarray, dict]:
    ckpt = latest_checkpoint(run_dir)
    return ckpt.tensors["global"], ckpt.meta["client_state"]


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
    assert ledgers == expected_ledgers and len(ledgers["local_dp"]) >= 3
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

    trainer = LocalTrainer(cfg, build_federated_dataset(cfg.data, cfg.seed))
    w0 = trainer.initial_vector()
    results = [trainer.fit(FitTask(c, 1), w0) for c in range(4)]
    with RunStore.open(tmp_path / "run") as store:
        round1 = store.load_checkpoint(store.checkpoint_path(1))
        last = store.latest_checkpoint()
    assert last is not None
    step = 4.0 / (2**15 - 1)  # quantization step of the default 16 bits over [-4, 4]
    expected = w0 + np.mean([r.delta for r in results], axis=0)
    np.testing.assert_allclose(round1.tensors["global"], expected, atol=step)
    # Every client reported its ε, and its ledger goes on composing over the rounds.
    ledgers = last.meta["client_state"]["local_dp"]
    assert set(ledgers) == {"0", "1", "2", "3"}
    assert trainer.local_dp is not None
    trainer.local_dp.restore_ledger(ledgers)
    for c, r in enumerate(results):
        assert r.metrics["local_epsilon"] > 0
        assert trainer.local_dp.epsilon(c, r.metrics["local_delta"]) > r.metrics["local_epsilon"]
