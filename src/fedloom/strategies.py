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

from fedloom.algorithms.base import AlgorithmSettings, StageContext
from fedloom.algorithms.dpsgd import LocalDPSettings
from fedloom.callbacks import Callback
from fedloom.client.learner import Learner, SGDSettings, WorkSettings
from fedloom.client.models import build_model
from fedloom.client.runtime import ClientRuntime
from fedloom.config import ConfigError, RunConfig
from fedloom.data.base import ClientData, FederatedDataset
from fedloom.params import ParamSpec
from fedloom.registry import (
    AGGREGATORS,
    CALLBACKS,
    CLIENT_ALGORITHMS,
    CODECS,
    SECURE_AGGREGATIONS,
    SERVER_ALGORITHMS,
    SERVER_OPTIMIZERS,
)
from fedloom.server.guards import GuardRails, guard_settings
from fedloom.server.optimizers import make_server_optimizer
from fedloom.server.sampling import expected_clients_per_round
from fedloom.server.strategy import Strategy


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


def check_composition(cfg: RunConfig) -> None:
    """Refuse stage combinations that cannot work, with one line each."""
    for registry, name, key in (
        (CLIENT_ALGORITHMS, cfg.client.algorithm, "client.algorithm"),
        (SERVER_ALGORITHMS, cfg.server.algorithm, "server.algorithm"),
        (AGGREGATORS, cfg.server.aggregator, "server.aggregator"),
        (SERVER_OPTIMIZERS, cfg.server.optimizer, "server.optimizer"),
    ):
        if name not in registry:
            raise ConfigError(f"{key}: {registry_error(registry, name)}")
    for name in cfg.callbacks:
        if name not in CALLBACKS:
            raise ConfigError(f"callbacks: {registry_error(CALLBACKS, name)}")
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
    deployment: bool = False,
) -> Strategy:
    """The server's stages for ``cfg``. ``roles_in_process``: simulate protocol roles
    (CKKS's key holder) here instead of expecting them to connect. ``deployment``: real
    clients, so the guard rails' "auto" settings take their deployment values."""
    check_composition(cfg)
    context = StageContext(
        num_clients=num_clients,
        spec=spec,
        seed=cfg.seed,
        expected_clients=expected_clients_per_round(cfg.server, num_clients),
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
    if cfg.privacy.local_dp:
        from fedloom.algorithms.dpsgd import LocalEpsilonReport

        stage_callbacks.append(LocalEpsilonReport())
    secure = None
    if cfg.privacy.secure_aggregation != "none":
        secure = SECURE_AGGREGATIONS.create(
            cfg.privacy.secure_aggregation, cfg.privacy, dp, roles_in_process
        )
    for name in cfg.callbacks:
        stage_callbacks.append(CALLBACKS.create(name, dict(cfg.callback_options.get(name, {}))))
    try:
        return Strategy(
            algorithm=algorithm,
            aggregator=aggregator,
            optimizer=make_server_optimizer(cfg.server, spec.size),
            sampling=cfg.server,
            codecs=codecs,
            secure=secure,
            callbacks=[*stage_callbacks, *callbacks],
            min_aggregate_clients=cfg.server.min_aggregate_clients,
            drop_stragglers=cfg.server.drop_stragglers,
            dimension=spec.size,
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
    algorithm = CLIENT_ALGORITHMS.create(
        client_algorithm_name(cfg), algorithm_settings(cfg), context
    )
    check = getattr(algorithm, "check", None)
    if check is not None:
        check(learner)
    codecs = []
    if cfg.privacy.mechanism == "central":
        codecs.append(CODECS.create("clip", cfg.privacy, context))
    cc = cfg.client
    return ClientRuntime(
        learner=learner,
        algorithm=algorithm,
        codecs=codecs,
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
    """The configured built-in model (deterministic in the seed) as a classifier."""
    return Learner(build_model(cfg.model, data, cfg.seed))


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
