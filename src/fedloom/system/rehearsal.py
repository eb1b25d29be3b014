"""A deployed client that acts out its ``[system]`` device profile in real time.

``fedloom estimate`` and the virtual clock say how long a fleet of such devices would
take; a rehearsal lets real processes take that long, so the estimate can be checked
against a real deployment (``fedloom client --rehearse-profile``). The client is the
one the server's config describes: its profile is drawn exactly as the server's virtual
clock and the estimate draw it (``draw_profiles(cfg.system, seed=cfg.seed)`` at its
client id), and its durations come from the same model (:func:`client_time` over the
clock's own rules for examples processed and bytes uploaded), so the only differences
left between the estimate and the deployment are the real overheads.

What is rehearsed, per fit task:

- *compute*: the profile's seconds per example × the examples the client processed
  (its reported steps × batch size, or its planned work), as the virtual clock counts;
- *download*: the broadcast's bytes as they arrived (after any downlink codec) over the
  profile's downlink; *upload*: the result's encoded bytes over its uplink;
- the fit returns no earlier than download + compute + upload after it started: real
  training time counts towards it, only the remainder is slept;
- *dropout*: the client drops out of a round with its profile's probability, with the
  virtual clock's own seeded draw (so the same clients drop out in the same rounds as in
  a simulation of the config); it reports a failure at once instead of training.

Not rehearsed: evaluation tasks (the virtual clock does not time them either), the real
transfer time on the network (added on top; negligible on loopback), a held upload's
traffic under secure aggregation (it travels in the protocol's exchanges), and
availability windows, which the server's own arrival model already honours: with
``system.enabled`` a deployed server samples only the clients inside their windows on
its simulated clock, which a rehearsing fleet keeps in step with wall time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from fedloom.config import RunConfig
from fedloom.messages import EvalResult, EvalTask, FitResult, FitTask
from fedloom.system.clock import VirtualClock, client_time, step_budget_of, virtual_clock
from fedloom.system.profiles import drops_out

log = logging.getLogger("fedloom.client")

#: The error a rehearsed dropout is reported with.
REHEARSED_DROPOUT = "dropped out (rehearsed device profile)"


class RehearsedDropoutError(Exception):
    """This round, the device the client rehearses drops out."""


class App(Protocol):
    """The deployment client's app, as far as the rehearsal needs it (structural: this
    package does not import the deployment engine)."""

    def fit(self, task: FitTask, broadcast: dict[str, np.ndarray]) -> FitResult: ...

    def evaluate(self, task: EvalTask, broadcast: dict[str, np.ndarray]) -> EvalResult: ...


class RehearsedApp:
    """``inner`` taking its device's time for every fit (see the module docstring).

    Everything else (``num_parameters``, protocol stages, the persisted client state) is
    the inner app's: attributes are looked up there, so the deployment client sees the
    same capabilities with or without a rehearsal.
    """

    def __init__(
        self,
        inner: App,
        *,
        clock: VirtualClock,
        client_id: int,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.clock = clock
        self.client_id = client_id
        self._sleep = sleep
        self._now = now

    def fit(self, task: FitTask, broadcast: dict[str, np.ndarray]) -> FitResult:
        clock = self.clock
        if drops_out(clock.profiles, seed=clock.seed, round=task.round, client_id=task.client_id):
            log.info("round %d: this device drops out (rehearsed profile)", task.round)
            raise RehearsedDropoutError(REHEARSED_DROPOUT)
        started = self._now()
        result = self.inner.fit(task, broadcast)
        if not (result.vectors or result.held):
            return result  # a straggler the round drops: it sends nothing, at once
        t = client_time(
            clock.profiles,
            task.client_id,
            down_bytes=float(sum(v.nbytes for v in broadcast.values())),
            examples=clock.examples_of(result, budget=step_budget_of(task.config)),
            up_bytes=0.0 if result.held else clock.up_bytes_of(result),
        )
        remaining = t.total - (self._now() - started)
        if remaining > 0:
            self._sleep(remaining)
        return result

    def evaluate(self, task: EvalTask, broadcast: dict[str, np.ndarray]) -> EvalResult:
        return self.inner.evaluate(task, broadcast)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class lacks: the inner app's capabilities.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def rehearsal_app(
    make_inner: Callable[[RunConfig, int], App], cfg: RunConfig, client_id: int
) -> RehearsedApp:
    """The app ``make_inner`` builds for ``client_id``, rehearsing the device the
    server's config (``cfg``, received at registration) gives that client."""
    if not cfg.system.enabled:
        log.warning(
            "the server's config has system.enabled = false: rehearsing its [system] "
            "section's values anyway, as fedloom estimate would assume them"
        )
    clock = virtual_clock(cfg, num_clients=cfg.data.num_clients, held_upload_bytes=0)
    p = clock.profiles
    log.info(
        "rehearsing device profile of client %d: %.4g s per example, %.3g / %.3g Mbit/s "
        "up / down, dropout %.3g",
        client_id,
        p.s_per_example[client_id],
        p.uplink_bps[client_id] * 8 / 1e6,
        p.downlink_bps[client_id] * 8 / 1e6,
        p.dropout[client_id],
    )
    return RehearsedApp(make_inner(cfg, client_id), clock=clock, client_id=client_id)
