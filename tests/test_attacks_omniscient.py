"""The omniscient colluding adversary (fedloom.attacks.omniscient): hand-computed ALIE,
IPM and min-max from the round's honest updates, the interceptor seam of the strategy,
the refusals where the threat model cannot hold, and a small attacked run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.base import StageContext
from fedloom.attacks.omniscient import CRAFTED, REFERENCES, OmniscientAdversary
from fedloom.attacks.poisoning import alie_z_max, malicious_client_ids
from fedloom.config import AttackConfig, ConfigError, load_config
from fedloom.engine.simulation import run_simulation
from fedloom.messages import DELTA, FitResult
from fedloom.params import ParamEntry, ParamSpec
from fedloom.registry import UPDATE_INTERCEPTORS, load_builtins
from fedloom.server.aggregators import AGGREGATORS
from fedloom.server.optimizers import make_server_optimizer
from fedloom.server.strategy import Strategy
from fedloom.strategies import build_strategy, check_attack_knowledge

load_builtins()


def _result(cid: int, delta: list[float]) -> FitResult:
    return FitResult(
        client_id=cid,
        round=1,
        model_version=0,
        num_examples=10,
        vectors={DELTA: np.array(delta, np.float32)},
    )


def _oracle(kind: str, malicious: list[int], **params: Any) -> OmniscientAdversary:
    attack = AttackConfig(kind=kind, knowledge="omniscient", **params)  # type: ignore[arg-type]
    return OmniscientAdversary(attack, malicious=malicious)


# ----------------------------------------------------------------------------- crafting


def test_omniscient_alie_is_honest_mean_minus_z_sigma_by_hand() -> None:
    # Honest clients 0 and 1 send (1, 0) and (3, 2): mean (2, 1), population std (1, 1).
    # Client 2 is malicious; whatever it uploaded is replaced.
    updates = [_result(0, [1, 0]), _result(1, [3, 2]), _result(2, [100, 100])]
    out, fields = _oracle("alie", [2, 7], z=1.5).intercept(
        1, updates, global_weights=np.zeros(2, np.float32)
    )
    np.testing.assert_allclose(out[2].vectors[DELTA], [2 - 1.5, 1 - 1.5])
    np.testing.assert_array_equal(out[0].vectors[DELTA], [1, 0])  # honest ones untouched
    np.testing.assert_array_equal(out[1].vectors[DELTA], [3, 2])
    assert fields[CRAFTED] == [2] and fields[REFERENCES] == 2 and fields["attack_z"] == 1.5
    # Default z = z_max for the round's n = 3 updates and m = 1 malicious:
    # s = floor(3/2 + 1) - 1 = 1, z = Phi^-1(2/3) = 0.430727...
    out, fields = _oracle("alie", [2]).intercept(1, updates, global_weights=np.zeros(2))
    assert fields["attack_z"] == pytest.approx(0.4307273, abs=1e-6)
    np.testing.assert_allclose(out[2].vectors[DELTA], [2 - 0.4307273, 1 - 0.4307273], rtol=1e-6)


def test_omniscient_ipm_is_minus_epsilon_times_the_honest_mean() -> None:
    updates = [_result(0, [2, 4]), _result(1, [9, 9]), _result(3, [4, 0]), _result(5, [0, 0])]
    out, fields = _oracle("ipm", [1, 5], epsilon=0.5).intercept(
        1, updates, global_weights=np.zeros(2)
    )
    # Honest mean (3, 2): both colluders send -0.5 * (3, 2).
    for i in (1, 3):
        np.testing.assert_allclose(out[i].vectors[DELTA], [-1.5, -1.0])
    assert fields[CRAFTED] == [1, 5] and fields[REFERENCES] == 2


@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
def test_omniscient_min_max_stays_inside_the_honest_spread_with_maximal_gamma(
    perturbation: str,
) -> None:
    rng = np.random.default_rng(3)
    honest = rng.normal(size=(6, 5)).astype(np.float32)
    updates = [_result(i, list(honest[i])) for i in range(6)]
    updates.append(_result(6, [0.0] * 5))
    out, fields = _oracle("min_max", [6], perturbation=perturbation).intercept(
        1, updates, global_weights=np.zeros(5)
    )
    crafted = out[6].vectors[DELTA].astype(np.float64)
    refs = honest.astype(np.float64)
    spread = max(np.linalg.norm(a - b) for a in refs for b in refs)
    assert np.linalg.norm(crafted - refs, axis=1).max() <= spread + 1e-4
    # γ is maximal: a slightly larger step along the same direction leaves the spread.
    gamma = fields["attack_gamma"]
    assert gamma > 0
    mu = refs.mean(axis=0)
    direction = (crafted - mu) / gamma
    bigger = mu + (gamma + 1e-3) * direction
    assert np.linalg.norm(bigger - refs, axis=1).max() > spread


def test_a_round_without_malicious_clients_is_left_alone_and_all_malicious_uses_their_own() -> None:
    updates = [_result(0, [1, 0]), _result(1, [3, 2])]
    out, fields = _oracle("ipm", [5]).intercept(1, updates, global_weights=np.zeros(2))
    assert out is updates and fields == {CRAFTED: [], REFERENCES: 0}
    # Only colluders sampled: they craft from their own honest updates (what "own" has).
    out, fields = _oracle("ipm", [0, 1], epsilon=1.0).intercept(
        1, updates, global_weights=np.zeros(2)
    )
    np.testing.assert_allclose(out[0].vectors[DELTA], [-2, -1])
    assert fields[REFERENCES] == 2


# ----------------------------------------------------------------------------- the seam


class _Doubler:
    """An interceptor that doubles every update: the aggregate must show it."""

    name = "double"
    needs_individual_updates = True

    def intercept(
        self, rnd: int, updates: list[FitResult], *, global_weights: np.ndarray
    ) -> tuple[list[FitResult], dict[str, Any]]:
        doubled = [
            FitResult(
                client_id=u.client_id,
                round=u.round,
                model_version=u.model_version,
                num_examples=u.num_examples,
                vectors={DELTA: 2 * u.vectors[DELTA]},
            )
            for u in updates
        ]
        return doubled, {"doubled": len(doubled)}

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: Any) -> None:
        pass


def _strategy(**kw: Any) -> Strategy:
    from fedloom.algorithms.base import AlgorithmSettings
    from fedloom.registry import SERVER_ALGORITHMS

    cfg = load_config(None, ["server.lr=1.0"])
    context = StageContext(
        num_clients=2, spec=ParamSpec((ParamEntry("w", (2,)),)), seed=0, expected_clients=2.0
    )
    return Strategy(
        algorithm=SERVER_ALGORITHMS.create("fedavg", AlgorithmSettings(server_lr=1.0), context),
        aggregator=AGGREGATORS.create("mean", {}, context),
        optimizer=make_server_optimizer(cfg.server, 2),
        sampling=cfg.server,
        dimension=2,
        **kw,
    )


def test_the_strategy_aggregates_what_its_interceptors_return() -> None:
    strategy = _strategy(interceptors=[_Doubler()])
    updates = [_result(0, [1, 0]), _result(1, [3, 2])]
    out = strategy.process_fit(1, updates, np.zeros(2, np.float32), exchange=None)  # type: ignore[arg-type]
    assert out.aggregated and out.fields["doubled"] == 2
    np.testing.assert_allclose(out.weights, [4, 2])  # mean of the doubled (2,0), (6,4)


def test_an_interceptor_that_reads_updates_is_refused_with_secure_aggregation() -> None:
    class Secure:
        protocol = "x"

    with pytest.raises(ValueError, match=r"update interceptor 'double'.*secure aggregation"):
        _strategy(interceptors=[_Doubler()], secure=Secure())


# ----------------------------------------------------------------------------- refusals


def test_own_is_the_default_and_builds_no_interceptor() -> None:
    assert AttackConfig().knowledge == "own"
    assert "omniscient" in UPDATE_INTERCEPTORS
    spec = ParamSpec((ParamEntry("w", (2,)),))
    cfg = load_config(None, ["attack.kind='alie'"])
    strategy = build_strategy(cfg, num_clients=4, spec=spec, roles_in_process=True)
    assert strategy.interceptors == []
    cfg = load_config(None, ["attack.kind='alie'", "attack.knowledge='omniscient'"])
    strategy = build_strategy(cfg, num_clients=4, spec=spec, roles_in_process=True)
    assert [i.name for i in strategy.interceptors] == ["omniscient"]


@pytest.mark.parametrize(
    ("sets", "deployment", "needle"),
    [
        (["attack.kind='sign_flip'"], False, "applies to alie, ipm, min_max, min_sum"),
        ([], True, "simulation-only"),
        (["privacy.secure_aggregation='secagg+'"], False, "secure aggregation hides"),
        (["privacy.mechanism='central'"], False, "central DP"),
        (["compression.kind='topk'"], False, "compression"),
        (["mode='async'"], False, "mode = 'async'"),
    ],
)
def test_omniscient_is_refused_in_one_line_where_it_cannot_hold(
    sets: list[str], deployment: bool, needle: str
) -> None:
    base = ["attack.kind='ipm'", "attack.knowledge='omniscient'"]
    with pytest.raises(ConfigError) as err:
        check_attack_knowledge(load_config(None, [*base, *sets]), deployment=deployment)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_red_team_client_cannot_be_omniscient() -> None:
    from fedloom.cli.deploy import _red_team_attack

    args = argparse.Namespace(key_holder=False, attack="alie", attack_sets=["knowledge=omniscient"])
    with pytest.raises(ConfigError, match="red-team client process cannot see"):
        _red_team_attack(args)


# ----------------------------------------------------------------------------- end to end

BASE = [
    "data.partition='iid'",
    "data.num_clients=10",
    "client.epochs=2",
    "checkpoint_every=100",
    "rounds=3",
    "attack.kind='alie'",
    "attack.fraction=0.2",
]


@pytest.mark.parametrize("aggregator", ["median", "krum"])
def test_omniscient_alie_is_at_least_as_damaging_as_own(tmp_path: Path, aggregator: str) -> None:
    runs = {
        k: run_simulation(
            load_config(
                None, [*BASE, f"server.aggregator='{aggregator}'", f"attack.knowledge='{k}'"]
            ),
            tmp_path / k,
        )
        for k in ("own", "omniscient")
    }
    own, omni = runs["own"], runs["omniscient"]
    truth = malicious_client_ids(num_clients=10, fraction=0.2, seed=0)
    assert omni["attack"]["knowledge"] == "omniscient" and own["attack"]["knowledge"] == "own"
    for record in omni["history"]:
        # Every client is sampled each round: the oracle crafted for all the malicious ones,
        # from the 8 honest updates, with z_max for n = 10 and m = 2.
        assert record[CRAFTED] == truth and record[REFERENCES] == 8
        assert record["attack_z"] == pytest.approx(alie_z_max(10, 2))
    assert all(CRAFTED not in r for r in own["history"])
    assert omni["final"]["accuracy"] <= own["final"]["accuracy"]


def test_an_omniscient_colluder_uploads_its_honest_update() -> None:
    # The client half sends what it trained; only the server-side oracle forges.
    from tests.test_attacks import _clients, _ctx, _wrapper

    clients = _clients(20)
    attack = _wrapper("alie", clients, knowledge="omniscient")
    bad = attack.malicious[0]
    np.testing.assert_array_equal(attack.fit(_ctx(clients[bad])).vectors[DELTA], [bad, 2 * bad])
    own = _wrapper("alie", clients)
    assert not np.array_equal(own.fit(_ctx(clients[bad])).vectors[DELTA], [bad, 2 * bad])
