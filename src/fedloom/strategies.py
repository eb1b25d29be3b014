"""Assemble a run's stages from its configuration: the server's strategy and the
client's runtime. This is the one place that maps config sections to stages.

Each stage is built from its own section (or its own keys of one) and receives nothing
else; the names come from the registries, so a user's registered stage is built exactly
like a built-in one. The combinations that cannot work are refused here, before
training, with one line saying what to change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedloom.algorithms.base import AlgorithmSettings, StageContext
from fedloom.algorithms.dpsgd import LocalDPSettings
from fedloom.attacks.metrics import attack_callbacks
from fedloom.attacks.poisoning import AttackSettings, attack_algorithm_name
from fedloom.callbacks import Callback
from fedloom.client.learner import Learner, SGDSettings, WorkSettings
from fedloom.client.models import build_model
from fedloom.client.runtime import ClientRuntime
from fedloom.client.transfer import check_transfer_composition, prepare_transfer
from fedloom.codecs.base import float_layout
from fedloom.config import ConfigError, RunConfig
from fedloom.data.base import ClientData, FederatedDataset
from fedloom.data.server import ServerData
from fedloom.params import ParamSpec
from fedloom.registry import (
    AGGREGATORS,
    BROADCAST_CODECS,
    CALLBACKS,
    CLIENT_ALGORITHMS,
    CLIENT_SELECTORS,
    CODECS,
    MODEL_TRANSFORMS,
    SECURE_AGGREGATIONS,
    SERVER_ALGORITHMS,
    SERVER_OPTIMIZERS,
    UPDATE_INTERCEPTORS,
    UPDATE_MONITORS,
)
from fedloom.server.arrivals import ArrivalModel, InstantArrivals
from fedloom.server.callbacks import ServerTestBench
from fedloom.server.client_quality import hidden_reason
from fedloom.server.contribution import check_contribution
from fedloom.server.guards import GuardRails, guard_settings
from fedloom.server.loop import FederatedServer
from fedloom.server.optimizers import make_server_optimizer
from fedloom.server.sampling import expected_clients_per_round
from fedloom.server.strategy import Strategy
from fedloom.server.transforms import ServerModel


def algorithm_settings(cfg: RunConfig) -> AlgorithmSettings:
    p = cfg.privacy
    local = None
    if p.local_dp:
        local = LocalDPSettings(
            noise_multiplier=p.local_noise_multiplier,
            max_grad_norm=p.local_max_grad_norm,
            local_delta=p.local_delta,
            central_delta=p.delta,
            secure_noise=p.secure_noise,
        )
    return AlgorithmSettings(
        proximal_mu=cfg.client.proximal_mu,
        server_lr=cfg.server.lr,
        options=dict(cfg.client.options),
        personal=cfg.personal,
        local_dp=local,
    )


def client_algorithm_name(cfg: RunConfig) -> str:
    """The registered client algorithm this run trains with (local DP swaps in DP-SGD)."""
    if cfg.privacy.local_dp:
        return "dp-sgd"
    return cfg.client.algorithm


def check_attack_knowledge(cfg: RunConfig, *, deployment: bool = False) -> None:
    """Refuse the omniscient adversary where its threat model cannot hold: it is a
    server-side oracle over the clear, decoded updates of a synchronous simulated round."""
    a = cfg.attack
    if a.kind == "none" or a.knowledge != "omniscient":
        return
    why = None
    if deployment:
        why = "is simulation-only: a deployed client process cannot see the other clients' updates"
    elif cfg.mode != "sync":
        why = f"sees a synchronous round's honest updates, which mode = '{cfg.mode}' has not"
    elif cfg.privacy.secure_aggregation != "none":
        why = "needs the honest updates in the clear, which secure aggregation hides"
    elif cfg.privacy.mechanism == "central":
        why = "crafts the decoded update, which would skip central DP's client-side clipping"
    elif cfg.compression.kind != "none":
        why = "crafts the decoded update, which would skip the compression clients apply"
    if why is not None:
        raise ConfigError(f"attack.knowledge = 'omniscient' {why}; set attack.knowledge = 'own'")


def check_composition(cfg: RunConfig) -> None:
    """Refuse stage combinations that cannot work, with one line each."""
    for registry, name, key in (
        (CLIENT_ALGORITHMS, cfg.client.algorithm, "client.algorithm"),
        (SERVER_ALGORITHMS, cfg.server.algorithm, "server.algorithm"),
        (AGGREGATORS, cfg.server.aggregator, "server.aggregator"),
        (SERVER_OPTIMIZERS, cfg.server.optimizer, "server.optimizer"),
        (CLIENT_SELECTORS, cfg.server.selection, "server.selection"),
    ):
        if name not in registry:
            raise ConfigError(f"{key}: {registry_error(registry, name)}")
    for name in cfg.callbacks:
        if name not in CALLBACKS:
            raise ConfigError(f"callbacks: {registry_error(CALLBACKS, name)}")
    attack = attack_algorithm_name(cfg.attack.kind)
    if cfg.attack.kind != "none" and attack not in CLIENT_ALGORITHMS:
        raise ConfigError(f"attack.kind: {registry_error(CLIENT_ALGORITHMS, attack)}")
    outside = [c for c in cfg.attack.clients or [] if not 0 <= c < cfg.data.num_clients]
    if outside:
        raise ConfigError(
            f"attack.clients: client {outside[0]} does not exist (0..{cfg.data.num_clients - 1})"
        )
    check_attack_knowledge(cfg)
    check_transfer_composition(cfg)
    p = cfg.privacy
    if p.local_dp and cfg.client.algorithm != "sgd":
        raise ConfigError(
            f"privacy.local_dp trains clients with DP-SGD, which replaces client.algorithm = "
            f"'{cfg.client.algorithm}'; use strategy fedavg or fedprox with local DP"
        )
    if (p.mechanism == "central" or p.secure_aggregation != "none") and cfg.client.algorithm in (
        "scaffold",
    ):
        raise ConfigError(
            "SCAFFOLD's control variates are uploaded beside the update and are not covered "
            "by central DP; turn privacy.mechanism off or choose another strategy"
            if p.mechanism == "central"
            else "SCAFFOLD with secure aggregation is not supported yet; turn "
            "privacy.secure_aggregation off or choose another strategy"
        )
    sysc = cfg.system
    if (
        sysc.enabled
        and (sysc.over_selection > 0 or sysc.availability < 1)
        and (p.mechanism == "central")
    ):
        raise ConfigError(
            "system.over_selection and system.availability change which clients are sampled, "
            "which central DP's accountant does not model; set them to 0 and 1 or turn "
            "privacy.mechanism off"
        )
    if sysc.enabled and sysc.over_selection > 0 and cfg.server.sampling == "poisson":
        raise ConfigError(
            "system.over_selection needs server.sampling = 'fixed' (a Poisson cohort has "
            "no fixed size to over-select); set one of them"
        )
    if cfg.mode == "async":
        _check_async(cfg)
    if cfg.mode == "gossip":
        _check_gossip(cfg)
    if cfg.server.selection != "uniform":
        if p.mechanism == "central":
            raise ConfigError(
                f"server.selection = '{cfg.server.selection}' is biased on purpose, and central "
                "DP's accountant assumes uniform sampling; set server.selection = 'uniform'"
            )
        if cfg.server.sampling == "poisson":
            raise ConfigError(
                f"server.selection = '{cfg.server.selection}' picks a fixed-size cohort; set "
                "server.sampling = 'fixed'"
            )
    if cfg.guards.norm_outliers == "on" and (
        p.mechanism == "central" or p.secure_aggregation != "none"
    ):
        raise ConfigError(
            "guards.norm_outliers = 'on' rejects updates by the other clients' norms, which "
            "the clipping of central DP or secure aggregation already bounds (and which "
            "central DP's analysis does not cover); set guards.norm_outliers = 'auto'"
        )
    if p.mechanism == "central" and cfg.server.aggregator != "mean":
        raise ConfigError(
            f"central DP adds noise to the mean of clipped updates; server.aggregator = "
            f"'{cfg.server.aggregator}' has another sensitivity, set server.aggregator = 'mean'"
        )
    check_anomaly(cfg)
    check_contribution(cfg)
    check_compression(cfg)
    check_partial_work(cfg)


def check_partial_work(cfg: RunConfig) -> None:
    """``system.partial_work`` sends stragglers' partial updates: the strategy must keep
    them, and only synchronous rounds have the deadline it fits work into."""
    s = cfg.system
    if not (s.enabled and s.partial_work):
        return
    if cfg.server.drop_stragglers:
        raise ConfigError(
            "system.partial_work sends stragglers' partial updates, which "
            "server.drop_stragglers = true discards; set server.drop_stragglers = false "
            "(strategies fedprox and fednova keep partial work)"
        )
    if cfg.mode != "sync":
        raise ConfigError(
            f"system.partial_work fits local work into a synchronous round's deadline; "
            f"remove it with mode = '{cfg.mode}'"
        )


def check_anomaly(cfg: RunConfig) -> None:
    """The ``anomaly`` section reads every update and may steer sampling by it."""
    a, p = cfg.anomaly, cfg.privacy
    if not a.enabled:
        return
    if p.secure_aggregation != "none":
        raise ConfigError(
            "anomaly detection reads every client's update, which secure aggregation hides "
            "from the server; set anomaly.enabled = false or privacy.secure_aggregation = 'none'"
        )
    if a.exclude_below is not None and p.mechanism == "central":
        raise ConfigError(
            "anomaly.exclude_below makes who is sampled depend on what clients sent, which the "
            "central DP accountant's sampling does not cover; unset it or turn privacy off"
        )


def _check_async(cfg: RunConfig) -> None:
    """What asynchronous rounds support today, each refusal in one line."""
    p = cfg.privacy
    if p.mechanism == "central":
        raise ConfigError(
            "mode = 'async' with central DP is not supported: the accountant models "
            "sampled synchronous rounds; set mode = 'sync' or privacy.mechanism = 'none'"
        )
    if p.secure_aggregation != "none":
        raise ConfigError(
            "mode = 'async' applies updates one buffer at a time and cannot run a secure-"
            "aggregation protocol per buffer yet; turn privacy.secure_aggregation off"
        )
    if p.local_dp or cfg.client.algorithm != "sgd" or cfg.server.algorithm != "fedavg":
        raise ConfigError(
            "mode = 'async' runs FedAvg-style clients (client.algorithm = 'sgd', "
            "server.algorithm = 'fedavg', no local DP); change the strategy or set mode = 'sync'"
        )
    if cfg.system.deadline_s is not None or cfg.system.over_selection > 0:
        raise ConfigError(
            "system.deadline_s and system.over_selection shape synchronous rounds; remove "
            "them with mode = 'async' (its rounds end when the buffer fills)"
        )
    a = cfg.async_
    concurrency = a.concurrency if a.concurrency is not None else 2 * a.buffer_size
    if a.algorithm == "fedbuff" and min(concurrency, cfg.data.num_clients) < a.buffer_size:
        raise ConfigError(
            f"async.buffer_size ({a.buffer_size}) exceeds the clients that can train at once "
            f"({min(concurrency, cfg.data.num_clients)}); lower it or raise async.concurrency"
        )


def _check_gossip(cfg: RunConfig) -> None:
    p = cfg.privacy
    if p.mechanism == "central" or p.secure_aggregation != "none" or p.local_dp:
        raise ConfigError(
            "mode = 'gossip' has no server to add noise or run secure aggregation; turn the "
            "privacy section off or set mode = 'sync'"
        )
    if cfg.compression.kind != "none" or cfg.compression.downlink != "none":
        raise ConfigError(
            "mode = 'gossip' exchanges whole models between peers and has no compression "
            "yet; set compression.kind and compression.downlink to 'none'"
        )
    if cfg.client.algorithm != "sgd":
        raise ConfigError(
            "mode = 'gossip' trains peers with plain local SGD (client.algorithm = 'sgd'); "
            "change the strategy or set mode = 'sync'"
        )


def make_server(
    cfg: RunConfig,
    *,
    strategy: Strategy,
    client_examples: Sequence[int],
    evaluate_model: Callable[[np.ndarray], dict[str, float]] | None = None,
    wall_clock: bool = False,
    **server_args: Any,
) -> FederatedServer:
    """The round loop ``cfg.mode`` asks for, over ``strategy``'s stages.

    ``evaluate_model`` scores one model vector (gossip evaluates every peer's own).
    ``wall_clock``: clients run on their own time (a deployment), so asynchronous rounds
    take results as they really arrive instead of from the virtual clock."""
    if cfg.mode == "sync":
        return FederatedServer(strategy=strategy, **server_args)
    if cfg.mode == "gossip":
        from fedloom.gossip.loop import GossipServer, GossipSettings

        g = cfg.gossip
        gossip = GossipSettings(
            topology=g.topology,
            edge_probability=g.edge_probability,
            time_varying=g.time_varying,
            eval_every=cfg.eval.every,
        )
        return GossipServer(
            settings=gossip, evaluate_model=evaluate_model, strategy=strategy, **server_args
        )
    from fedloom.server.async_loop import AsyncFederatedServer, AsyncSettings
    from fedloom.system.clock import client_time, planned_examples
    from fedloom.system.profiles import draw_profiles

    a = cfg.async_
    if wall_clock:
        from fedloom.server.async_wallclock import WallClockAsyncServer

        fedasync = a.algorithm == "fedasync"
        live = AsyncSettings(
            algorithm=a.algorithm,
            buffer_size=1 if fedasync else a.buffer_size,
            # Unset: every connected client trains (there are no more than num_clients).
            concurrency=a.concurrency if a.concurrency is not None else len(client_examples),
            staleness_exponent=a.staleness_exponent,
            mixing=a.mixing,
        )
        return WallClockAsyncServer(settings=live, strategy=strategy, **server_args)
    profiles = draw_profiles(cfg.system, num_clients=len(client_examples), seed=cfg.seed)
    up_bytes = sum(n * np.dtype(dt).itemsize for n, dt in strategy.wire_layout().values())

    def planned_duration(client_id: int, model_bytes: int) -> float:
        work = planned_examples(
            client_examples[client_id],
            batch_size=cfg.client.batch_size,
            epochs=cfg.client.epochs,
            steps=cfg.client.steps,
        )
        t = client_time(
            profiles, client_id, down_bytes=model_bytes, examples=work, up_bytes=up_bytes
        )
        return t.total

    buffer = 1 if a.algorithm == "fedasync" else a.buffer_size
    concurrency = a.concurrency if a.concurrency is not None else 2 * buffer
    settings = AsyncSettings(
        algorithm=a.algorithm,
        buffer_size=buffer,
        concurrency=min(concurrency, len(client_examples)),
        staleness_exponent=a.staleness_exponent,
        mixing=a.mixing,
    )
    return AsyncFederatedServer(
        settings=settings, planned_duration=planned_duration, strategy=strategy, **server_args
    )


def _selector(cfg: RunConfig) -> Any:
    try:
        return CLIENT_SELECTORS.create(cfg.server.selection, cfg.server.selection_options)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"server.selection_options for '{cfg.server.selection}': {err}; fix the options"
        ) from None


def check_compression(cfg: RunConfig) -> None:
    """The ``compression`` section against the rest of the run, one line each."""
    c, p = cfg.compression, cfg.privacy
    if c.kind == "none":
        if c.error_feedback is not None:
            raise ConfigError(
                "compression.error_feedback is set but compression.kind is 'none'; choose a "
                "compressor (topk, randk, qsgd, int8, sign) or remove error_feedback"
            )
        return
    if p.mechanism == "central":
        raise ConfigError(
            f"compression.kind = '{c.kind}' changes the clipped update after clipping, which "
            "central DP's analysis does not cover; set compression.kind = 'none' with central DP"
        )
    if p.secure_aggregation != "none" and c.kind != "randk":
        raise ConfigError(
            f"compression.kind = '{c.kind}' gives each client its own encoding, which secure "
            "aggregation cannot sum; use compression.kind = 'randk' (shared coordinates) or "
            "turn privacy.secure_aggregation off"
        )


def uplink_codecs(cfg: RunConfig, context: StageContext) -> list[Any]:
    """The update codecs of ``cfg``, in client encoding order: clipping, then compression."""
    codecs: list[Any] = []
    if cfg.privacy.mechanism == "central":
        codecs.append(CODECS.create("clip", cfg.privacy, context))
    if cfg.compression.kind != "none":
        codecs.append(CODECS.create(cfg.compression.kind, cfg.compression, context))
    return codecs


def downlink_codec(cfg: RunConfig, context: StageContext) -> Any:
    if cfg.compression.downlink == "none":
        return None
    return BROADCAST_CODECS.create(cfg.compression.downlink, cfg.compression, context)


def encoded_upload_bytes(algorithm: Any, codecs: Sequence[Any], size: int) -> int:
    """One client's upload as it travels: the algorithm's uploads through the codecs'
    encoded layouts (what ``Strategy.wire_layout`` describes)."""
    layout = float_layout(algorithm.upload_sizes(size))
    for codec in codecs:
        layout = codec.encoded_layout(layout)
    return int(sum(n * np.dtype(dt).itemsize for n, dt in layout.values()))


def traffic_bytes(cfg: RunConfig, *, num_clients: int, spec: ParamSpec) -> tuple[int, int]:
    """Bytes one sampled client downloads and uploads per round, as encoded, built from
    the server algorithm and the codecs alone (no aggregator, no server data): what
    ``fedloom estimate`` needs to know before anything runs."""
    cc = cfg.client
    context = StageContext(
        num_clients=num_clients,
        spec=spec,
        seed=cfg.seed,
        expected_clients=expected_clients_per_round(cfg.server, num_clients),
        work=WorkSettings(epochs=cc.epochs, steps=cc.steps, batch_size=cc.batch_size),
        sgd=SGDSettings(lr=cc.lr, momentum=cc.momentum, weight_decay=cc.weight_decay),
    )
    algorithm = SERVER_ALGORITHMS.create(cfg.server.algorithm, algorithm_settings(cfg), context)
    broadcast = algorithm.broadcast(np.zeros(spec.size, dtype=np.float32))
    downlink = downlink_codec(cfg, context)
    if downlink is not None:
        broadcast = downlink.encode(broadcast)
    down = sum(v.nbytes for v in broadcast.values())
    return down, encoded_upload_bytes(algorithm, uplink_codecs(cfg, context), spec.size)


def registry_error(registry: Any, name: str) -> str:
    return f"unknown {registry.kind} '{name}'; registered: {', '.join(registry.names())}"


def build_strategy(
    cfg: RunConfig,
    *,
    num_clients: int,
    spec: ParamSpec,
    roles_in_process: bool,
    callbacks: Sequence[Callback] = (),
    aggregator: Any = None,
    server_model: ServerModel | None = None,
    server_data: ServerData | None = None,
    learner_factory: Callable[[], Learner] | None = None,
    bench: ServerTestBench | None = None,
    deployment: bool = False,
) -> Strategy:
    """The server's stages for ``cfg``. ``roles_in_process``: simulate protocol roles
    (CKKS's key holder) here instead of expecting them to connect. ``server_model``: the
    model the server runs, for stages that train it (the watermark). ``server_data`` and
    ``learner_factory`` reach stages that train on the server (FLTrust) through their
    :class:`StageContext`; a stage reserves its examples from ``server_data``. ``bench``:
    the server's test set and evaluator, for stage callbacks that measure more than clean
    accuracy (a backdoor's success). ``deployment``: real clients, so the guard rails'
    "auto" settings take their deployment values."""
    check_composition(cfg)
    check_attack_knowledge(cfg, deployment=deployment)
    cc = cfg.client
    context = StageContext(
        num_clients=num_clients,
        spec=spec,
        seed=cfg.seed,
        expected_clients=expected_clients_per_round(cfg.server, num_clients),
        server_data=server_data,
        learner_factory=learner_factory,
        work=WorkSettings(epochs=cc.epochs, steps=cc.steps, batch_size=cc.batch_size),
        sgd=SGDSettings(lr=cc.lr, momentum=cc.momentum, weight_decay=cc.weight_decay),
    )
    settings = algorithm_settings(cfg)
    algorithm = SERVER_ALGORITHMS.create(cfg.server.algorithm, settings, context)
    if aggregator is None:
        aggregator = AGGREGATORS.create(
            cfg.server.aggregator, cfg.server.aggregator_options, context
        )
    codecs: list[Any] = []
    stage_callbacks: list[Callback] = []
    dp = None
    if cfg.privacy.mechanism == "central":
        from fedloom.privacy.accounting import ClientSampling
        from fedloom.privacy.stages import central_dp_stages

        sampling = ClientSampling(cfg.server.sampling, num_clients, context.expected_clients)
        stages = central_dp_stages(cfg.privacy, sampling=sampling, rounds=cfg.rounds, seed=cfg.seed)
        dp = stages.mechanism
        codecs.append(stages.codec)
        aggregator = stages.aggregator
        stage_callbacks.append(stages.callback)
    if cfg.compression.kind != "none":
        codecs.append(CODECS.create(cfg.compression.kind, cfg.compression, context))
    if cfg.privacy.local_dp:
        from fedloom.algorithms.dpsgd import LocalEpsilonReport

        stage_callbacks.append(LocalEpsilonReport())
    secure = None
    if cfg.privacy.secure_aggregation != "none":
        secure = SECURE_AGGREGATIONS.create(
            cfg.privacy.secure_aggregation, cfg.privacy, dp, roles_in_process
        )
    hidden = hidden_reason(
        secure_aggregation=cfg.privacy.secure_aggregation,
        reveal_client_metrics=cfg.privacy.reveal_client_metrics,
    )
    stage_callbacks.append(CALLBACKS.create("client-quality", {"hidden": hidden}))
    for name in cfg.callbacks:
        stage_callbacks.append(CALLBACKS.create(name, dict(cfg.callback_options.get(name, {}))))
    stage_callbacks.extend(tracking_callbacks(cfg))
    arrivals: ArrivalModel = InstantArrivals()
    if cfg.system.enabled and cfg.mode == "sync":  # async rounds keep their own clock
        from fedloom.system.clock import virtual_clock

        held_bytes = 4 * sum(algorithm.upload_sizes(spec.size).values())
        arrivals = virtual_clock(
            cfg,
            num_clients=num_clients,
            held_upload_bytes=held_bytes,
            upload_bytes=encoded_upload_bytes(algorithm, codecs, spec.size),
        )
    transforms: list[Any] = []
    if cfg.watermark.enabled:
        if server_model is None:
            raise ConfigError(
                "watermark.enabled trains the global model on the server, which needs the "
                "model there; run it through fedloom run / simulate / serve"
            )
        transforms.append(MODEL_TRANSFORMS.create("waffle", cfg.watermark, context, server_model))
    # A transform that writes into the run directory does so through callback hooks.
    stage_callbacks.extend(t for t in transforms if isinstance(t, Callback))
    monitors = (
        [UPDATE_MONITORS.create("anomaly", cfg.anomaly, context)] if cfg.anomaly.enabled else []
    )
    if cfg.contribution.method != "none":
        monitors.append(UPDATE_MONITORS.create("contribution", cfg.contribution, context))
    stage_callbacks.extend(
        attack_callbacks(cfg.attack, num_clients=num_clients, seed=cfg.seed, bench=bench)
    )
    interceptors = (
        [UPDATE_INTERCEPTORS.create("omniscient", cfg.attack, context)]
        if cfg.attack.kind != "none" and cfg.attack.knowledge == "omniscient"
        else []
    )
    try:
        return Strategy(
            algorithm=algorithm,
            aggregator=aggregator,
            optimizer=make_server_optimizer(cfg.server, spec.size),
            sampling=cfg.server,
            codecs=codecs,
            downlink=downlink_codec(cfg, context),
            secure=secure,
            transforms=transforms,
            callbacks=[*stage_callbacks, *callbacks],
            monitors=monitors,
            interceptors=interceptors,
            min_aggregate_clients=cfg.server.min_aggregate_clients,
            drop_stragglers=cfg.server.drop_stragglers,
            dimension=spec.size,
            arrivals=arrivals,
            selector=_selector(cfg),
            guards=GuardRails(
                guard_settings(
                    cfg.guards,
                    deployment=deployment,
                    clipped=cfg.privacy.mechanism == "central"
                    or cfg.privacy.secure_aggregation != "none",
                )
            ),
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def tracking_callbacks(cfg: RunConfig) -> list[Callback]:
    """The ``[tracking]`` section's trackers (registered callbacks; they run after the
    round record is stored, in a simulation and a deployment alike)."""
    t = cfg.tracking
    out: list[Callback] = []
    if t.tensorboard is not None:
        out.append(CALLBACKS.create("tensorboard", {"dir": t.tensorboard}))
    if t.mlflow is not None:
        out.append(CALLBACKS.create("mlflow", {"uri": t.mlflow, "experiment": t.mlflow_experiment}))
    return out


def build_client_runtime(
    cfg: RunConfig, learner: Learner, data_of: Callable[[int], ClientData], *, num_clients: int
) -> ClientRuntime:
    """The client side of ``cfg`` around ``learner``, reading data through ``data_of``."""
    check_composition(cfg)
    context = StageContext(
        num_clients=num_clients,
        spec=learner.binding.spec,
        seed=cfg.seed,
        expected_clients=expected_clients_per_round(cfg.server, num_clients),
    )
    name, settings = client_algorithm_name(cfg), algorithm_settings(cfg)
    if cfg.attack.kind != "none":
        # The attack wraps the honest algorithm; it decides per client who is malicious.
        settings = AttackSettings(
            **{f: getattr(settings, f) for f in settings.__dataclass_fields__},
            attack=cfg.attack,
            honest=name,
            data_of=data_of,
        )
        name = attack_algorithm_name(cfg.attack.kind)
    algorithm = CLIENT_ALGORITHMS.create(name, settings, context)
    check = getattr(algorithm, "check", None)
    if check is not None:
        check(learner)
    cc = cfg.client
    return ClientRuntime(
        learner=learner,
        algorithm=algorithm,
        codecs=uplink_codecs(cfg, context),
        downlink=downlink_codec(cfg, context),
        data_of=data_of,
        seed=cfg.seed,
        work=WorkSettings(
            epochs=cc.epochs,
            steps=cc.steps,
            batch_size=cc.batch_size,
            straggler_fraction=cc.straggler_fraction,
        ),
        sgd=SGDSettings(lr=cc.lr, momentum=cc.momentum, weight_decay=cc.weight_decay),
        eval_batch_size=cfg.eval.batch_size,
        clear_metrics=cfg.privacy.secure_aggregation == "none" or cfg.privacy.reveal_client_metrics,
    )


def build_learner(cfg: RunConfig, data: FederatedDataset) -> Learner:
    """The configured built-in model (deterministic in the seed) as a classifier, with the
    transfer settings applied (pretrained weights, frozen layers, LoRA adapters)."""
    return Learner(prepare_transfer(build_model(cfg.model, data, cfg.seed), cfg))


def simulation_runtime(cfg_json: str) -> ClientRuntime:
    """A client runtime built from a run config alone (a pool worker's recipe): the data
    set and the model are deterministic in the seed, so every process builds the same."""
    from fedloom.config import config_from_json
    from fedloom.data import build_federated_dataset

    cfg = config_from_json(cfg_json)
    data = build_federated_dataset(cfg.data, cfg.seed)
    learner = build_learner(cfg, data)
    return build_client_runtime(
        cfg, learner, lambda cid: data.clients[cid], num_clients=data.num_clients
    )
