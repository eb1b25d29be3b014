"""Poisoning attacks (fedloom.attacks.poisoning) and their metrics (fedloom.attacks.metrics):
hand-computed crafting, the wrapper around the honest client algorithm, config checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.base import ClientContext, ClientUpdate, StageContext
from fedloom.attacks.metrics import (
    BackdoorAccuracy,
    FlaggedPrecisionRecall,
    attack_callbacks,
    precision_recall,
)
from fedloom.attacks.poisoning import (
    MaliciousClient,
    alie_update,
    alie_z_max,
    apply_trigger,
    flip_labels,
    ipm_update,
    malicious_client_ids,
    min_max_update,
    poison_backdoor,
    triggered_test_set,
)
from fedloom.callbacks import RunContext
from fedloom.client.learner import SGDSettings, WorkPlan, WorkSettings
from fedloom.client_store import ClientState
from fedloom.config import AttackConfig, ConfigError, load_config
from fedloom.data.base import ArrayDataset, ClientData
from fedloom.messages import DELTA, GLOBAL
from fedloom.params import ParamEntry, ParamSpec
from fedloom.server.callbacks import ServerTestBench
from fedloom.strategies import build_client_runtime, build_learner, build_strategy

# ----------------------------------------------------------------------------- choice


def test_malicious_clients_are_a_fixed_draw_of_the_seed() -> None:
    ids = malicious_client_ids(num_clients=20, fraction=0.2, seed=0)
    assert len(ids) == 4 and ids == sorted(set(ids)) and all(0 <= i < 20 for i in ids)
    assert ids == malicious_client_ids(num_clients=20, fraction=0.2, seed=0)
    assert ids != malicious_client_ids(num_clients=20, fraction=0.2, seed=1)
    assert malicious_client_ids(num_clients=20, fraction=0.0, seed=0) == []
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        malicious_client_ids(num_clients=20, fraction=1.0, seed=0)


# ----------------------------------------------------------------------------- crafting


def test_alie_z_max_matches_the_paper_formula_by_hand() -> None:
    # n = 20, m = 4: s = floor(20/2 + 1) - 4 = 7, z = Phi^-1((20 - 7) / 20) = Phi^-1(0.65).
    assert alie_z_max(20, 4) == pytest.approx(0.38532, abs=1e-5)
    # n = 50, m = 12 (Baruch et al.'s 24 %): s = 26 - 12 = 14, Phi^-1(36/50) = Phi^-1(0.72).
    assert alie_z_max(50, 12) == pytest.approx(0.58284, abs=1e-5)


def test_alie_moves_each_coordinate_z_standard_deviations_off_the_mean() -> None:
    refs = np.array([[0.0, 2.0], [2.0, 2.0]], np.float32)  # mu = (1, 2), sigma = (1, 0)
    np.testing.assert_allclose(alie_update(refs, 1.5), [-0.5, 2.0])


def test_ipm_sends_minus_epsilon_times_the_mean() -> None:
    refs = np.array([[1.0, -2.0], [3.0, 4.0]], np.float32)  # mean (2, 1)
    np.testing.assert_allclose(ipm_update(refs, 0.5), [-1.0, -0.5])


def test_min_max_and_min_sum_find_the_hand_computed_gamma() -> None:
    # References 0, 1, 5 on the first axis: mu = 2, unit perturbation -1, so
    # grad_m = 2 - gamma. Min-max: max_i |2 - gamma - x_i| = 3 + gamma <= max pair 5
    # -> gamma = 2. Min-sum: (2-g)^2 + (1-g)^2 + (3+g)^2 = 14 + 3g^2 <= max_i sum_j = 41
    # -> gamma = 3.
    refs = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]], np.float32)
    upd, gamma = min_max_update(refs, objective="min_max", perturbation="unit")
    assert gamma == pytest.approx(2.0, abs=1e-4)
    np.testing.assert_allclose(upd, [0.0, 0.0], atol=1e-4)
    upd, gamma = min_max_update(refs, objective="min_sum", perturbation="unit")
    assert gamma == pytest.approx(3.0, abs=1e-4)
    np.testing.assert_allclose(upd, [-1.0, 0.0], atol=1e-4)


def test_label_flip_maps_y_to_c_minus_1_minus_y() -> None:
    data = ArrayDataset(np.zeros((3, 2), np.float32), np.array([0, 3, 9]))
    np.testing.assert_array_equal(flip_labels(data, 10).y, [9, 6, 0])


def test_trigger_is_a_bottom_right_patch_and_the_test_set_skips_the_target() -> None:
    x = np.zeros((2, 64), np.float32)
    img = apply_trigger(x, size=3, value=1.0).reshape(2, 8, 8)
    assert img[:, 5:, 5:].min() == 1.0 and img.sum() == 2 * 9
    assert x.sum() == 0  # a copy
    test = ArrayDataset(np.zeros((4, 64), np.float32), np.array([0, 1, 2, 0]))
    trig = triggered_test_set(test, AttackConfig(kind="backdoor", target_label=0))
    assert len(trig) == 2 and set(trig.y.tolist()) == {0}
    with pytest.raises(ConfigError, match="square"):
        apply_trigger(np.zeros((1, 60), np.float32), size=2, value=1.0)


def test_backdoor_poisons_the_configured_share_with_the_target_label() -> None:
    train = ArrayDataset(np.zeros((10, 64), np.float32), np.full(10, 7))
    cfg = AttackConfig(kind="backdoor", target_label=2, poison_fraction=0.3)
    out = poison_backdoor(train, cfg, seed=0, client_id=1)
    poisoned = out.y == 2
    assert poisoned.sum() == 3
    assert (out.x[poisoned].reshape(3, 8, 8)[:, 5:, 5:] == 1.0).all()
    assert out.x[~poisoned].sum() == 0


# ----------------------------------------------------------------------------- the wrapper


class FakeHonest:
    """An honest algorithm whose update is the mean of the client's features, plus a
    second upload that attacks must not touch."""

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        delta = ctx.data.train.x.mean(axis=0).astype(np.float32)
        return ClientUpdate({DELTA: delta, "control": np.ones(2, np.float32)}, {"steps": 1.0})

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        return {}


def _clients(n: int) -> list[ClientData]:
    # Client c's features are all (c, 2c): its FakeHonest update is (c, 2c).
    out = []
    for c in range(n):
        x = np.tile(np.array([[c, 2 * c]], np.float32), (4, 1))
        out.append(ClientData(c, f"c{c}", ArrayDataset(x, np.zeros(4, np.int64))))
    return out


def _wrapper(kind: str, clients: list[ClientData], **params: Any) -> MaliciousClient:
    attack = AttackConfig(kind=kind, fraction=0.2, **params)  # type: ignore[arg-type]
    context = StageContext(
        num_clients=len(clients),
        spec=ParamSpec((ParamEntry("w", (2,)),)),
        seed=0,
        expected_clients=float(len(clients)),
    )
    return MaliciousClient(
        honest=FakeHonest(),
        attack=attack,
        malicious=malicious_client_ids(num_clients=len(clients), fraction=0.2, seed=0),
        context=context,
        server_lr=1.0,
        data_of=lambda cid: clients[cid],
    )


def _ctx(client: ClientData, rnd: int = 1) -> ClientContext:
    return ClientContext(
        client_id=client.client_id,
        round=rnd,
        config={},
        broadcast={GLOBAL: np.zeros(2, np.float32)},
        data=client,
        learner=None,  # type: ignore[arg-type]
        state=ClientState(),
        seed=0,
        work=WorkSettings(epochs=1, steps=None, batch_size=4, straggler_fraction=0.0),
        sgd=SGDSettings(lr=0.1, momentum=0.0, weight_decay=0.0),
        plan=WorkPlan(1, None, straggler=False),
    )


def test_sign_flip_and_scale_forge_only_the_malicious_clients_delta() -> None:
    clients = _clients(20)
    flip = _wrapper("sign_flip", clients, factor=3.0)
    scale = _wrapper("scale", clients, factor=3.0)
    bad = flip.malicious[0]
    good = next(c for c in range(20) if c not in flip.malicious)
    out = flip.fit(_ctx(clients[bad]))
    np.testing.assert_allclose(out.vectors[DELTA], [-3.0 * bad, -6.0 * bad])
    np.testing.assert_array_equal(out.vectors["control"], [1.0, 1.0])
    np.testing.assert_allclose(scale.fit(_ctx(clients[bad])).vectors[DELTA], [3 * bad, 6 * bad])
    np.testing.assert_allclose(flip.fit(_ctx(clients[good])).vectors[DELTA], [good, 2 * good])


def test_gaussian_noise_has_sigma_and_is_reproducible() -> None:
    clients = _clients(20)
    attack = _wrapper("gaussian", clients, sigma=2.0)
    bad = attack.malicious[0]
    a = attack.fit(_ctx(clients[bad])).vectors[DELTA]
    b = _wrapper("gaussian", clients, sigma=2.0).fit(_ctx(clients[bad])).vectors[DELTA]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, attack.fit(_ctx(clients[bad], rnd=2)).vectors[DELTA])


def test_colluding_attacks_craft_from_all_malicious_clients_honest_updates() -> None:
    clients = _clients(20)
    alie = _wrapper("alie", clients, z=1.0)
    ids = np.array(alie.malicious, np.float64)
    refs = np.stack([ids, 2 * ids], axis=1)
    mu, sigma = refs.mean(axis=0), refs.std(axis=0)
    for cid in alie.malicious:  # every colluder sends the same vector
        np.testing.assert_allclose(
            alie.fit(_ctx(clients[cid])).vectors[DELTA], mu - sigma, rtol=1e-6
        )
    ipm = _wrapper("ipm", clients, epsilon=2.0)
    np.testing.assert_allclose(
        ipm.fit(_ctx(clients[ipm.malicious[-1]])).vectors[DELTA], -2.0 * mu, rtol=1e-6
    )
    # Default z is z_max for n = 20 clients per round and m = 4 malicious ones.
    default = _wrapper("alie", clients)
    np.testing.assert_allclose(
        default.fit(_ctx(clients[default.malicious[0]])).vectors[DELTA],
        mu - alie_z_max(20, 4) * sigma,
        rtol=1e-5,
    )


def test_backdoor_boosts_by_n_over_eta_m() -> None:
    clients = _clients(20)
    attack = _wrapper("backdoor", clients, poison_fraction=1.0, target_label=1)
    assert attack.boost() == pytest.approx(20 / (1.0 * 4))
    # Every example poisoned, on 4-feature inputs (a 2x2 image) with a 1-pixel trigger:
    # the honest update (the feature mean) is the trigger pixel, boosted by 5.
    bad = ClientData(
        attack.malicious[0], "b", ArrayDataset(np.zeros((4, 4), np.float32), np.zeros(4, np.int64))
    )
    small = _wrapper("backdoor", clients, poison_fraction=1.0, target_label=1, trigger_size=1)
    out = small.fit(_ctx(bad)).vectors[DELTA]
    np.testing.assert_allclose(out, 5.0 * np.array([0, 0, 0, 1.0]))


# ----------------------------------------------------------------------------- metrics


def test_precision_and_recall_of_flagged_clients_by_hand() -> None:
    assert precision_recall([1, 2, 3], [2, 3, 4, 5]) == (2 / 3, 2 / 4)
    assert precision_recall([], [1]) == (None, 0.0)

    @dataclass
    class Result:
        client_id: int

    cb = FlaggedPrecisionRecall([1, 2, 7, 8])
    run = RunContext(server=None, fit_results=[Result(c) for c in (0, 1, 2, 3, 7)])
    record: dict[str, Any] = {"flagged_clients": [1, 2, 3]}
    cb.on_round_end(1, record, run)
    # Present attackers 1, 2, 7 (8 did not take part); flagged 1, 2 of them and 3.
    assert record["flagged_precision"] == pytest.approx(2 / 3)
    assert record["flagged_recall"] == pytest.approx(2 / 3)
    untouched: dict[str, Any] = {"accuracy": 0.5}
    cb.on_round_end(1, untouched, run)
    assert "flagged_precision" not in untouched


def test_backdoor_accuracy_is_the_target_rate_on_triggered_non_target_inputs() -> None:
    test = ArrayDataset(np.zeros((5, 4), np.float32), np.array([0, 1, 1, 2, 0]))
    seen: list[ArrayDataset] = []

    def evaluate(model: np.ndarray, ds: ArrayDataset) -> dict[str, float]:
        seen.append(ds)
        return {"accuracy": 0.25}

    attack = AttackConfig(kind="backdoor", target_label=0, trigger_size=1)
    cb = BackdoorAccuracy(attack, ServerTestBench(test, evaluate))

    class Server:
        class state:  # noqa: N801
            weights = np.zeros(3, np.float32)

        class strategy:  # noqa: N801
            class algorithm:  # noqa: N801
                @staticmethod
                def global_for_evaluation(w: np.ndarray) -> np.ndarray:
                    return w

    record: dict[str, Any] = {"accuracy": 0.9}
    cb.on_round_end(1, record, RunContext(server=Server()))
    assert record["backdoor_accuracy"] == 0.25
    (ds,) = seen
    assert len(ds) == 3 and set(ds.y.tolist()) == {0}
    assert (ds.x[:, 3] == 1.0).all() and (ds.x[:, :3] == 0).all()
    skipped: dict[str, Any] = {}  # a round without central evaluation
    cb.on_round_end(2, skipped, RunContext(server=Server()))
    assert "backdoor_accuracy" not in skipped


def test_no_attack_no_callbacks() -> None:
    assert attack_callbacks(AttackConfig(), num_clients=20, seed=0, bench=None) == []


# ----------------------------------------------------------------------------- config


def test_unknown_kind_and_fraction_out_of_range_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"attack\.kind") as err:
        load_config(None, ["attack.kind=bogus"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"attack\.fraction"):
        load_config(None, ["attack.fraction=1.0"])
    with pytest.raises(ConfigError, match=r"attack\.fraction"):
        load_config(None, ["attack.fraction=-0.1"])


def test_attack_composes_with_secure_aggregation(tmp_path: Path) -> None:
    from fedloom.data import build_federated_dataset

    cfg = load_config(None, ["attack.kind='sign_flip'", "privacy.secure_aggregation='secagg+'"])
    data = build_federated_dataset(cfg.data, cfg.seed)
    learner = build_learner(cfg, data)
    runtime = build_client_runtime(
        cfg, learner, lambda c: data.clients[c], num_clients=data.num_clients
    )
    assert isinstance(runtime.algorithm, MaliciousClient)
    build_strategy(
        cfg, num_clients=data.num_clients, spec=learner.binding.spec, roles_in_process=True
    )


class LabelMean(FakeHonest):
    """An honest algorithm whose update is the mean label it trained on."""

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        return ClientUpdate({DELTA: np.array([ctx.data.train.y.mean()], np.float32)})


def test_label_flip_wrapper_flips_with_the_models_class_count() -> None:
    import torch

    from fedloom.client.learner import Learner

    clients = _clients(20)
    attack = _wrapper("label_flip", clients)
    attack.honest = LabelMean()
    bad = attack.malicious[0]
    x = np.zeros((3, 4), np.float32)
    data = ClientData(bad, "b", ArrayDataset(x, np.array([0, 1, 1])))
    ctx = _ctx(data)
    ctx.learner = Learner(torch.nn.Linear(4, 3))  # 3 classes: 0 -> 2, 1 -> 1
    np.testing.assert_allclose(attack.fit(ctx).vectors[DELTA], [(2 + 1 + 1) / 3])
