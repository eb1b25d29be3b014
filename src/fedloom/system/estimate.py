"""Before a run: how long will it take, and what does each choice cost?

The estimate replays the run's timeline on the virtual clock many times without
training: each trajectory draws its cohorts and dropouts from its own seed (the devices
themselves are the run's, drawn from the run's seed), gives every sampled client its full
planned work, and ends each round exactly as :class:`~fedloom.system.clock.VirtualClock`
would. Bytes are the dense encoded sizes unless a what-if row says otherwise. What the
estimate cannot know is how many rounds reach a target accuracy: that comes from a
supplied number or a previous run's curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel

from fedloom.config import RunConfig
from fedloom.seeding import SAMPLING, derive_rng
from fedloom.server.sampling import clients_per_round, select_clients
from fedloom.system.clock import client_time, planned_examples, round_end, step_budget
from fedloom.system.profiles import DeviceProfiles, drops_out

M = TypeVar("M", bound=BaseModel)

#: Purpose tag of the estimate's trajectories (apart from the run's own streams).
ESTIMATE = 103


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What one round moves and computes, independent of the devices."""

    client_examples: Sequence[int]
    down_bytes: int  # per sampled client
    up_bytes: int  # per returned update


@dataclass
class Estimate:
    """Simulated durations of the configured run, over ``trajectories`` replays."""

    label: str
    rounds: int
    #: The run's own seeded cohorts and dropouts, every client doing its planned work.
    total_s_this_seed: float
    round_s_median: float
    round_s_p90: float
    total_s_mean: float
    total_s_p10: float
    total_s_p90: float
    bytes_up_per_round: float
    bytes_down_per_round: float
    late_per_round: float
    mean_round_s: list[float] = field(default_factory=list)

    def time_to_round(self, rnd: int) -> float:
        """Expected simulated seconds until the end of round ``rnd``."""
        per_round = self.mean_round_s
        if rnd <= len(per_round):
            return float(sum(per_round[:rnd]))
        return float(sum(per_round) + (rnd - len(per_round)) * np.mean(per_round))


def estimate_run(
    cfg: RunConfig,
    profiles: DeviceProfiles,
    workload: Workload,
    *,
    trajectories: int = 200,
    label: str = "as configured",
) -> Estimate:
    """Replay ``cfg.rounds`` rounds on the virtual clock: once with the run's own seeded
    cohorts and dropouts (what this seed's run will read, as long as every client does
    its planned work), and ``trajectories`` times with other draws (the spread)."""
    replays = [_replay(cfg, profiles, workload, trajectory=None)]
    replays += [_replay(cfg, profiles, workload, trajectory=t) for t in range(trajectories)]
    this_seed, others = replays[0], replays[1:] or replays[:1]
    totals = np.array([sum(r.round_s) for r in others])
    per_round = np.array([r.round_s for r in others])
    return Estimate(
        label=label,
        rounds=cfg.rounds,
        total_s_this_seed=float(sum(this_seed.round_s)),
        round_s_median=float(np.median(per_round)),
        round_s_p90=float(np.quantile(per_round, 0.9)),
        total_s_mean=float(totals.mean()),
        total_s_p10=float(np.quantile(totals, 0.1)),
        total_s_p90=float(np.quantile(totals, 0.9)),
        bytes_up_per_round=float(np.mean([r.bytes_up for r in others]) / cfg.rounds),
        bytes_down_per_round=float(np.mean([r.bytes_down for r in others]) / cfg.rounds),
        late_per_round=float(np.mean([r.late for r in others]) / cfg.rounds),
        mean_round_s=[float(x) for x in per_round.mean(axis=0)],
    )


@dataclass
class _Replay:
    round_s: list[float] = field(default_factory=list)
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    late: int = 0


def _replay(
    cfg: RunConfig, profiles: DeviceProfiles, workload: Workload, *, trajectory: int | None
) -> _Replay:
    """One timeline. ``trajectory=None`` draws exactly as the run does (the sampler's
    ``(seed, SAMPLING, round)`` stream and the profiles' dropout draws)."""
    sysc, server = cfg.system, cfg.server
    out = _Replay()
    clock = 0.0

    def cohort(k: int) -> int:
        return math.ceil(k * (1.0 + sysc.over_selection))

    for rnd in range(1, cfg.rounds + 1):
        if trajectory is None:
            rng = derive_rng(cfg.seed, SAMPLING, rnd)
        else:
            rng = derive_rng(cfg.seed, ESTIMATE, trajectory, rnd)
        pool = np.arange(profiles.num_clients)
        pool = pool[profiles.available(pool, clock)]
        if len(pool) == 0:
            out.round_s.append(0.0)
            continue
        picked = pool[select_clients(server, len(pool), rng, cohort)]
        wanted = (
            len(picked)
            if server.sampling == "poisson"
            else clients_per_round(len(pool), server.fraction_fit, server.min_fit_clients)
        )
        times = []
        for c in picked.tolist():
            if trajectory is None:
                dropped = drops_out(profiles, seed=cfg.seed, round=rnd, client_id=c)
            else:
                dropped = bool(rng.random() < profiles.dropout[c])
            if dropped:
                continue
            examples = planned_examples(
                workload.client_examples[c],
                batch_size=cfg.client.batch_size,
                epochs=cfg.client.epochs,
                steps=cfg.client.steps,
            )
            if sysc.partial_work and sysc.deadline_s is not None:
                examples = _partial_examples(cfg, profiles, workload, c, examples)
            t = client_time(
                profiles,
                c,
                down_bytes=workload.down_bytes,
                examples=examples,
                up_bytes=workload.up_bytes,
            )
            times.append(t.total)
        end = round_end(times, wanted=wanted, deadline_s=sysc.deadline_s)
        arrived = sum(d <= end for d in times)
        if sysc.over_selection > 0:
            arrived = min(arrived, wanted)
        out.round_s.append(end)
        clock += end
        out.bytes_up += arrived * workload.up_bytes
        out.bytes_down += len(picked) * workload.down_bytes
        out.late += len(times) - arrived
    return out


def _partial_examples(
    cfg: RunConfig, profiles: DeviceProfiles, workload: Workload, client: int, planned: float
) -> float:
    """With ``system.partial_work``, the examples of the steps that fit before the
    deadline, as the clock budgets them (a client that fits none does its full work)."""
    assert cfg.system.deadline_s is not None
    budget = step_budget(
        profiles,
        client,
        down_bytes=workload.down_bytes,
        up_bytes=workload.up_bytes,
        batch_size=cfg.client.batch_size,
        deadline_s=cfg.system.deadline_s,
    )
    return planned if budget < 1 else min(planned, float(budget * cfg.client.batch_size))


#: Encoded bytes per coordinate of an uplink encoding, as the what-if rows assume them
#: (values + int32 indices for top-k; one byte per value for 8-bit; 1 bit for sign).
WHAT_IF_UPLINK: dict[str, Callable[[int], float]] = {
    "uplink 8-bit": lambda dense: dense / 4 + 8,
    "uplink top-k 1%": lambda dense: 0.01 * dense * 2,
    "uplink sign (1 bit)": lambda dense: dense / 32 + 4,
}


def what_ifs(
    cfg: RunConfig,
    profiles: DeviceProfiles,
    workload: Workload,
    *,
    trajectories: int,
    base: Estimate,
) -> list[Estimate]:
    """The configured run beside variants: cohort size, a deadline, uplink encodings."""
    rows: list[Estimate] = []

    def variant(label: str, c: RunConfig, w: Workload = workload) -> None:
        rows.append(estimate_run(c, profiles, w, trajectories=trajectories, label=label))

    f = cfg.server.fraction_fit
    if cfg.server.sampling == "fixed":
        for factor in (0.5, 2.0):
            frac = min(1.0, f * factor)
            if frac != f:
                server = replace_model(cfg.server, fraction_fit=frac, min_fit_clients=1)
                variant(f"cohort fraction {frac:g}", replace_model(cfg, server=server.model_dump()))
    for q, name in ((0.5, "p50"), (0.9, "p90")):
        deadline = _client_time_quantile(cfg, profiles, workload, q)
        system = replace_model(cfg.system, deadline_s=deadline)
        label = f"deadline {deadline:.3g} s (client {name})"
        variant(label, replace_model(cfg, system=system.model_dump()))
    for label, encode in WHAT_IF_UPLINK.items():
        variant(label, cfg, replace(workload, up_bytes=int(encode(workload.up_bytes))))
    return rows


def replace_model(model: M, **changes: Any) -> M:
    """A copy of a config section with ``changes``, validated like a user's config."""
    return type(model).model_validate({**model.model_dump(), **changes})


def _client_time_quantile(
    cfg: RunConfig, profiles: DeviceProfiles, workload: Workload, q: float
) -> float:
    times = [
        client_time(
            profiles,
            c,
            down_bytes=workload.down_bytes,
            examples=planned_examples(
                workload.client_examples[c],
                batch_size=cfg.client.batch_size,
                epochs=cfg.client.epochs,
                steps=cfg.client.steps,
            ),
            up_bytes=workload.up_bytes,
        ).total
        for c in range(profiles.num_clients)
    ]
    return float(np.quantile(times, q))


def format_estimates(rows: Sequence[Estimate]) -> str:
    header = (
        f"{'choice':<32} {'this seed':>10} {'round p50':>10} {'round p90':>10} "
        f"{'total, other seeds (p10-p90)':>30} "
        f"{'MB up/round':>12} {'MB down/round':>14} {'late/round':>10}"
    )
    lines = [header, "-" * len(header)]
    for e in rows:
        total = f"{_dur(e.total_s_mean)} ({_dur(e.total_s_p10)}-{_dur(e.total_s_p90)})"
        lines.append(
            f"{e.label:<32} {_dur(e.total_s_this_seed):>10} {_dur(e.round_s_median):>10} "
            f"{_dur(e.round_s_p90):>10} {total:>30} "
            f"{e.bytes_up_per_round / 1e6:>12.3f} {e.bytes_down_per_round / 1e6:>14.3f} "
            f"{e.late_per_round:>10.2f}"
        )
    return "\n".join(lines)


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.2f}h"
