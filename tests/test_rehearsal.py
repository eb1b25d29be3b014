"""A deployed client rehearsing its device profile (``fedloom client --rehearse-profile``):
what it sleeps, when it drops out, and that it keeps the wrapped app's capabilities
(hand-computed cases with a fake clock; the real deployment is in
test_estimate_deploy.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedloom.client_store import ClientState
from fedloom.config import load_config
from fedloom.engine.grpc.client import ExchangeApp, StatefulApp
from fedloom.messages import DELTA, GLOBAL, STEP_BUDGET, EvalResult, EvalTask, FitResult, FitTask
from fedloom.system.clock import VirtualClock
from fedloom.system.profiles import DeviceProfiles, drops_out
from fedloom.system.rehearsal import (
    REHEARSED_DROPOUT,
    RehearsedApp,
    RehearsedDropoutError,
    rehearsal_app,
)


class FakeTime:
    """A monotonic clock that moves only when told (training) or slept."""

    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


class Inner:
    """An app whose fit takes ``train_s`` of (fake) real time."""

    def __init__(self, time: FakeTime, train_s: float, metrics: dict[str, float]) -> None:
        self.time, self.train_s, self.metrics = time, train_s, metrics
        self.fits = 0

    def fit(self, task: FitTask, broadcast: dict[str, np.ndarray]) -> FitResult:
        self.fits += 1
        self.time.t += self.train_s
        return FitResult(
            client_id=task.client_id,
            round=task.round,
            model_version=0,
            num_examples=100,
            vectors={DELTA: np.zeros(500, dtype=np.float32)},  # 2000 B up
            metrics=dict(self.metrics),
        )

    def evaluate(self, task: EvalTask, broadcast: dict[str, np.ndarray]) -> EvalResult:
        return EvalResult(client_id=task.client_id, round=task.round, num_examples=0)


def _clock(dropout: float = 0.0) -> VirtualClock:
    # 0.1 s per example; 0.064 Mbit/s down = 8000 B/s, 0.032 Mbit/s up = 4000 B/s.
    profiles = DeviceProfiles(
        s_per_example=np.array([0.1]),
        uplink_bps=np.array([4000.0]),
        downlink_bps=np.array([8000.0]),
        dropout=np.array([dropout]),
        phase=np.zeros(1),
        availability=1.0,
        period_s=100.0,
    )
    return VirtualClock(profiles, seed=0, batch_size=4, epochs=2, steps=None, held_upload_bytes=0)


BROADCAST = {GLOBAL: np.zeros(250, dtype=np.float32)}  # 1000 B down


def _task(rnd: int = 1, **config: int) -> FitTask:
    return FitTask(client_id=0, round=rnd, model_version=0, config=config)


def test_fit_takes_download_plus_compute_plus_upload_and_sleeps_the_rest() -> None:
    # 1000 B / 8000 B/s = 0.125 s; 3 steps × 4 examples × 0.1 s = 1.2 s; 2000 B / 4000
    # B/s = 0.5 s: 1.825 s in all, of which training really took 0.3 s.
    time = FakeTime()
    app = RehearsedApp(
        Inner(time, 0.3, {"steps": 3.0}),
        clock=_clock(),
        client_id=0,
        sleep=time.sleep,
        now=time.now,
    )
    app.fit(_task(), BROADCAST)
    assert time.slept == [pytest.approx(1.525)]
    assert time.t == pytest.approx(101.825)


def test_slower_real_training_than_the_profile_sleeps_nothing() -> None:
    time = FakeTime()
    app = RehearsedApp(
        Inner(time, 5.0, {"steps": 3.0}),
        clock=_clock(),
        client_id=0,
        sleep=time.sleep,
        now=time.now,
    )
    app.fit(_task(), BROADCAST)
    assert time.slept == []


def test_work_without_reported_steps_is_the_plan_cut_to_the_step_budget() -> None:
    # No "steps" metric: 2 epochs × ceil(100 / 4) batches × 4 = 200 examples (20 s), or
    # with a budget of 5 steps, 20 examples (2 s); plus 0.625 s of transfers.
    for config, total in (({}, 20.625), ({STEP_BUDGET: 5}, 2.625)):
        time = FakeTime()
        inner = Inner(time, 0.0, {})
        app = RehearsedApp(inner, clock=_clock(), client_id=0, sleep=time.sleep, now=time.now)
        app.fit(_task(**config), BROADCAST)
        assert sum(time.slept) == pytest.approx(total)


def test_dropouts_follow_the_virtual_clocks_seeded_draws() -> None:
    clock = _clock(dropout=0.5)
    time = FakeTime()
    inner = Inner(time, 0.0, {"steps": 1.0})
    app = RehearsedApp(inner, clock=clock, client_id=0, sleep=time.sleep, now=time.now)
    draws = [drops_out(clock.profiles, seed=0, round=r, client_id=0) for r in range(1, 21)]
    assert 0 < sum(draws) < 20
    for rnd, drops in enumerate(draws, start=1):
        if drops:
            with pytest.raises(RehearsedDropoutError, match=re.escape(REHEARSED_DROPOUT)):
                app.fit(_task(rnd), BROADCAST)
        else:
            app.fit(_task(rnd), BROADCAST)
    assert inner.fits == 20 - sum(draws)  # a dropped-out device trains nothing


def test_the_rehearsal_keeps_the_built_in_apps_capabilities() -> None:
    from fedloom.engine.grpc.client import BuiltinApp

    cfg = load_config(
        None, ["data.num_clients=3", "model.name=logreg", "system.s_per_example=1e-9"]
    )
    app = rehearsal_app(BuiltinApp, cfg, 1)
    assert isinstance(app, StatefulApp) and isinstance(app, ExchangeApp)
    assert app.num_parameters == 650 and app.client_id == 1
    state = ClientState()
    app.restore_client_state(state)
    assert app.client_state().is_empty()
    # Its profile is the one the server's clock gives client 1 (the same draw).
    assert app.clock.profiles.s_per_example[1] == pytest.approx(1e-9)
    res = app.fit(_task(), {GLOBAL: np.zeros(650, dtype=np.float32)})
    assert res.vectors[DELTA].shape == (650,)

    class Plain(Inner):
        pass

    plain = RehearsedApp(Plain(FakeTime(), 0.0, {}), clock=_clock(), client_id=0)
    assert not isinstance(plain, StatefulApp) and not isinstance(plain, ExchangeApp)
