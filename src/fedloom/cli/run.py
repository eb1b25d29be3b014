"""The simulation commands of ``fedloom``: run (and ``run --resume``), centralized, report."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedloom.cli.common import config_and_run_dir, interrupted, run_outcome
from fedloom.config import RunConfig, load_config
from fedloom.data.base import FederatedDataset
from fedloom.store import DB_FILE, RunStore


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from fedloom.engine.simulation import run_simulation
    from fedloom.report import summary_table

    cfg, out_dir = config_and_run_dir(args)
    try:
        with _progress(console) as progress:
            summary = run_simulation(
                cfg,
                out_dir,
                resume=args.resume is not None,
                on_start=progress.start,
                on_round=progress.update,
            )
    except KeyboardInterrupt:
        return interrupted(f"fedloom run --resume {out_dir}")
    console.print(summary_table(summary))
    console.print(f"run directory: {out_dir}")
    return run_outcome(summary)


def cmd_centralized(args: argparse.Namespace, console: Console) -> int:
    from fedloom.config import config_from_dict
    from fedloom.engine.simulation import run_centralized, write_outputs

    store: RunStore | None = None
    run_cfg: RunConfig | None = None  # the config of the run in --out, if there is one
    if args.out is not None and (args.out / DB_FILE).exists():
        store = RunStore.open(args.out)
        run_cfg = config_from_dict(store.config())
    if args.config is None and not args.overrides and run_cfg is not None:
        cfg = run_cfg
    else:
        cfg = load_config(args.config, args.overrides)
    console.print(f"centralized baseline: {cfg.data.name}, {cfg.model.name}, pooled data ...")
    result = run_centralized(cfg)
    console.print(
        f"centralized accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
        f"({result['epochs']} epochs over {result['examples']} examples, "
        f"{result['wall_s']:.1f} s)"
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "centralized.json").write_text(json.dumps(result, indent=2) + "\n")
    if store is not None and run_cfg is not None:
        store.set_meta("centralized_accuracy", result["accuracy"])
        from fedloom.data import build_federated_dataset

        num_clients = build_federated_dataset(run_cfg.data, run_cfg.seed).num_clients
        summary = write_outputs(store, args.out, run_cfg, num_clients)
        gap = summary["metrics"]["accuracy_gap"]
        if gap is not None:
            console.print(
                f"federated final accuracy {summary['final']['accuracy']:.4f}; "
                f"gap to centralized {gap * 100:+.2f} points"
            )
        store.close()
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from fedloom.report import redraw

    redraw(args.run_dir, console)
    return 0


class _RoundProgress:
    """A live progress line on a terminal; silent otherwise (logs still go to stderr)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def start(self, cfg: RunConfig, data: FederatedDataset, done: int) -> None:
        logging.getLogger("fedloom").info(
            "%s: %d clients, %s, %d rounds (from round %d)",
            data.name,
            data.num_clients,
            cfg.strategy or "custom",
            cfg.rounds,
            done + 1,
        )
        for note in data.notes:
            logging.getLogger("fedloom").warning(note)
        if not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task("rounds", total=cfg.rounds, completed=done, status="")

    def update(self, record: dict[str, Any]) -> None:
        acc, loss = record.get("accuracy"), record.get("loss")
        status = (
            f"acc {acc:.4f} loss {loss:.4f}" if acc is not None and loss is not None else ""
        ) + f"  clients {record['clients_succeeded']}/{record['clients_sampled']}"
        logging.getLogger("fedloom").info("round %d: %s", record["round"], status.strip())
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, status=status)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@contextmanager
def _progress(console: Console) -> Iterator[_RoundProgress]:
    progress = _RoundProgress(console)
    try:
        yield progress
    finally:
        progress.stop()
