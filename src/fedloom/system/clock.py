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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.config import RunConfig
from fedloom.messages import ClientFailure, FitResult
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
    ) -> None:
        self.profiles = profiles
        self.seed = seed
        self.batch_size = batch_size
        self.epochs = epochs
        self.steps = steps
        self.held_upload_bytes = held_upload_bytes
        self.deadline_s = deadline_s
        self.over_selection = over_selection
        self.sim_time_s = 0.0

    # -------------------------------------------------------------- sampling
    def available(self, rnd: int, pool: np.ndarray) -> np.ndarray:
        return pool[self.profiles.available(pool.astype(np.int64), self.sim_time_s)]

    def cohort_size(self, wanted: int) -> int:
        return math.ceil(wanted * (1.0 + self.over_selection))

    # -------------------------------------------------------------- arrivals
    def examples_of(self, result: FitResult) -> float:
        """Examples the client processed: its reported steps × the batch size, or, for an
        algorithm that reports no steps, its full planned work."""
        steps = result.metrics.get("steps")
        if steps is not None:
            return float(steps) * self.batch_size
        return planned_examples(
            result.num_examples, batch_size=self.batch_size, epochs=self.epochs, steps=self.steps
        )

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
                examples=self.examples_of(out),
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
        return Arrivals(
            [*passed, *arrived],
            late=late,
            durations={out.client_id: d for d, out in timed},
            fields={
                "sim_round_s": end,
                "sim_time_s": self.sim_time_s,
                "sim_late": late,
                "sim_dropouts": dropouts,
            },
        )

    # ----------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {"sim_time_s": self.sim_time_s}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sim_time_s = float(state.get("sim_time_s", 0.0))


def virtual_clock(cfg: RunConfig, *, num_clients: int, held_upload_bytes: int) -> VirtualClock:
    """The clock a run's ``[system]`` section describes."""
    return VirtualClock(
        draw_profiles(cfg.system, num_clients=num_clients, seed=cfg.seed),
        seed=cfg.seed,
        batch_size=cfg.client.batch_size,
        epochs=cfg.client.epochs,
        steps=cfg.client.steps,
        held_upload_bytes=held_upload_bytes,
        deadline_s=cfg.system.deadline_s,
        over_selection=cfg.system.over_selection,
    )
