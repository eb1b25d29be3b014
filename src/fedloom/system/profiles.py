"""Per-client device profiles: compute speed, bandwidth, reliability, availability.

Lognormal draws follow FedScale's observation that device compute and network speeds
span orders of magnitude with a heavy right tail (Lai et al. 2022, Section 3); a user's
own measurements enter as a trace CSV. Profiles are a pure function of (config, seed,
client id), so a resumed run, another engine and ``fedloom estimate`` see the same
devices.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedloom.config import ConfigError, SystemConfig
from fedloom.seeding import derive_rng

#: Purpose tag of the profile draws (kept apart from seeding.py's training streams).
PROFILE = 101
#: Purpose tag of the per-round, per-client dropout draws.
DROPOUT = 102

_MBPS = 1e6 / 8.0  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class DeviceProfiles:
    """Arrays indexed by client id."""

    s_per_example: np.ndarray
    uplink_bps: np.ndarray  # bytes per second
    downlink_bps: np.ndarray
    dropout: np.ndarray
    #: Start of each client's availability window within the period, in [0, 1).
    phase: np.ndarray
    availability: float
    period_s: float

    @property
    def num_clients(self) -> int:
        return len(self.s_per_example)

    def available(self, client_ids: np.ndarray, at_s: float) -> np.ndarray:
        """Boolean mask: is each client inside its availability window at ``at_s``?"""
        if self.availability >= 1.0:
            return np.ones(len(client_ids), dtype=bool)
        position = (at_s / self.period_s - self.phase[client_ids]) % 1.0
        return position < self.availability


def draw_profiles(cfg: SystemConfig, *, num_clients: int, seed: int) -> DeviceProfiles:
    """The run's device profiles, from ``cfg.trace`` or lognormal draws."""
    rng = derive_rng(seed, PROFILE)
    phase = rng.random(num_clients)
    if cfg.trace is not None:
        s, up, down, drop = _read_trace(Path(cfg.trace), num_clients, cfg.dropout)
    else:
        s = cfg.s_per_example * rng.lognormal(0.0, cfg.compute_sigma, num_clients)
        up = cfg.uplink_mbps * rng.lognormal(0.0, cfg.bandwidth_sigma, num_clients)
        down = cfg.downlink_mbps * rng.lognormal(0.0, cfg.bandwidth_sigma, num_clients)
        drop = np.full(num_clients, cfg.dropout)
    return DeviceProfiles(
        s_per_example=np.asarray(s, dtype=np.float64),
        uplink_bps=np.asarray(up, dtype=np.float64) * _MBPS,
        downlink_bps=np.asarray(down, dtype=np.float64) * _MBPS,
        dropout=np.asarray(drop, dtype=np.float64),
        phase=phase,
        availability=cfg.availability,
        period_s=cfg.availability_period_s,
    )


_TRACE_COLUMNS = ("s_per_example", "uplink_mbps", "downlink_mbps")


def _read_trace(
    path: Path, num_clients: int, default_dropout: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"system.trace: no file at {path}; give the path of a device CSV")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _TRACE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(
                f"system.trace {path} has no column '{missing[0]}'; it needs "
                f"{', '.join(_TRACE_COLUMNS)} (and optionally dropout)"
            )
        rows = list(reader)
    if not rows:
        raise ConfigError(f"system.trace {path} has no rows; add one device per line")
    table = np.zeros((len(rows), 4), dtype=np.float64)
    for i, row in enumerate(rows):
        try:
            values = [float(row[c]) for c in _TRACE_COLUMNS]
            values.append(float(row["dropout"]) if row.get("dropout") else default_dropout)
        except ValueError:
            raise ConfigError(
                f"system.trace {path} line {i + 2} has a value that is not a number; fix it"
            ) from None
        if min(values[:3]) <= 0.0 or not 0.0 <= values[3] < 1.0:
            raise ConfigError(
                f"system.trace {path} line {i + 2}: speeds must be > 0 and dropout in [0, 1)"
            )
        table[i] = values
    picked = table[np.arange(num_clients) % len(rows)]
    return picked[:, 0], picked[:, 1], picked[:, 2], picked[:, 3]


def drops_out(profiles: DeviceProfiles, *, seed: int, round: int, client_id: int) -> bool:
    """Whether ``client_id`` drops out of ``round`` (a seeded Bernoulli draw)."""
    p = float(profiles.dropout[client_id])
    if p <= 0.0:
        return False
    return bool(derive_rng(seed, DROPOUT, round, client_id).random() < p)
