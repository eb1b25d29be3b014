"""The virtual clock: a simulated duration for every round, from device profiles.

A client's time in a round is download + local compute + upload (FedScale's round model,
Lai et al. 2022, Section 4): the broadcast's bytes over its downlink, the examples it
processed times its seconds per example, and the bytes it actually uploaded (after
codecs) over its uplink. The round ends at the deadline, or at the k-th arrival of a
cohort over-selected by a factor (1 + o) (Bonawitz et al. 2019, Section 2.2, "the
server selects 130 % of the target"); results arriving later are dropped as stragglers,
and sampled clients may drop out with their profile's probability. The clock's total
(``sim_time_s``) is checkpointed, so a resumed run keeps its simulated time and the
availability windows it implies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.config import RunConfig
from fedloom.messages import STEP_BUDGET, ClientFailure, FitResult, Scalar
from fedloom.server.arrivals import Arrivals
from fedloom.system.profiles import DeviceProfiles, draw_profiles, drops_out

#: The error a simulated dropout is recorded with.
DROPOUT_ERROR = "dropped out (simulated device profile)"


@dataclass(frozen=True, kw_only=True)
class ClientTime:
    """One client's simulated round, in seconds."""

    download: float
    compute: float
    upload: float

    @property
    def total(self) -> float:
        return self.download + self.compute + self.upload


def client_time(
    profiles: DeviceProfiles,
    client_id: int,
    *,
    down_bytes: float,
    examples: float,
    up_bytes: float,
) -> ClientTime:
    return ClientTime(
        download=down_bytes / float(profiles.downlink_bps[client_id]),
        compute=examples * float(profiles.s_per_example[client_id]),
        upload=up_bytes / float(profiles.uplink_bps[client_id]),
    )


def planned_examples(
    num_examples: int, *, batch_size: int, epochs: int, steps: int | None
) -> float:
    """Examples a client with ``num_examples`` processes doing its full local work."""
    if steps is not None:
        return float(steps * batch_size)
    return float(epochs * max(1, math.ceil(num_examples / batch_size)) * batch_size)


def step_budget(
    profiles: DeviceProfiles,
    client_id: int,
    *,
    down_bytes: float,
    up_bytes: float,
    batch_size: int,
    deadline_s: float,
) -> int:
    """The local steps that fit before the deadline: floor((deadline − download − upload)
    / seconds per step), a step being ``batch_size`` examples (at least 0)."""

    def total(steps: int) -> float:
        return client_time(
            profiles,
            client_id,
            down_bytes=down_bytes,
            examples=float(steps * batch_size),
            up_bytes=up_bytes,
        ).total

    per_step = batch_size * float(profiles.s_per_example[client_id])
    budget = max(0, math.floor((deadline_s - total(0)) / per_step))
    while budget > 0 and total(budget) > deadline_s:  # rounding: the budget must fit
        budget -= 1
    return budget


def step_budget_of(config: Mapping[str, Scalar]) -> int | None:
    """The step budget a task's config carries, if any."""
    budget = config.get(STEP_BUDGET)
    return budget if isinstance(budget, int) and not isinstance(budget, bool) else None


def round_end(durations: Sequence[float], *, wanted: int, deadline_s: float | None) -> float:
    """When the round ends: the ``wanted``-th arrival, capped by the deadline.

    With no arrivals the server waits until the deadline, or, without one, until the
    last dropout is known (0 here: the round records no time it cannot justify).
    """
    ordered = sorted(durations)
    if ordered:
        end = ordered[min(wanted, len(ordered)) - 1] if wanted > 0 else ordered[-1]
    else:
        end = 0.0
    if deadline_s is not None:
        end = deadline_s if not ordered else min(end, deadline_s)
    return end


class VirtualClock:
    """An :class:`~fedloom.server.arrivals.ArrivalModel` on simulated device time."""

    def __init__(
        self,
        profiles: DeviceProfiles,
        *,
        seed: int,
        batch_size: int,
        epochs: int,
        steps: int | None,
        held_upload_bytes: int,
        deadline_s: float | None = None,
        over_selection: float = 0.0,
        partial_work: bool = False,
        upload_bytes: int = 0,
    ) -> None:
        self.profiles = profiles
        self.seed = seed
        self.batch_size = batch_size
        self.epochs = epochs
        self.steps = steps
        self.held_upload_bytes = held_upload_bytes
        self.deadline_s = deadline_s
        self.over_selection = over_selection
        #: Give each client the steps that fit before the deadline (needs ``deadline_s``);
        #: ``upload_bytes``, one client's encoded upload, is what it must leave time for.
        self.partial_work = partial_work and deadline_s is not None
        self.upload_bytes = upload_bytes
        self.sim_time_s = 0.0
        #: The step budgets handed out for the round in progress, by client.
        self._budgets: dict[int, int] = {}
        self._budget_round = 0

    # -------------------------------------------------------------- sampling
    def available(self, rnd: int, pool: np.ndarray) -> np.ndarray:
        return pool[self.profiles.available(pool.astype(np.int64), self.sim_time_s)]

    def cohort_size(self, wanted: int) -> int:
        return math.ceil(wanted * (1.0 + self.over_selection))

    def task_config(self, rnd: int, client_id: int, *, down_bytes: int) -> dict[str, Scalar]:
        """With partial work, the steps this client can take before the deadline
        (:func:`step_budget`); a client that cannot take one gets no budget, trains fully
        and arrives late, as without partial work."""
        if not self.partial_work:
            return {}
        assert self.deadline_s is not None
        if self._budget_round != rnd:
            self._budgets, self._budget_round = {}, rnd
        budget = step_budget(
            self.profiles,
            client_id,
            down_bytes=down_bytes,
            up_bytes=self.upload_bytes,
            batch_size=self.batch_size,
            deadline_s=self.deadline_s,
        )
        if budget < 1:
            return {}
        self._budgets[client_id] = budget
        return {STEP_BUDGET: budget}

    # -------------------------------------------------------------- arrivals
    def examples_of(self, result: FitResult, *, budget: int | None = None) -> float:
        """Examples the client processed: its reported steps × the batch size, or, for an
        algorithm that reports no steps, its full planned work (cut to ``budget`` steps)."""
        steps = result.metrics.get("steps")
        if steps is not None:
            return float(steps) * self.batch_size
        planned = planned_examples(
            result.num_examples, batch_size=self.batch_size, epochs=self.epochs, steps=self.steps
        )
        return planned if budget is None else min(planned, float(budget * self.batch_size))

    def up_bytes_of(self, result: FitResult) -> float:
        if result.held:
            return float(self.held_upload_bytes)
        return float(sum(v.nbytes for v in result.vectors.values()))

    def arrive(
        self,
        rnd: int,
        outcomes: Sequence[FitResult | ClientFailure],
        *,
        down_bytes: int,
        wanted: int,
    ) -> Arrivals:
        timed: list[tuple[float, FitResult]] = []
        passed: list[FitResult | ClientFailure] = []
        dropouts = 0
        budgets = self._budgets if self._budget_round == rnd else {}
        self._budgets = {}
        for out in outcomes:
            if isinstance(out, ClientFailure) or not (out.vectors or out.held):
                passed.append(out)  # failures and self-dropped stragglers keep their fate
                continue
            if drops_out(self.profiles, seed=self.seed, round=rnd, client_id=out.client_id):
                dropouts += 1
                passed.append(
                    ClientFailure(client_id=out.client_id, round=rnd, error=DROPOUT_ERROR)
                )
                continue
            t = client_time(
                self.profiles,
                out.client_id,
                down_bytes=down_bytes,
                examples=self.examples_of(out, budget=budgets.get(out.client_id)),
                up_bytes=self.up_bytes_of(out),
            )
            timed.append((t.total, out))
        end = round_end([d for d, _ in timed], wanted=wanted, deadline_s=self.deadline_s)
        on_time = [out for d, out in sorted(timed, key=lambda p: (p[0], p[1].client_id))]
        arrived = [out for (d, out) in timed if d <= end]
        if self.over_selection > 0.0:
            # Over-selection keeps the first `wanted` arrivals even when several tie.
            arrived = on_time[: min(wanted, len(arrived))]
        late = len(timed) - len(arrived)
        self.sim_time_s += end
        fields: dict[str, Any] = {
            "sim_round_s": end,
            "sim_time_s": self.sim_time_s,
            "sim_late": late,
            "sim_dropouts": dropouts,
        }
        if self.partial_work:
            # Arrived updates of clients whose budget cut their planned work short.
            fields["sim_partial"] = sum(
                1 for out in arrived if out.straggler and out.client_id in budgets
            )
        return Arrivals(
            [*passed, *arrived],
            late=late,
            durations={out.client_id: d for d, out in timed},
            fields=fields,
        )

    # ----------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {"sim_time_s": self.sim_time_s}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sim_time_s = float(state.get("sim_time_s", 0.0))


def virtual_clock(
    cfg: RunConfig, *, num_clients: int, held_upload_bytes: int, upload_bytes: int = 0
) -> VirtualClock:
    """The clock a run's ``[system]`` section describes; ``upload_bytes`` is one
    client's encoded upload (the time a partial-work budget must leave for it)."""
    return VirtualClock(
        draw_profiles(cfg.system, num_clients=num_clients, seed=cfg.seed),
        seed=cfg.seed,
        batch_size=cfg.client.batch_size,
        epochs=cfg.client.epochs,
        steps=cfg.client.steps,
        held_upload_bytes=held_upload_bytes,
        deadline_s=cfg.system.deadline_s,
        over_selection=cfg.system.over_selection,
        partial_work=cfg.system.partial_work,
        upload_bytes=upload_bytes,
    )
