"""``fedloom estimate CONFIG``: round and total training time before running anything.

See :mod:`fedloom.system.estimate` for the model. The rounds needed for a target accuracy
cannot be known without training: give them (``--rounds-to-target``) or point at a run of
the same task whose curve reached the target (``--curve RUN_DIR``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from fedloom.config import ConfigError, RunConfig, load_config

if TYPE_CHECKING:
    from fedloom.system.estimate import Workload


def cmd_estimate(args: argparse.Namespace, console: Console) -> int:
    from fedloom.system.estimate import estimate_run, format_estimates, what_ifs
    from fedloom.system.profiles import draw_profiles

    cfg = load_config(args.config, args.overrides)
    if args.trajectories < 1:
        raise ConfigError("--trajectories must be at least 1")
    workload, num_clients = _workload(cfg)
    profiles = draw_profiles(cfg.system, num_clients=num_clients, seed=cfg.seed)
    base = estimate_run(cfg, profiles, workload, trajectories=args.trajectories)
    rows = [base]
    if not args.no_what_if:
        rows += what_ifs(cfg, profiles, workload, trajectories=args.trajectories, base=base)
    if not cfg.system.enabled:
        console.print(
            "note: system.enabled is false, so the run will not simulate time; this estimate "
            "uses the [system] section's values as every client's device",
            markup=False,
            highlight=False,
        )
    if cfg.server.selection != "uniform":
        console.print(
            f"note: the estimate draws cohorts uniformly; server.selection = "
            f"'{cfg.server.selection}' chooses by what it learns during the run, which only "
            "the run can show",
            markup=False,
            highlight=False,
        )
    console.print(
        f"{cfg.rounds} rounds, {num_clients} clients, {args.trajectories} replays "
        f"(devices from seed {cfg.seed}); down {workload.down_bytes / 1e6:.3f} MB and up "
        f"{workload.up_bytes / 1e6:.3f} MB per client-round",
        markup=False,
        highlight=False,
    )
    console.print(format_estimates(rows), markup=False, highlight=False, soft_wrap=True)
    to_target = _rounds_to_target(args, cfg)
    result = {
        "rounds": cfg.rounds,
        "estimates": [e.__dict__ for e in rows],
        "rounds_to_target": to_target,
        "time_to_target_s": None if to_target is None else base.time_to_round(to_target),
    }
    if to_target is not None:
        console.print(
            f"target accuracy {cfg.target_accuracy}: {to_target} rounds, about "
            f"{base.time_to_round(to_target):.1f} simulated seconds",
            markup=False,
            highlight=False,
        )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {args.json}", markup=False, highlight=False, soft_wrap=True)
    return 0


def _workload(cfg: RunConfig) -> tuple[Workload, int]:
    """Per-client example counts and the dense bytes a round moves, from the config."""
    from fedloom.data import build_federated_dataset
    from fedloom.strategies import build_learner, check_composition, traffic_bytes
    from fedloom.system.estimate import Workload

    check_composition(cfg)
    data = build_federated_dataset(cfg.data, cfg.seed)
    learner = build_learner(cfg, data)
    # The broadcast and uploads as they travel (after any downlink or uplink compression),
    # from the server algorithm and the codecs only: the aggregator and the other server
    # stages (FLTrust's root data, ...) change no byte a client moves.
    down, up = traffic_bytes(cfg, num_clients=data.num_clients, spec=learner.binding.spec)
    examples = data.client_sizes().tolist()
    return Workload(client_examples=examples, down_bytes=down, up_bytes=up), data.num_clients


def _rounds_to_target(args: argparse.Namespace, cfg: RunConfig) -> int | None:
    if args.rounds_to_target is not None:
        return int(args.rounds_to_target)
    if args.curve is None:
        return None
    if cfg.target_accuracy is None:
        raise ConfigError("--curve needs target_accuracy in the config; set it (e.g. 0.9)")
    from fedloom.server.metrics import rounds_to_target
    from fedloom.store import RunStore

    store = RunStore.open(Path(args.curve))
    reached = rounds_to_target(store.history(), cfg.target_accuracy)
    if reached is None:
        raise ConfigError(
            f"--curve {args.curve}: that run never reached accuracy {cfg.target_accuracy}; "
            "give --rounds-to-target or a run that reached it"
        )
    return reached
