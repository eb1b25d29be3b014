"""Central DP (DP-FedAvg): clipping, noisy aggregation, adaptive clipping, noise, the round
loop with a privacy budget, resume, and a digits run that learns under ε ≤ 8."""

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.config import ConfigError, PrivacyConfig, RunConfig, load_config
from fedloom.engine.inprocess import LocalClients
from fedloom.engine.simulation import run_simulation
from fedloom.exchange import ExchangeRequest
from fedloom.messages import (
    DELTA,
    Broadcast,
    ClientFailure,
    EvalResult,
    EvalTask,
    FitResult,
    FitTask,
)
from fedloom.params import ParamEntry, ParamSpec
from fedloom.privacy.accounting import ClientSampling, PrivacyAccountant
from fedloom.privacy.central import (
    AdaptiveClipping,
    CentralDP,
    clip_update,
    noisy_average,
    split_noise_multiplier,
)
from fedloom.privacy.noise import (
    SecureGaussianNoise,
    SeededGaussianNoise,
    secure_box_muller,
    secure_uniform,
)
from fedloom.privacy.stages import CentralDPAggregator
from fedloom.seeding import SAMPLING, derive_rng
from fedloom.server.loop import FederatedServer
from fedloom.server.sampling import poisson_sample_clients, sample_clients, select_clients
from fedloom.store import RunStore
from fedloom.strategies import build_strategy

from .helpers import final_weights, interrupt_after, latest_checkpoint

# A small central-DP run: 60 logistic-regression clients, about 30 per round.
DP_SMALL = [
    "strategy=dp-fedavg",
    "data.num_clients=60",
    "data.partition=iid",
    "model.name=logreg",
    "client.epochs=1",
    "client.lr=0.3",
    "server.fraction_fit=0.5",
    "privacy.noise_multiplier=1.0",
    "rounds=5",
]


# ----------------------------------------------------------------------------- clipping


def test_clip_long_update_to_norm_c_same_direction() -> None:
    delta = np.array([3.0, 4.0, 0.0], dtype=np.float32)  # norm 5
    out = clip_update(delta, 1.0)
    norm = float(np.linalg.norm(out.delta.astype(np.float64)))
    assert norm <= 1.0 and norm == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(out.delta, [0.6, 0.8, 0.0], rtol=1e-5)
    assert out.norm == pytest.approx(5.0) and out.below_clip is False
    assert out.delta.dtype == np.float32


def test_clip_short_update_is_unchanged() -> None:
    delta = np.array([0.3, -0.4], dtype=np.float32)  # norm 0.5
    out = clip_update(delta, 1.0)
    np.testing.assert_array_equal(out.delta, delta)
    assert out.below_clip is True and out.norm == pytest.approx(0.5)


def test_clipped_float32_norm_never_exceeds_c() -> None:
    rng = np.random.default_rng(0)
    for scale in (1.0, 1e3, 1e6):
        delta = (scale * rng.standard_normal(10_000)).astype(np.float32)
        out = clip_update(delta, 0.7)
        assert float(np.linalg.norm(out.delta.astype(np.float64))) <= 0.7


def test_dp_aggregate_without_noise_is_sum_of_clipped_over_expected_count() -> None:
    updates = [
        np.array([3.0, 4.0], dtype=np.float32),  # clipped to norm 1
        np.array([0.3, -0.4], dtype=np.float32),  # within C: unchanged
        np.array([0.0, -10.0], dtype=np.float32),  # clipped to [0, -1]
    ]
    clipped = [clip_update(u, 1.0).delta for u in updates]
    expected_clients = 4.0  # q·N, not the 3 that took part
    out = noisy_average(clipped, 2, 1.0, 0.0, expected_clients, np.ones(2))
    by_hand = np.array([0.6 + 0.3 + 0.0, 0.8 - 0.4 - 1.0]) / 4.0
    np.testing.assert_allclose(out, by_hand, rtol=1e-5)
    exact = (sum(c.astype(np.float64) for c in clipped) / expected_clients).astype(np.float32)
    np.testing.assert_array_equal(out, exact)


def test_dp_noise_std_is_z_c_over_expected_clients() -> None:
    z, c, m, size = 1.1, 0.7, 50.0, 200_000
    noise = SeededGaussianNoise(seed=3)
    draws = np.concatenate(
        [noisy_average([], size, c, z, m, noise.standard_normal(size, r, 0)) for r in range(5)]
    )
    assert abs(float(draws.mean())) < 5 * z * c / m / math.sqrt(draws.size)
    assert float(draws.std()) == pytest.approx(z * c / m, rel=0.02)


# ------------------------------------------------------------------- adaptive clipping


def test_noise_split_follows_andrew_et_al_theorem_1() -> None:
    z, sigma_b = 1.0, 5.0
    z_delta = split_noise_multiplier(z, sigma_b)
    assert z_delta == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    assert z_delta > z
    with pytest.raises(ValueError):
        split_noise_multiplier(1.0, 0.5)  # needs 2σ_b > z


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clipping_converges_to_the_target_quantile(quantile: float) -> None:
    """Update norms ~ lognormal(1, 0.5); C starts 30x too small and must find the quantile."""
    m = 100
    rng = np.random.default_rng(0)
    clip = AdaptiveClipping(0.1, quantile, 0.2, clipped_count_stddev=m / 20, expected_clients=m)
    history = []
    for _ in range(400):
        norms = rng.lognormal(1.0, 0.5, size=m)
        clip.update(norms <= clip.clip_norm, float(rng.standard_normal()))
        history.append(clip.clip_norm)
    truth = float(np.quantile(rng.lognormal(1.0, 0.5, size=1_000_000), quantile))
    assert float(np.mean(history[-200:])) == pytest.approx(truth, rel=0.1)


def test_central_dp_uses_split_noise_and_default_count_stddev() -> None:
    cfg = PrivacyConfig(mechanism="central", noise_multiplier=1.0, adaptive_clipping=True)
    sampling = ClientSampling("poisson", 1000, 100)
    dp = CentralDP.from_config(cfg, sampling, rounds=10, seed=0)
    assert dp.adaptive is not None and dp.adaptive.clipped_count_stddev == 5.0  # m / 20
    assert dp.update_noise_multiplier == pytest.approx(split_noise_multiplier(1.0, 5.0))
    assert dp.noise_multiplier == 1.0  # the accountant is told the overall z
    small = ClientSampling("poisson", 100, 5)  # σ_b = 0.25 < z / 2
    with pytest.raises(ConfigError, match="clipped_count_stddev"):
        CentralDP.from_config(cfg, small, rounds=10, seed=0)


# ---------------------------------------------------------------------------- noise


def test_secure_noise_is_standard_normal_and_never_repeats() -> None:
    gen = SecureGaussianNoise()
    n = 1_000_000
    x = gen.standard_normal(n, 1, 0)
    assert x.shape == (n,) and x.dtype == np.float64
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    assert float(x.std()) == pytest.approx(1.0, abs=0.005)
    assert float(np.mean(np.abs(x) < 1.0)) == pytest.approx(0.6827, abs=0.003)
    assert float(np.mean(x**4)) == pytest.approx(3.0, abs=0.05)  # normal kurtosis
    assert not np.array_equal(gen.standard_normal(1000, 1, 0), gen.standard_normal(1000, 1, 0))
    bm = secure_box_muller(2 * n + 1)  # odd size, the Box–Muller pairs themselves
    assert bm.shape == (2 * n + 1,) and float(bm.std()) == pytest.approx(1.0, abs=0.005)
    u = secure_uniform(100_000)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0


def test_seeded_noise_is_reproducible_per_round_and_stream() -> None:
    a, b = SeededGaussianNoise(7), SeededGaussianNoise(7)
    np.testing.assert_array_equal(a.standard_normal(500, 3, 0), b.standard_normal(500, 3, 0))
    assert not np.array_equal(a.standard_normal(500, 3, 0), a.standard_normal(500, 4, 0))
    assert not np.array_equal(a.standard_normal(500, 3, 0), a.standard_normal(500, 3, 1))
    assert not np.array_equal(
        a.standard_normal(500, 3, 0), SeededGaussianNoise(8).standard_normal(500, 3, 0)
    )


# ------------------------------------------------------------------------- sampling


def test_poisson_sampling_is_deterministic_and_has_rate_q() -> None:
    first = poisson_sample_clients(10_000, 0.1, derive_rng(0, SAMPLING, 1))
    again = poisson_sample_clients(10_000, 0.1, derive_rng(0, SAMPLING, 1))
    np.testing.assert_array_equal(first, again)
    assert np.all(np.diff(first) > 0)
    assert abs(len(first) - 1000) < 4 * math.sqrt(10_000 * 0.1 * 0.9)
    sizes = {len(poisson_sample_clients(20, 0.05, derive_rng(0, SAMPLING, r))) for r in range(50)}
    assert 0 in sizes and len(sizes) > 1  # the size varies and may be zero


def test_fixed_sampling_is_unchanged() -> None:
    cfg = load_config(None, ["server.fraction_fit=0.3"])
    for rnd in range(1, 4):
        np.testing.assert_array_equal(
            select_clients(cfg.server, 20, derive_rng(0, SAMPLING, rnd)),
            sample_clients(20, 0.3, 2, derive_rng(0, SAMPLING, rnd)),
        )


# --------------------------------------------------------------------------- config


def test_dp_fedavg_strategy_turns_on_central_dp_with_poisson_sampling() -> None:
    cfg = load_config(None, ["strategy=dp-fedavg", "privacy.noise_multiplier=1.0"])
    assert cfg.privacy.mechanism == "central" and cfg.server.sampling == "poisson"
    assert cfg.server.optimizer == "sgd" and cfg.server.lr == 1.0
    mine = load_config(
        None, ["strategy=dp-fedavg", "privacy.target_epsilon=4", "server.sampling=fixed"]
    )
    assert mine.server.sampling == "fixed" and mine.privacy.mechanism == "central"
    from fedloom.config import config_from_dict

    assert config_from_dict(mine.to_dict()) == mine  # a stored run config validates again


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["privacy.mechanism=central"], "needs privacy.noise_multiplier or privacy.target_epsilon"),
        (
            ["strategy=dp-fedavg", "privacy.noise_multiplier=1", "privacy.target_epsilon=2"],
            "not both",
        ),
        (["privacy.noise_multiplier=1.0"], "privacy.mechanism is 'none'"),
        (
            ["privacy.mechanism=central", "privacy.noise_multiplier=1", "privacy.accountant=pld"],
            "server.sampling = 'poisson'",
        ),
        (
            ["privacy.secure_aggregation=secagg+", "engine.name=pool"],
            "engine.name = 'inprocess'",
        ),
        (["privacy.delta=1.5"], "config key 'privacy.delta'"),
        (["server.sampling=random"], "config key 'server.sampling'"),
    ],
)
def test_privacy_config_errors_are_one_line(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- the server round loop


class _FixedUpdates(LocalClients):
    """An executor whose clients return preset updates (clipped the way a client would)."""

    def __init__(
        self, deltas: dict[int, np.ndarray], clip: bool = True, fail: frozenset[int] = frozenset()
    ) -> None:
        self.deltas, self.clip, self.fail = deltas, clip, fail
        self.tasks: list[FitTask] = []

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast
    ) -> list[FitResult | ClientFailure]:
        out: list[FitResult | ClientFailure] = []
        for t in tasks:
            self.tasks.append(t)
            if t.client_id in self.fail:
                out.append(
                    ClientFailure(
                        client_id=t.client_id, round=t.round, error="RuntimeError: offline"
                    )
                )
                continue
            delta = self.deltas[t.client_id]
            metrics: dict[str, float] = {}
            clip_norm = t.config.get("clip_norm")
            if self.clip and clip_norm is not None:
                c = clip_update(delta, float(clip_norm))
                delta, metrics = c.delta, {"below_clip": float(c.below_clip)}
            out.append(
                FitResult(
                    client_id=t.client_id,
                    round=t.round,
                    model_version=t.model_version,
                    num_examples=10 * (t.client_id + 1),
                    vectors={DELTA: delta},
                    metrics=metrics,
                )
            )
        return out

    def evaluate(
        self, tasks: Sequence[EvalTask], broadcast: Broadcast
    ) -> list[EvalResult | ClientFailure]:
        return []

    def exchange(self, request: ExchangeRequest, outgoing: Any) -> dict[int, bytes]:
        raise AssertionError("no protocol runs in these rounds")

    def save_client_state(self) -> dict[str, Any]:
        return {}

    def load_client_state(self, manifest: Any) -> None:
        return None

    def close(self) -> None:
        return None


def _server(
    cfg: RunConfig, executor: _FixedUpdates, dimension: int, num_clients: int
) -> FederatedServer:
    """The round loop over ``cfg``'s strategy for a model of ``dimension`` zeros."""
    spec = ParamSpec((ParamEntry("w", (dimension,)),))
    strategy = build_strategy(cfg, num_clients=num_clients, spec=spec, roles_in_process=True)
    return FederatedServer(
        strategy=strategy,
        executor=executor,
        initial_weights=np.zeros(dimension, np.float32),
        num_clients=num_clients,
        rounds=cfg.rounds,
        seed=cfg.seed,
        callbacks=strategy.callbacks,
    )


def _mechanism(server: FederatedServer) -> Any:
    """The central-DP mechanism (accountant, clipping norm) the strategy aggregates with."""
    aggregator = server.strategy.aggregator
    assert isinstance(aggregator, CentralDPAggregator)
    return aggregator.dp


def test_server_aggregates_unweighted_clipped_sum_over_expected_count() -> None:
    """Tiny z: the update is Σ clip(Δ_k) / (qN), every client weighted 1, and the
    denominator stays the expected count when a client fails."""
    cfg = load_config(
        None,
        [
            "privacy.mechanism=central",
            "privacy.noise_multiplier=1e-9",
            "privacy.clipping_norm=1.0",
            "data.num_clients=5",
            "server.fraction_fit=1.0",
            "rounds=1",
        ],
    )
    deltas = {
        0: np.array([3.0, 4.0], np.float32),
        1: np.array([0.3, -0.4], np.float32),
        2: np.array([0.0, 0.5], np.float32),
        3: np.array([-2.0, 0.0], np.float32),
        4: np.array([1.0, 1.0], np.float32),
    }
    executor = _FixedUpdates(deltas, fail=frozenset({4}))
    server = _server(cfg, executor, 2, 5)
    server.run()
    by_hand = np.array([0.6 + 0.3 + 0.0 - 1.0, 0.8 - 0.4 + 0.5 + 0.0]) / 5.0
    np.testing.assert_allclose(server.state.weights, by_hand, atol=1e-6)
    assert executor.tasks and all(t.config["clip_norm"] == 1.0 for t in executor.tasks)
    rec = server.state.history[0]
    assert rec["aggregated"] and rec["clip_norm"] == 1.0 and rec["clients_failed"] == 1
    expected_eps = PrivacyAccountant("rdp", ClientSampling("fixed", 5, 5), 1e-9, 1e-5).epsilon(1)
    assert rec["epsilon"] == expected_eps


def test_server_rejects_an_unclipped_update_as_a_failure() -> None:
    cfg = load_config(
        None,
        ["strategy=dp-fedavg", "privacy.noise_multiplier=1.0", "data.num_clients=3"],
    )
    cfg.server.fraction_fit = 1.0
    deltas = {i: np.full(4, 2.0, np.float32) for i in range(3)}  # norm 4 > C = 1
    server = _server(cfg, _FixedUpdates(deltas, clip=False), 4, 3)
    rec = server.run_round(1)
    assert rec["clients_failed"] == 3 and rec["clients_succeeded"] == 0
    assert rec["epsilon"] is not None and rec["epsilon"] > 0  # the noise release is counted


def test_poisson_round_with_no_clients_releases_noise_and_is_counted() -> None:
    cfg = load_config(
        None,
        [
            "strategy=dp-fedavg",
            "privacy.noise_multiplier=1.0",
            "data.num_clients=20",
            "server.fraction_fit=0.05",
        ],
    )
    empty = next(
        r
        for r in range(1, 200)
        if len(select_clients(cfg.server, 20, derive_rng(cfg.seed, SAMPLING, r))) == 0
    )
    server = _server(cfg, _FixedUpdates({}), 8, 20)
    dp = _mechanism(server)
    dp.accountant.rounds = empty - 1
    rec = server.run_round(empty)
    assert rec["clients_sampled"] == 0 and rec["aggregated"]
    assert dp.accountant.rounds == empty
    assert rec["epsilon"] == dp.accountant.epsilon(empty)
    # The mechanism released noise of std z·C/(qN) = 1.0 on every coordinate.
    assert float(np.abs(server.state.weights).max()) > 0.0

    plain = load_config(None, ["server.sampling=poisson", "server.fraction_fit=0.05"])
    plain.data.num_clients = 20
    server = _server(plain, _FixedUpdates({}), 8, 20)
    rec = server.run_round(empty)
    assert rec["clients_sampled"] == 0 and not rec["aggregated"] and rec["epsilon"] is None
    np.testing.assert_array_equal(server.state.weights, np.zeros(8, np.float32))


# ------------------------------------------------------------- runs: budget and resume


def test_max_epsilon_stops_cleanly_before_the_round_that_would_exceed_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probe = load_config(None, DP_SMALL)
    sampling = ClientSampling("poisson", 60, 30)
    acc = PrivacyAccountant("rdp", sampling, 1.0, probe.privacy.delta)
    budget = (acc.epsilon(3) + acc.epsilon(4)) / 2
    overrides = [
        *DP_SMALL,
        "rounds=10",
        f"privacy.max_epsilon={budget}",
        "eval.every=5",
        "checkpoint_every=2",
    ]
    summary = run_simulation(load_config(None, overrides), tmp_path / "run")
    assert [r["round"] for r in summary["history"]] == [1, 2, 3]
    assert summary["history"][-1]["epsilon"] == acc.epsilon(3) <= budget
    assert summary["final"]["accuracy"] is not None  # the last round was evaluated
    reason = summary["stopped_reason"]
    assert reason.startswith("privacy budget reached: round 4 would bring ε to")
    assert "\n" not in reason and reason in caplog.text
    assert summary["privacy"]["rounds"] == 3 and summary["privacy"]["epsilon"] == acc.epsilon(3)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["stopped_reason"] == reason
    with RunStore.open(tmp_path / "run") as store:
        assert store.get_meta("stopped_reason") == reason
    assert latest_checkpoint(tmp_path / "run").round == 3  # checkpointed although 3 % 2 != 0


@pytest.mark.parametrize("adaptive", [False, True])
def test_resume_keeps_the_ledger_and_the_model(tmp_path: Path, adaptive: bool) -> None:
    overrides = [
        *DP_SMALL,
        "checkpoint_every=2",
        f"privacy.adaptive_clipping={str(adaptive).lower()}",
    ]
    whole = run_simulation(load_config(None, overrides), tmp_path / "whole")
    interrupt_after(load_config(None, overrides), tmp_path / "cut", 3)
    resumed = run_simulation(load_config(None), tmp_path / "cut", resume=True)

    np.testing.assert_array_equal(
        final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole")
    )
    for key in ("epsilon", "clip_norm", "accuracy"):
        assert [r[key] for r in resumed["history"]] == [r[key] for r in whole["history"]], key
    assert resumed["privacy"] == whole["privacy"]
    assert resumed["privacy"]["rounds"] == 5
    clip_norms = [r["clip_norm"] for r in whole["history"]]
    assert (len(set(clip_norms)) > 1) == adaptive  # adaptive C moved, and was checkpointed
    # The mechanism's state travels in the checkpoint as the aggregator stage's state.
    stage = latest_checkpoint(tmp_path / "cut").meta["stages"]["agg/privacy"]
    assert stage["rounds"] == 5 and stage["noise_multiplier"] == 1.0


def test_resume_with_secure_noise_counts_replayed_rounds_again(tmp_path: Path) -> None:
    """Fresh noise on a replayed round is a second release of the same data: counted."""
    overrides = [*DP_SMALL, "checkpoint_every=2", "privacy.secure_noise=true"]
    interrupt_after(load_config(None, overrides), tmp_path / "cut", 3)
    resumed = run_simulation(load_config(None), tmp_path / "cut", resume=True)
    acc = PrivacyAccountant("rdp", ClientSampling("poisson", 60, 30), 1.0, 1e-5)
    assert resumed["privacy"]["rounds"] == 6 and resumed["privacy"]["secure_noise"] is True
    assert resumed["history"][-1]["epsilon"] == acc.epsilon(6)


def test_target_epsilon_calibrates_and_is_recorded(tmp_path: Path) -> None:
    overrides = [*DP_SMALL[:-2], "privacy.target_epsilon=6", "rounds=4"]
    summary = run_simulation(load_config(None, overrides), tmp_path / "run")
    ledger = summary["privacy"]
    assert ledger["target_epsilon"] == 6.0 and ledger["rounds"] == 4
    assert ledger["epsilon"] <= 6.0 and ledger["epsilon"] == summary["history"][-1]["epsilon"]
    acc = PrivacyAccountant(
        "rdp", ClientSampling("poisson", 60, 30), 0.98 * ledger["noise_multiplier"], 1e-5
    )
    assert acc.epsilon(4) > 6.0
    assert ledger["sampling"] == "poisson" and ledger["sampling_rate"] == 0.5
    assert ledger["accountant"] == "rdp" and ledger["clipping_norm"] == 1.0
    with RunStore.open(tmp_path / "run") as store:
        assert store.get_meta("privacy") == ledger
    header = (tmp_path / "run" / "history.csv").read_text().splitlines()[0].split(",")
    assert "epsilon" in header and "clip_norm" in header


def test_pool_engine_clips_with_the_configured_norm(tmp_path: Path) -> None:
    """The pool clips with the norm the task config carries, exactly as in-process."""
    base = [*DP_SMALL, "rounds=2"]
    inproc = run_simulation(load_config(None, base), tmp_path / "inproc")
    pool = run_simulation(
        load_config(None, [*base, "engine.name=pool", "engine.workers=2"]), tmp_path / "pool"
    )
    assert all(r["clients_failed"] == 0 for r in pool["history"])
    np.testing.assert_allclose(
        final_weights(tmp_path / "pool"), final_weights(tmp_path / "inproc"), atol=1e-5
    )
    assert pool["privacy"]["epsilon"] == inproc["privacy"]["epsilon"]


def test_centralized_baseline_ignores_client_clipping() -> None:
    from fedloom.engine.simulation import run_centralized

    cfg = load_config(None, [*DP_SMALL, "rounds=2"])
    assert run_centralized(cfg)["accuracy"] > 0.5


# ------------------------------------------------------------------- digits learns


DIGITS_DP = [
    "strategy=dp-fedavg",
    "data.name=digits",
    "data.partition=iid",
    "data.num_clients=700",  # about 2 examples per client
    "model.name=logreg",
    "client.epochs=1",
    "client.lr=0.3",
    "server.fraction_fit=0.15",  # Poisson, q·N = 105 clients per round
    "server.lr=2.0",
    "privacy.clipping_norm=1.0",
    "privacy.target_epsilon=8",
    "privacy.delta=1e-5",
    "rounds=100",
    "eval.every=25",
]


def test_digits_learns_under_central_dp_with_epsilon_8(tmp_path: Path) -> None:
    summary = run_simulation(load_config(None, DIGITS_DP), tmp_path / "run")
    history = summary["history"]
    assert len(history) == 100
    assert np.mean([r["clients_sampled"] for r in history]) >= 100
    assert history[-1]["epsilon"] <= 8.0 and summary["privacy"]["delta"] == 1e-5
    assert summary["final"]["accuracy"] >= 0.90


def test_adaptive_clipping_on_the_pool_equals_inprocess(tmp_path: Path) -> None:
    """The pool forwards each round's clipping norm, so adaptive clipping runs there too."""
    base = [
        "rounds=3",
        "data.num_clients=12",
        "client.epochs=1",
        "strategy=dp-fedavg",
        "privacy.noise_multiplier=0.5",
        "privacy.adaptive_clipping=true",
        "privacy.clipped_count_stddev=2.0",
    ]
    runs = {}
    for name, extra in (("inproc", []), ("pool", ["engine.name=pool", "engine.workers=2"])):
        summary = run_simulation(load_config(None, [*base, *extra]), tmp_path / name)
        runs[name] = (summary, final_weights(tmp_path / name))
    clips = [[r["clip_norm"] for r in runs[n][0]["history"]] for n in runs]
    assert clips[0] == pytest.approx(clips[1]) and len(set(clips[0])) > 1  # C adapts
    np.testing.assert_allclose(runs["pool"][1], runs["inproc"][1], atol=1e-5)
