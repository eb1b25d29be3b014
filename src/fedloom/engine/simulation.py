"""Wire a simulated run: data, trainer, engine, server, store, and the run-directory outputs.

This is the one place that knows every part; the parts themselves only know the
interfaces below them. The CLI and the Python API both call :func:`run_simulation`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedloom import __version__
from fedloom.callbacks import Callback
from fedloom.client.learner import Learner
from fedloom.client.runtime import ClientRuntime
from fedloom.client_store import ClientStateStore
from fedloom.config import ConfigError, RunConfig, config_from_dict
from fedloom.data import build_federated_dataset
from fedloom.data.base import ArrayDataset, ClientData, FederatedDataset
from fedloom.data.server import ServerData
from fedloom.data.summary import write_client_summary
from fedloom.engine.inprocess import InProcessExecutor
from fedloom.engine.pool import ProcessPoolExecutor
from fedloom.engine.vectorized import VectorizedExecutor, vectorizable
from fedloom.messages import GLOBAL, FitTask
from fedloom.registry import RUN_MODES
from fedloom.seeding import EVAL_SUBSET, derive_rng
from fedloom.server.callbacks import Checkpointer, Evaluation, RoundRecorder, ServerTestBench
from fedloom.server.loop import ClientExecutor
from fedloom.server.metrics import run_metrics
from fedloom.server.transforms import ServerModel
from fedloom.store import RunStore
from fedloom.strategies import (
    build_client_runtime,
    build_learner,
    build_strategy,
    make_server,
    simulation_runtime,
)

log = logging.getLogger("fedloom")

RoundCallback = Callable[[dict[str, Any]], None]


@dataclass
class Wiring:
    """What an engine is built from: the run's config, data, client runtime and store."""

    cfg: RunConfig
    data: FederatedDataset
    runtime: ClientRuntime
    client_store: ClientStateStore
    roles: list[Any]
    #: The vectors a fit result carries on the wire (name → (length, dtype)), as the
    #: strategy's codecs encode them.
    upload_sizes: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: This run's identity (kept across resumes): deployed clients keep algorithm state
    #: (control variates, personal layers) for one run only.
    run_id: str = ""
    #: A picklable recipe for the runtime in another process (None: only this process).
    runtime_factory: Callable[[], ClientRuntime] | None = None


def make_executor(wiring: Wiring) -> ClientExecutor:
    cfg = wiring.cfg
    torch.set_num_threads(cfg.engine.torch_threads)
    if cfg.engine.name in ("pool", "ray") and wiring.runtime_factory is None:
        raise ConfigError(
            f"engine.name = '{cfg.engine.name}' rebuilds the model in worker processes, which "
            "needs a built-in model; use engine.name = 'inprocess' with your own model"
        )
    if cfg.engine.name == "ray" and wiring.runtime_factory is not None:
        from fedloom.engine.ray import VECTORIZE_SETTING, RayExecutor  # Ray: an extra

        if cfg.engine.vectorize:  # refused here, before Ray and its actors start
            vectorizable(wiring.runtime, setting=VECTORIZE_SETTING)
        return RayExecutor(
            wiring.runtime_factory,
            wiring.data.client_sizes().tolist(),
            wiring.client_store,
            address=cfg.engine.address,
            actors=cfg.engine.workers,
            actor_cpus=cfg.engine.actor_cpus,
            torch_threads=cfg.engine.torch_threads,
            device=cfg.engine.device,
            actor_gpus=cfg.engine.actor_gpus,
            vectorize=cfg.engine.vectorize,
        )
    if cfg.engine.name == "pool" and wiring.runtime_factory is not None:
        return ProcessPoolExecutor(
            wiring.runtime_factory,
            wiring.data.client_sizes().tolist(),
            wiring.client_store,
            workers=cfg.engine.workers,
            torch_threads=cfg.engine.torch_threads,
            device=cfg.engine.device,
        )
    if cfg.engine.name == "vectorized":
        return VectorizedExecutor(wiring.runtime, wiring.client_store, device=cfg.engine.device)
    return InProcessExecutor(wiring.runtime, wiring.client_store, device=cfg.engine.device)


ExecutorFactory = Callable[[Wiring], ClientExecutor]


def run_simulation(
    cfg: RunConfig,
    out_dir: Path,
    resume: bool = False,
    on_start: Callable[[RunConfig, FederatedDataset, int], None] | None = None,
    on_round: RoundCallback | None = None,
) -> dict[str, Any]:
    """Run (or resume) a simulated federated job and write its run directory.

    With ``resume=True`` the configuration stored in ``out_dir`` is used, rounds after
    the last checkpoint are discarded, and training continues from that checkpoint.
    """
    return run_federation(cfg, out_dir, make_executor, resume, on_start, on_round)


def run_federation(
    cfg: RunConfig,
    out_dir: Path,
    executor_factory: ExecutorFactory,
    resume: bool = False,
    on_start: Callable[[RunConfig, FederatedDataset, int], None] | None = None,
    on_round: RoundCallback | None = None,
    *,
    deployment: bool = False,
    data: FederatedDataset | None = None,
    learner_factory: Callable[[], Learner] | None = None,
    callbacks: Sequence[Callback] = (),
    aggregator: Any = None,
) -> dict[str, Any]:
    """The run every runtime shares: store, strategy, rounds, outputs.

    Only ``executor_factory`` differs between runtimes (in-process, pool, gRPC
    deployment), which is what makes their results comparable. ``data`` and
    ``learner_factory`` replace the config's built-in data set and model (the Python API).
    """
    store = RunStore.open(out_dir) if resume else None
    if store is not None:
        cfg = config_from_dict(store.config())
    if cfg.mode in RUN_MODES:  # a mode with its own parties and loop (vertical FL)
        return _run_own_mode(
            cfg,
            out_dir,
            store,
            on_round,
            custom=deployment or data is not None or learner_factory is not None,
        )
    if deployment and cfg.mode not in ("sync", "async"):
        raise ConfigError(
            f"mode = '{cfg.mode}' runs in simulation only so far (the gRPC server runs "
            "synchronous or asynchronous rounds); set mode = 'sync' for fedloom server"
        )
    if data is None:
        data = build_federated_dataset(cfg.data, cfg.seed)
    if store is None and deployment:
        cfg = _pin_for_sites(cfg, data)
    if store is None:
        store = RunStore.create(out_dir, cfg.to_dict(), __version__)
        write_client_summary(data, out_dir)
    learner = learner_factory() if learner_factory is not None else build_learner(cfg, data)
    runtime = build_client_runtime(cfg, learner, _data_of(data), num_clients=data.num_clients)
    # The server's examples (its test set); stages that train on the server (FLTrust)
    # reserve a slice, and central evaluation uses what nobody reserved.
    server_data = ServerData(data.test, seed=cfg.seed)
    # Stage callbacks that score the model on other inputs (a backdoor's triggers) get the
    # server's evaluation set once stages have reserved their examples (set below).
    bench = ServerTestBench(data.test, lambda v, ds: learner.evaluate(v, ds, cfg.eval.batch_size))
    strategy = build_strategy(
        cfg,
        num_clients=data.num_clients,
        spec=learner.binding.spec,
        roles_in_process=not deployment,
        aggregator=aggregator,
        server_model=ServerModel.of(learner, test=data.test, num_classes=data.num_classes),
        server_data=server_data,
        learner_factory=learner_factory or partial(build_learner, cfg, data),
        bench=bench,
        deployment=deployment,
    )
    test_set = central_test_set(data, cfg, server_data.evaluation_set())
    bench.test_set = test_set
    started = time.perf_counter()
    wall_before = float(store.get_meta("wall_s", 0.0))
    wiring = Wiring(
        cfg=cfg,
        data=data,
        runtime=runtime,
        client_store=ClientStateStore(out_dir / "client_state"),
        roles=strategy.roles(),
        upload_sizes=strategy.wire_layout(),
        run_id=_run_id(store),
        runtime_factory=None
        if learner_factory is not None
        else partial(simulation_runtime, cfg.model_dump_json()),
    )
    executor = executor_factory(wiring)
    try:
        evaluation = Evaluation(
            every=cfg.eval.every,
            centralized=cfg.eval.centralized,
            federated=cfg.eval.federated,
            central_evaluator=lambda v: learner.evaluate(v, test_set, cfg.eval.batch_size),
            eval_clients=data.clients_with_tests() if cfg.eval.federated else [],
        )
        server = make_server(
            cfg,
            strategy=strategy,
            client_examples=data.client_sizes().tolist(),
            evaluate_model=lambda v: learner.evaluate(v, test_set, cfg.eval.batch_size),
            # Deployed clients train on their own time: asynchronous rounds then take
            # results as they arrive, not from the virtual clock.
            wall_clock=deployment,
            executor=executor,
            initial_weights=learner.initial_vector(),
            num_clients=data.num_clients,
            rounds=cfg.rounds,
            seed=cfg.seed,
            # Callbacks that only read the record (trackers) run once it is stored.
            callbacks=[
                evaluation,
                *(c for c in (*strategy.callbacks, *callbacks) if not c.after_record),
                RoundRecorder(),
                *(c for c in (*strategy.callbacks, *callbacks) if c.after_record),
                Checkpointer(cfg.checkpoint_every),
            ],
            store=store,
        )
        if resume:
            ckpt = store.latest_checkpoint()
            store.truncate_after(ckpt.round if ckpt is not None else 0)
            if ckpt is not None:
                server.restore(ckpt, store.history())
        if on_start is not None:
            on_start(cfg, data, server.state.round)

        def round_done(record: dict[str, Any]) -> None:
            # Every round, not only at the end: a killed process keeps its stretch's time,
            # so wall_s covers the whole run across resumes.
            store.set_meta("wall_s", wall_before + time.perf_counter() - started)
            if on_round is not None:
                on_round(record)

        server.run(round_done)
    finally:
        executor.close()
        store.set_meta("wall_s", wall_before + time.perf_counter() - started)
    summary = write_outputs(store, out_dir, cfg, data.num_clients, server.state.participation)
    store.close()
    for cb in server.callbacks:
        cb.on_outputs_written(out_dir, summary)
    return summary


def _pin_for_sites(cfg: RunConfig, data: FederatedDataset) -> RunConfig:
    """The config a deployment sends its sites: the data keys the server derived from its
    own files (a CSV's schema) pinned where the user left them unset."""
    unset = {k: v for k, v in data.pinned.items() if getattr(cfg.data, k) is None}
    if not unset:
        return cfg
    log.info("pinned for every site: %s", ", ".join(f"data.{k}" for k in unset))
    pinned = cfg.model_copy(deep=True)
    pinned.data = cfg.data.model_copy(update=unset)
    return config_from_dict(pinned.to_dict())


def _run_own_mode(
    cfg: RunConfig,
    out_dir: Path,
    store: RunStore | None,
    on_round: RoundCallback | None,
    *,
    custom: bool,
) -> dict[str, Any]:
    """A registered run mode's loop, in the same run directory and outputs as any run."""
    if custom:
        raise ConfigError(
            f"mode = '{cfg.mode}' runs in simulation on its built-in data sets only so far; "
            "use fedloom run with the config"
        )
    if store is not None:
        store.close()
        raise ConfigError(
            f"a mode = '{cfg.mode}' run cannot be resumed yet; start a new run directory"
        )
    store = RunStore.create(out_dir, cfg.to_dict(), __version__)
    started = time.perf_counter()
    try:
        participation = RUN_MODES.create(cfg.mode, cfg, store, on_round=on_round)
    finally:
        store.set_meta("wall_s", time.perf_counter() - started)
    summary = write_outputs(store, out_dir, cfg, len(participation), participation)
    store.close()
    return summary


def _run_id(store: RunStore) -> str:
    """The run's random identity, made once when the run starts and kept by resumes."""
    run_id = store.get_meta("run_id")
    if not isinstance(run_id, str) or not run_id:
        run_id = uuid.uuid4().hex
        store.set_meta("run_id", run_id)
    return run_id


def _data_of(data: FederatedDataset) -> Callable[[int], ClientData]:
    def data_of(client_id: int) -> ClientData:
        return data.clients[client_id]

    return data_of


def central_test_set(
    data: FederatedDataset, cfg: RunConfig, test: ArrayDataset | None = None
) -> ArrayDataset:
    """The server's test set (``test``: what is left of it once stages reserved their
    examples), or a fixed random subset of ``eval.max_examples`` of it."""
    test = data.test if test is None else test
    limit = cfg.eval.max_examples
    if limit is None or len(test) <= limit:
        return test
    index = np.sort(derive_rng(cfg.seed, EVAL_SUBSET).choice(len(test), limit, replace=False))
    return test.subset(index)


def write_outputs(
    store: RunStore,
    out_dir: Path,
    cfg: RunConfig,
    num_clients: int,
    participation: np.ndarray | None = None,
) -> dict[str, Any]:
    """summary.json, history.csv and accuracy.png from what the store holds."""
    from fedloom.report import plot_accuracy

    history = store.history()
    if participation is None:
        ckpt = store.latest_checkpoint()
        participation = ckpt.tensors["participation"] if ckpt is not None else np.zeros(num_clients)
    centralized = store.get_meta("centralized_accuracy")
    contributors = {int(i) for i in np.flatnonzero(participation)}
    metrics = run_metrics(history, num_clients, cfg.target_accuracy, centralized, contributors)
    # The last centrally evaluated round (accuracy, or loss alone for regression).
    final: dict[str, Any] = next(
        (
            r
            for r in reversed(history)
            if r.get("accuracy") is not None or r.get("loss") is not None
        ),
        {},
    )
    final_out: dict[str, Any] = {"accuracy": final.get("accuracy"), "loss": final.get("loss")}
    # Federated and personalized evaluation: the last round that had each.
    for key in (
        "fed_accuracy",
        "fed_loss",
        "personalized_accuracy",
        "personalized_loss",
        "client_accuracy_mean",
        "client_accuracy_worst10",
        "client_accuracy_std",
    ):
        value = next((r[key] for r in reversed(history) if r.get(key) is not None), None)
        if value is not None:
            final_out[key] = value
    failure = no_usable_round(history, store.get_meta("stopped_reason"), store.failures())
    summary = {
        "fedloom_version": __version__,
        "config": cfg.to_dict(),
        # "failed": no round changed the model (the reason is in "failure"); "stopped": a
        # callback ended the run early ("stopped_reason"); else "completed".
        "outcome": "failed"
        if failure is not None
        else ("stopped" if store.get_meta("stopped_reason") else "completed"),
        "rounds_completed": len(history),
        "wall_s": float(store.get_meta("wall_s", 0.0)),
        "final": final_out,
        "metrics": metrics,
        "history": history,
    }
    # Central DP: the privacy ledger (ε, δ, q, z, T, C, accountant) and, when the privacy
    # budget ended the run early, why; an attacked run's kind and malicious clients;
    # vertical FL's PSI alignment report and per-party baselines. Absent where unused.
    # Per-client quality and contribution: why they are absent where a stage withheld them.
    for key in (
        "privacy",
        "stopped_reason",
        "attack",
        "alignment",
        "baselines",
        "client_quality",
        "contribution",
    ):
        value = store.get_meta(key)
        if value is not None:
            summary[key] = value
    if failure is not None:
        summary["failure"] = failure
    store.write_summary(summary)
    store.write_history_csv()
    plot_accuracy(
        history,
        out_dir / "accuracy.png",
        baseline_accuracy=centralized,
        target_accuracy=cfg.target_accuracy,
        title=f"{cfg.name}: {cfg.strategy or 'custom'} on {cfg.data.name}",
    )
    return summary


def no_usable_round(
    history: Sequence[dict[str, Any]],
    stopped_reason: str | None,
    failures: Sequence[dict[str, Any]],
) -> str | None:
    """Why no round of the run changed the global model, in one line (None if one did).

    A usable round aggregated at least one client's update; a run without one (every
    round discarded, short of ``server.min_aggregate_clients``, or stopped before its
    first round) produced nothing, and must not look like a success.
    """
    # Records of a mode without aggregation (vertical FL) carry neither key: usable.
    if any(r.get("aggregated", True) and r.get("clients_succeeded", 1) > 0 for r in history):
        return None
    if not history:
        why = stopped_reason or "no round ran"
        return f"no usable round: {why}"
    discarded = [r for r in history if r.get("discarded")]
    parts = [f"none of the {len(history)} rounds aggregated a client update"]
    if discarded:
        parts.append(f"{len(discarded)} discarded (last: {discarded[-1]['discarded']})")
    if failures:
        last = failures[-1]
        error = (str(last["error"]).splitlines() or [""])[0]
        parts.append(f"last client failure: client {last['client_id']}: {error}")
    if stopped_reason:
        parts.append(f"stopped: {stopped_reason}")
    return "no usable round: " + "; ".join(parts)


def centralized_epochs(cfg: RunConfig) -> int:
    """The same budget as the federated run: examples processed, on average per client.

    A federated run where a fraction f of clients do E epochs for R rounds touches
    R·f·E epochs' worth of the pooled data; centralized training gets exactly that.
    """
    return max(1, round(cfg.rounds * cfg.server.fraction_fit * cfg.client.epochs))


def run_centralized(cfg: RunConfig) -> dict[str, Any]:
    """Train the same model on all clients' data pooled together, with the same budget."""
    torch.set_num_threads(cfg.engine.torch_threads)
    data = build_federated_dataset(cfg.data, cfg.seed)
    pooled = FederatedDataset(
        name=data.name,
        kind=data.kind,
        clients=[ClientData(0, "pooled", data.pooled_train())],
        test=data.test,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        vocab=data.vocab,
    )
    epochs = centralized_epochs(cfg)
    central_cfg = cfg.model_copy(deep=True)
    central_cfg.client.epochs = epochs
    central_cfg.client.steps = None
    central_cfg.client.straggler_fraction = 0.0
    central_cfg.client.proximal_mu = 0.0
    central_cfg.client.algorithm = "sgd"
    central_cfg.attack.kind = "none"
    # The baseline is non-private training on pooled data: no client-side clipping.
    central_cfg.privacy.mechanism = "none"
    central_cfg.privacy.local_dp = False
    central_cfg.privacy.local_delta = None
    learner = build_learner(central_cfg, pooled)
    runtime = build_client_runtime(central_cfg, learner, _data_of(pooled), num_clients=1)
    started = time.perf_counter()
    w0 = learner.initial_vector()
    result = runtime.fit(
        FitTask(client_id=0, round=1, model_version=0), {GLOBAL: w0}, ClientStateStore().get(0)
    )
    assert result.delta is not None
    metrics = learner.evaluate(w0 + result.delta, central_test_set(data, cfg), cfg.eval.batch_size)
    return {
        "accuracy": metrics.get("accuracy"),
        "loss": metrics["loss"],
        "epochs": epochs,
        "examples": len(pooled.clients[0].train),
        "wall_s": time.perf_counter() - started,
    }
