"""Typed run configuration: TOML files, Python objects and ``--set key=value`` overrides.

One :class:`RunConfig` describes an experiment completely, so the same object drives the
simulation engines and (later) the real deployment. Validation happens once, up front,
and every error a user can cause becomes a :class:`ConfigError` whose message is one
line naming the key and what is allowed.

A *strategy* name is a shorthand for a composition of stages (client algorithm,
aggregator, server optimizer). :func:`apply_strategy` fills in the stage settings the
strategy implies, but never overrides a value the user set explicitly.
"""

from __future__ import annotations

import importlib.util
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem the user can fix; its message is a single line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Section):
    """Synthetic(α, β) of Li et al. 2020 (FedProx), Section 5.1."""

    alpha: float = Field(1.0, ge=0.0)
    beta: float = Field(1.0, ge=0.0)
    iid: bool = False
    num_features: int = Field(60, ge=1)


class DataConfig(_Section):
    """Which data set, and how it is split across clients."""

    #: "custom": data handed to the Python API (fedloom.simulate), not loaded by name.
    name: Literal["digits", "synthetic", "mnist", "shakespeare", "csv", "custom"] = "digits"
    path: str | None = None
    num_clients: int = Field(20, ge=1)
    partition: Literal["iid", "dirichlet", "shards", "natural"] = "dirichlet"
    alpha: float = Field(0.5, gt=0.0)
    shards_per_client: int = Field(2, ge=1)
    min_client_samples: int = Field(2, ge=1)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    #: Share of each client's data held out as its local test set, for federated
    #: evaluation on data sets that have no per-client test split of their own.
    client_test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    label_column: str | None = None
    #: Make each client's data when it is sampled, from its own seed, and forget it after
    #: (synthetic only): memory then does not grow with the number of clients.
    on_demand: bool = False
    #: The CSV label values in class-id order. Pin them when clients read their own files,
    #: so a site that lacks a class still maps every label to the same id.
    classes: list[str] | None = None
    key_column: str | None = None
    #: The CSV's schema: every column by name, in file order, with its type ("numeric",
    #: "categorical", or the list of a categorical column's values, which pins its
    #: one-hot order). Each file is checked against it by name: a missing, extra,
    #: renamed or reordered column is refused. A deployment's server pins it from its own
    #: file when it is not set, so every site encodes its features alike.
    columns: dict[str, Literal["numeric", "categorical"] | list[str]] | None = None
    seq_len: int = Field(80, ge=1)
    max_clients: int | None = Field(None, ge=1)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @model_validator(mode="after")
    def _check_on_demand(self) -> DataConfig:
        if self.on_demand and self.name != "synthetic":
            raise ValueError(
                "data.on_demand makes each client's data from its seed, which only "
                "data.name = 'synthetic' can; set it to false"
            )
        return self


class ModelConfig(_Section):
    """The client model. ``hidden`` sizes apply to ``mlp``; ``logreg`` has none."""

    name: Literal["mlp", "logreg", "cnn", "char_lstm"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64])
    embedding_dim: int = Field(8, ge=1)
    lstm_hidden: int = Field(128, ge=1)
    lstm_layers: int = Field(2, ge=1)
    #: Start from these weights (a safetensors file or a PyTorch state dict ``.pt``),
    #: checked against the configured model's parameter names and shapes; ``""`` is none
    #: (so ``--set model.pretrained=''`` trains a config's model from scratch).
    pretrained: str | None = None
    #: Parameter-name prefixes kept at their starting values: neither trained nor sent.
    freeze: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _empty_pretrained_is_none(self) -> ModelConfig:
        if self.pretrained == "":
            self.pretrained = None
        return self


class ClientConfig(_Section):
    """Local training on each client (SGD with momentum and weight decay)."""

    epochs: int = Field(5, ge=1)
    steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    proximal_mu: float = Field(0.0, ge=0.0)
    straggler_fraction: float = Field(0.0, ge=0.0, le=1.0)
    #: The client algorithm, by registered name (``sgd``, ``scaffold``, ``fednova``,
    #: ``fedper``, ``fedrep``, ``ditto``, or one a user registered).
    algorithm: str = "sgd"
    #: Free-form settings for a user-registered client algorithm.
    options: dict[str, Any] = Field(default_factory=dict)
    #: ``"lora"``: train (and send) only low-rank adapters over the frozen model (``[lora]``).
    adapter: Literal["none", "lora"] = "none"


class ServerConfig(_Section):
    """Sampling, aggregation and the server optimizer (Reddi et al. 2021, Algorithm 2).

    ``sampling = "fixed"`` takes ``max(min_fit_clients, round(fraction_fit · N))`` clients
    uniformly without replacement; ``"poisson"`` takes each client independently with
    probability ``fraction_fit`` (so a round's size varies and may be 0), the sampling
    that DP-FedAvg's privacy analysis amplifies best (McMahan et al. 2018);
    ``min_fit_clients`` applies to fixed-size sampling only.
    """

    sampling: Literal["fixed", "poisson"] = "fixed"
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0)
    min_fit_clients: int = Field(2, ge=1)
    min_aggregate_clients: int = Field(1, ge=1)
    drop_stragglers: bool = False
    #: The server half of the algorithm, by registered name (``fedavg``, ``scaffold``,
    #: ``fednova``, ``personal``, or a user's).
    algorithm: str = "fedavg"
    #: The aggregator, by registered name (``mean`` or a user's).
    aggregator: str = "mean"
    #: Free-form settings passed to the aggregator's factory.
    aggregator_options: dict[str, Any] = Field(default_factory=dict)
    #: Client selection for fixed-size sampling: ``uniform``, ``power_of_choice``,
    #: ``oort``, or a user's (registered in ``CLIENT_SELECTORS``), with its options.
    selection: str = "uniform"
    selection_options: dict[str, Any] = Field(default_factory=dict)
    #: The server optimizer (``sgd``, ``momentum``, ``adam``, ``yogi``, ``adagrad``, a user's).
    optimizer: str = "sgd"
    lr: float = Field(1.0, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0)


class PersonalizationConfig(_Section):
    """Which parameters stay on the client, and the personal models' training.

    ``layers`` are parameter-name prefixes (``"net.2"`` keeps ``net.2.weight`` and
    ``net.2.bias`` personal); empty means the model's last layer (the classifier head,
    FedPer's and FedRep's choice). ``lam`` is Ditto's λ (Li et al. 2021, Eq. 2);
    ``personal_epochs`` the epochs of Ditto's personal model or FedRep's head per round.
    """

    layers: list[str] = Field(default_factory=list)
    lam: float = Field(0.1, ge=0.0)
    personal_epochs: int = Field(1, ge=1)
    personal_lr: float | None = Field(None, gt=0.0)


class LoRAConfig(_Section):
    """Low-rank adapters (Hu et al. 2022) for ``client.adapter = "lora"``.

    Each adapted ``nn.Linear`` computes ``W x + b + (alpha / rank) B A x`` with ``W`` and
    ``b`` frozen; ``layers`` are module-name prefixes (empty: every linear layer).
    """

    rank: int = Field(4, ge=1)
    alpha: float = Field(8.0, gt=0.0)
    layers: list[str] = Field(default_factory=list)


class EvalConfig(_Section):
    """Centralized (server test set) and federated (clients' local test sets) evaluation."""

    every: int = Field(1, ge=1)
    centralized: bool = True
    federated: bool = False
    batch_size: int = Field(512, ge=1)
    #: Evaluate centrally on a fixed random subset of at most this many test examples
    #: (large text test sets make every evaluation cost more than a round).
    max_examples: int | None = Field(None, ge=1)


class PrivacyConfig(_Section):
    """Central (user-level) differential privacy: DP-FedAvg (McMahan et al. 2018).

    With ``mechanism = "central"`` every client clips its update to L2 norm
    ``clipping_norm`` (C) and the server adds Gaussian noise of standard deviation z·C to
    the sum, divided by the expected number of clients per round. z is
    ``noise_multiplier``, or is calibrated before training so that ``rounds`` rounds cost
    at most ``target_epsilon`` at ``delta``. ε after every round comes from
    ``dp-accounting``'s RDP or PLD accountant (``accountant``). ``max_epsilon`` stops the
    run before a round that would exceed it.

    ``adaptive_clipping`` lets C track the ``target_quantile`` of the update norms
    (Andrew et al. 2021), moving it by ``clip_lr`` per round from a count of unclipped
    updates noised with ``clipped_count_stddev`` (default: expected clients / 20).

    ``secure_noise`` draws the noise from the OS CSPRNG (see ``fedloom.privacy.noise``);
    it is off by default in simulation, where a seeded generator makes runs replayable,
    and a real deployment will default it to on.
    """

    mechanism: Literal["none", "central"] = "none"
    clipping_norm: float = Field(1.0, gt=0.0)
    noise_multiplier: float | None = Field(None, gt=0.0)
    target_epsilon: float | None = Field(None, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_epsilon: float | None = Field(None, gt=0.0)
    accountant: Literal["rdp", "pld"] = "rdp"
    adaptive_clipping: bool = False
    target_quantile: float = Field(0.5, gt=0.0, lt=1.0)
    clip_lr: float = Field(0.2, gt=0.0)
    clipped_count_stddev: float | None = Field(None, gt=0.0)
    secure_noise: bool = False
    #: "secagg+": the server learns only the sum of the updates (Bell et al. 2020);
    #: "ckks": clients encrypt under CKKS, the server adds ciphertexts, a key holder
    #: decrypts the sum (simulation only for now; needs the ``he`` extra, TenSEAL);
    #: updates are unweighted (each client counts once) and, without central DP,
    #: clipped per coordinate to ``secagg_clip_range`` before quantization.
    secure_aggregation: Literal["none", "secagg+", "ckks"] = "none"
    #: Under secure aggregation, still send each client's training metrics (train_loss
    #: …) and example count to the server in the clear. Off by default: they describe
    #: one client's data, which secure aggregation exists to hide.
    reveal_client_metrics: bool = False
    secagg_clip_range: float = Field(1.0, gt=0.0)
    secagg_quantization_bits: int = Field(16, ge=2, le=24)
    #: Local (example-level) DP on every client: DP-SGD through Opacus (Abadi et al. 2016)
    #: with Poisson-sampled batches, per-example clipping to ``local_max_grad_norm`` and
    #: Gaussian noise ``local_noise_multiplier`` × that norm. Each client reports its own ε
    #: at ``local_delta`` (None: min(privacy.delta, 1 / (10 n)) for a client of n examples).
    local_dp: bool = False
    local_noise_multiplier: float = Field(1.0, gt=0.0)
    local_max_grad_norm: float = Field(1.0, gt=0.0)
    local_delta: float | None = Field(None, gt=0.0, lt=1.0)


class CompressionConfig(_Section):
    """Compressed uploads and broadcasts (``fedloom.codecs.compression`` / ``.downlink``).

    ``kind`` compresses each client's update: ``topk`` / ``randk`` keep a ``ratio`` of
    the coordinates (random-k's are shared by every client of a round), ``qsgd`` is
    stochastic uniform quantization with ``bits`` (2, 4 or 8) per coordinate and one
    scale per ``bucket_size`` coordinates (``norm``: the bucket's L2 norm as in QSGD, or
    its largest magnitude), ``int8`` is 8-bit QSGD, ``sign`` is scaled signSGD.
    ``error_feedback`` keeps what was not sent in the client's state and adds it next
    time (None: on for topk, randk and sign, off for the unbiased QSGD). ``downlink``
    compresses the broadcast model: ``float16`` or ``int8`` (per-bucket scale).
    """

    kind: Literal["none", "topk", "randk", "int8", "qsgd", "sign"] = "none"
    ratio: float = Field(0.01, gt=0.0, le=1.0)
    bits: Literal[2, 4, 8] = 8
    bucket_size: int = Field(512, ge=1)
    norm: Literal["l2", "max"] = "l2"
    error_feedback: bool | None = None
    downlink: Literal["none", "float16", "int8"] = "none"


class EngineConfig(_Section):
    """Where clients run. ``workers = 0`` means one per CPU core.

    ``torch_threads`` is the intra-op thread count of each process that trains. One is
    the default: simulated clients are small, parallelism comes from pool processes,
    and several spinning OpenMP threads on a busy machine slow training down by an
    order of magnitude. Raise it for large models on the in-process engine.
    """

    name: Literal["inprocess", "pool", "ray", "vectorized"] = "inprocess"
    workers: int = Field(0, ge=0)
    torch_threads: int = Field(1, ge=1)
    #: ``engine.name = "ray"``: the cluster to join (``host:port`` of its head, as
    #: ``ray start --head`` prints it); unset starts a Ray instance on this machine.
    address: str | None = None
    #: ``engine.name = "ray"``: the CPUs each actor reserves; ``workers = 0`` then means
    #: as many actors as the cluster's CPUs hold.
    actor_cpus: float = Field(1.0, gt=0.0)
    #: Where clients train: ``auto`` is CUDA when torch sees a GPU (on Ray: when the
    #: cluster has GPUs), else the CPU. The pool puts worker i on ``cuda:(i mod n_gpus)``.
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    #: ``engine.name = "ray"`` on CUDA: the share of one GPU each actor reserves (several
    #: actors share a GPU); unset packs the actors evenly over the cluster's GPUs.
    actor_gpus: float | None = Field(None, gt=0.0, le=1.0)
    #: ``engine.name = "ray"``: each actor trains the clients of a chunk at once, as the
    #: vectorized engine trains a round (the same models; refused for what it cannot train).
    vectorize: bool = False

    @model_validator(mode="after")
    def _check_ray_keys(self) -> EngineConfig:
        if self.vectorize and self.name != "ray":
            raise ValueError(
                "engine.vectorize trains each Ray actor's clients at once; set "
                "engine.name = 'ray' (or engine.name = 'vectorized' on one machine) or remove it"
            )
        if self.address is not None and self.name != "ray":
            raise ValueError(
                "engine.address names a Ray cluster; set engine.name = 'ray' or remove it"
            )
        if self.actor_gpus is not None and (self.name != "ray" or self.device == "cpu"):
            raise ValueError(
                "engine.actor_gpus reserves GPUs for Ray actors; set engine.name = 'ray' and "
                "engine.device = 'cuda' or 'auto', or remove it"
            )
        return self


class DeployConfig(_Section):
    """Limits of a real deployment (``fedloom server``); ignored in simulation."""

    round_timeout_s: float = Field(600.0, gt=0.0)
    heartbeat_interval_s: float = Field(1.0, gt=0.0)
    heartbeat_timeout_s: float = Field(10.0, gt=0.0)
    poll_timeout_s: float = Field(5.0, gt=0.0)
    chunk_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    wait_for_clients_s: float = Field(300.0, gt=0.0)
    #: Threads for the handlers that compute (registration, heartbeats, reading results);
    #: a waiting long poll holds none, so this does not grow with the clients.
    max_workers: int = Field(256, ge=4)
    #: Calls in progress at once, long polls included (each live client holds one):
    #: beyond it a call is refused. Bounds the memory a flood of connections can take.
    max_concurrent_calls: int = Field(8192, ge=16)
    #: PullTask/PushResult calls one session may have in progress (an honest client: 2).
    max_streams_per_client: int = Field(4, ge=2)
    #: A result stream silent this long is cancelled (it holds a server thread).
    idle_stream_timeout_s: float = Field(30.0, gt=0.0)


class WatermarkConfig(_Section):
    """WAFFLE (Tekgul et al. 2021): the server embeds a watermark in the global model.

    After each aggregation the server trains the global model on a secret trigger set of
    ``trigger_size`` random patterns with labels drawn from ``num_labels`` classes
    (default: all of the model's) with SGD (``lr``, ``momentum``, ``batch_size``) until
    the trigger accuracy reaches ``threshold`` or ``max_steps`` steps were taken. The
    trigger set comes from ``seed``; unset (the default), a secret seed is drawn when
    the run starts and kept in the run store, not in the config.
    ``fedloom watermark verify`` tests a model against it.
    """

    enabled: bool = False
    trigger_size: int = Field(100, ge=1)
    num_labels: int | None = Field(None, ge=2)
    threshold: float = Field(1.0, gt=0.0, le=1.0)
    max_steps: int = Field(50, ge=1)
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    batch_size: int = Field(50, ge=1)
    seed: int | None = Field(None, ge=0)


class AttackConfig(_Section):
    """Malicious clients for robustness experiments (``fedloom.attacks.poisoning``).

    ``kind = "none"`` (the default) trains every client honestly. Otherwise the
    ``fraction`` of clients chosen deterministically from the seed
    (``fedloom.attacks.poisoning.malicious_client_ids``), or the ids in ``clients``,
    run the attack for the whole run; the others stay honest. Parameters belong to
    their kinds: ``factor`` (sign_flip sends -factor x update, scale factor x update),
    ``sigma`` (gaussian), ``z`` (ALIE; None: the paper's z_max), ``epsilon`` (IPM),
    ``perturbation`` and ``gamma_init`` (min_max, min_sum), ``target_label``,
    ``trigger_size``, ``trigger_value``, ``poison_fraction`` and ``boost`` (backdoor;
    None: model replacement's n / (server lr x m)), ``knowledge`` (what ALIE, IPM,
    min-max and min-sum see: "own" or "omniscient"). docs/robustness.md gives each
    attack's paper and threat model.
    """

    kind: Literal[
        "none",
        "label_flip",
        "sign_flip",
        "gaussian",
        "scale",
        "alie",
        "ipm",
        "min_max",
        "min_sum",
        "backdoor",
        "label_shuffle",
    ] = "none"
    fraction: float = Field(0.2, ge=0.0, lt=1.0)
    #: Explicit malicious client ids, instead of a draw of ``fraction`` (a red-team
    #: client, ``fedloom client --attack KIND``, names itself).
    clients: list[int] | None = None
    factor: float = Field(10.0, gt=0.0)
    sigma: float = Field(1.0, gt=0.0)
    z: float | None = Field(None, gt=0.0)
    epsilon: float = Field(0.5, gt=0.0)
    perturbation: Literal["std", "unit", "sign"] = "std"
    gamma_init: float = Field(10.0, gt=0.0)
    target_label: int = Field(0, ge=0)
    trigger_size: int = Field(3, ge=1)
    trigger_value: float = 1.0
    poison_fraction: float = Field(0.5, gt=0.0, le=1.0)
    boost: float | None = Field(None, gt=0.0)
    #: What the colluding attacks (alie, ipm, min_max, min_sum) craft from: "own", the
    #: malicious clients' own honest updates; "omniscient", the round's honest updates
    #: (a simulation-only server-side oracle, fedloom.attacks.omniscient).
    knowledge: Literal["own", "omniscient"] = "own"

    @model_validator(mode="after")
    def _knowledge_fits_kind(self) -> AttackConfig:
        colluding = ("alie", "ipm", "min_max", "min_sum")
        if self.knowledge == "omniscient" and self.kind not in (*colluding, "none"):
            raise ValueError(
                f"attack.knowledge = 'omniscient' applies to {', '.join(colluding)}; "
                f"'{self.kind}' crafts from its own update, so set knowledge = 'own'"
            )
        return self


class GuardsConfig(_Section):
    """Guard rails every run has: how far one client can move the global model.

    A claimed example count above ``examples_median_multiple`` times the round's (low)
    median claim, or above ``max_examples``, is clipped to that cap and counted (a
    multiple below 1 would clip honest clients: 0 means no relative cap, else >= 1). With
    ``norm_outliers`` on, an update whose L2 norm exceeds
    max(median + ``norm_mad_k`` · MAD, ``norm_min_multiple`` · median) of the round's
    norms is rejected with its reason, in rounds of at least ``norm_min_updates`` clear
    updates. ``"auto"`` is that rule in a deployment (``fedloom server``); in a simulation,
    whose clients are the experimenter's own code and whose attack experiments should
    measure the configured aggregator, it rejects only norms above 1000 × the median (an
    overflow attack or a bug). Under central DP or secure aggregation it is off
    (clipping bounds each update there). A global model
    that would not be finite is never committed, whatever these settings.
    """

    max_examples: int | None = Field(None, ge=1)
    #: 0 turns the median-relative cap off.
    examples_median_multiple: float = Field(10.0, ge=0.0)
    norm_outliers: Literal["auto", "on", "off"] = "auto"
    norm_mad_k: float = Field(10.0, gt=0.0)
    norm_min_multiple: float = Field(3.0, ge=1.0)
    norm_min_updates: int = Field(3, ge=3)

    @model_validator(mode="after")
    def _check_multiple(self) -> GuardsConfig:
        if 0.0 < self.examples_median_multiple < 1.0:
            raise ValueError(
                "guards.examples_median_multiple below 1 would clip honest clients' counts; "
                "use 0 (no relative cap) or a value >= 1"
            )
        return self


STRATEGIES: dict[str, dict[str, dict[str, Any]]] = {
    # McMahan et al. 2017: weighted mean, plain server step with lr 1. FedAvg as published
    # drops devices that do not finish E epochs (Li et al. 2020, Section 5.2).
    "fedavg": {"server": {"optimizer": "sgd", "lr": 1.0, "drop_stragglers": True}},
    # Li et al. 2020: proximal term on the client, partial work is kept.
    "fedprox": {
        "client": {"proximal_mu": 0.01},
        "server": {"optimizer": "sgd", "lr": 1.0, "drop_stragglers": False},
    },
    # Hsu et al. 2019: server momentum on the averaged update.
    "fedavgm": {"server": {"optimizer": "momentum", "lr": 1.0, "momentum": 0.9}},
    # Reddi et al. 2021 (FedOpt): adaptive server optimizers.
    "fedadam": {"server": {"optimizer": "adam", "lr": 0.01}},
    "fedyogi": {"server": {"optimizer": "yogi", "lr": 0.01}},
    "fedadagrad": {"server": {"optimizer": "adagrad", "lr": 0.01}},
    # McMahan et al. 2018 (DP-FedAvg): Poisson-sampled clients clip their updates, the
    # server adds Gaussian noise to the sum and takes a plain step with lr 1.
    "dp-fedavg": {
        "privacy": {"mechanism": "central"},
        "server": {"optimizer": "sgd", "lr": 1.0, "sampling": "poisson"},
    },
    # Karimireddy et al. 2020: control variates on both sides (option II), global lr 1.
    "scaffold": {
        "client": {"algorithm": "scaffold"},
        "server": {"algorithm": "scaffold", "optimizer": "sgd", "lr": 1.0},
    },
    # Wang et al. 2020: normalized averaging of heterogeneous local work.
    "fednova": {
        "client": {"algorithm": "fednova"},
        "server": {"algorithm": "fednova", "optimizer": "sgd", "lr": 1.0},
    },
    # Arivazhagan et al. 2019 (FedPer), Collins et al. 2021 (FedRep): personal heads.
    "fedper": {
        "client": {"algorithm": "fedper"},
        "server": {"algorithm": "personal", "optimizer": "sgd", "lr": 1.0},
        "eval": {"federated": True},
        "data": {"client_test_fraction": 0.25},
    },
    "fedrep": {
        "client": {"algorithm": "fedrep"},
        "server": {"algorithm": "personal", "optimizer": "sgd", "lr": 1.0},
        "eval": {"federated": True},
        "data": {"client_test_fraction": 0.25},
    },
    # Li et al. 2021 (Ditto): FedAvg for the global model, a regularized personal model.
    "ditto": {
        "client": {"algorithm": "ditto"},
        "server": {"algorithm": "fedavg", "optimizer": "sgd", "lr": 1.0},
        "eval": {"federated": True},
        "data": {"client_test_fraction": 0.25},
    },
}


class SystemConfig(_Section):
    """Simulated devices and networks: each client's speed, bandwidth and reliability.

    With ``enabled`` every simulated round gets a duration on a virtual clock (download +
    local compute + upload of the encoded bytes, per client), recorded as ``sim_round_s``
    and ``sim_time_s``. Profiles are drawn once per run from the seed: lognormal around
    the medians with the given σ (σ = 0: every client identical), or read from ``trace``,
    a CSV with columns ``s_per_example``, ``uplink_mbps``, ``downlink_mbps`` and optionally
    ``dropout`` (one row per client, cycled when there are fewer rows than clients).
    """

    enabled: bool = False
    s_per_example: float = Field(0.001, gt=0.0)
    compute_sigma: float = Field(0.0, ge=0.0)
    uplink_mbps: float = Field(10.0, gt=0.0)
    downlink_mbps: float = Field(50.0, gt=0.0)
    bandwidth_sigma: float = Field(0.0, ge=0.0)
    #: Probability that a sampled client drops out of a round (seeded per round and client).
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    #: Each client is reachable a fraction ``availability`` of every
    #: ``availability_period_s`` of simulated time, from a phase drawn per client.
    availability: float = Field(1.0, gt=0.0, le=1.0)
    availability_period_s: float = Field(3600.0, gt=0.0)
    #: The round ends at this simulated time; later results are dropped as stragglers.
    deadline_s: float | None = Field(None, gt=0.0)
    #: Sample ``ceil((1 + over_selection) · k)`` clients and end the round at the k-th
    #: arrival (Bonawitz et al. 2019, Section 2.2).
    over_selection: float = Field(0.0, ge=0.0, le=10.0)
    trace: str | None = None
    #: A client that cannot finish its local work by ``deadline_s`` does the steps that
    #: fit (floor of its time budget / its seconds per step) and sends that partial update,
    #: for strategies that keep stragglers' work (``server.drop_stragglers = false``).
    partial_work: bool = False

    @model_validator(mode="after")
    def _partial_work_needs_a_deadline(self) -> SystemConfig:
        if self.partial_work and self.deadline_s is None:
            raise ValueError(
                "system.partial_work fits each straggler's steps into the round deadline; "
                "set system.deadline_s too"
            )
        return self


class AsyncConfig(_Section):
    """Asynchronous training (``mode = "async"``) on the virtual clock of ``[system]``.

    ``fedbuff``: a server step every ``buffer_size`` arrivals (Nguyen et al. 2022);
    ``fedasync``: every arrival mixed in with weight ``mixing`` (Xie et al. 2019;
    ``buffer_size`` is 1). Updates are discounted by (1 + staleness)^(−staleness_exponent).
    ``concurrency`` clients train at any time (default: ``buffer_size`` × 2, at most the
    number of clients; over ``fedloom server``, every connected client). ``rounds``
    counts server steps.
    """

    algorithm: Literal["fedbuff", "fedasync"] = "fedbuff"
    buffer_size: int = Field(10, ge=1)
    concurrency: int | None = Field(None, ge=1)
    staleness_exponent: float = Field(0.5, ge=0.0)
    mixing: float = Field(0.6, gt=0.0, le=1.0)


class GossipConfig(_Section):
    """Serverless federation (``mode = "gossip"``): peers average with neighbours.

    ``topology``: ``ring``, ``torus``, ``erdos_renyi`` (``edge_probability``),
    ``exponential`` or ``complete``; ``time_varying`` draws a new graph every round.
    """

    topology: Literal["ring", "torus", "erdos_renyi", "exponential", "complete"] = "ring"
    edge_probability: float = Field(0.3, gt=0.0, le=1.0)
    time_varying: bool = False


def register_strategy(name: str, composition: dict[str, dict[str, Any]]) -> None:
    """Name a composition of stage settings (``{section: {key: value}}``) as a strategy.

    ``composition`` names stages by their registered names, e.g.
    ``{"server": {"aggregator": "my-median"}}``; values the user sets explicitly win.
    """
    if name in STRATEGIES:
        raise ValueError(f"a strategy named '{name}' is already registered")
    STRATEGIES[name] = composition


class VerticalOptimizerConfig(_Section):
    """One party's optimizer in split learning (torch.optim semantics)."""

    name: Literal["sgd", "adam"] = "adam"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)


class VerticalConfig(_Section):
    """Vertical FL (``mode = "vertical"``, ``fedloom.vertical``): split learning.

    ``dataset``'s columns are split between ``feature_parties`` parties; a label party
    holds the labels. Each party holds a shuffled subset of the record ids (each record
    with probability ``id_coverage``); the parties align them by private set
    intersection, and ``test_fraction`` of the aligned records are the test set. Each
    round is one epoch over the aligned training rows, or ``steps_per_round`` batches.
    ``bottom`` is the feature parties' optimizer (one entry for all, or one per party);
    ``top`` the label party's. ``defense`` perturbs the gradients sent down against
    label leakage (``noise``: Gaussian, ``noise_scale`` times the batch's largest
    gradient norm; ``max_norm``). ``baselines`` also trains each party alone and a
    centralized model on all columns with the same budget, for the summary. The
    ``data``, ``model``, ``client`` and ``server`` sections do not apply.
    """

    dataset: Literal["breast_cancer", "digits"] = "breast_cancer"
    feature_parties: int = Field(2, ge=1, le=8)
    #: Use only the data set's first ``records`` records (a quick run; None: all).
    records: int | None = Field(None, ge=4)
    id_coverage: float = Field(0.95, gt=0.0, le=1.0)
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    batch_size: int = Field(32, ge=1)
    steps_per_round: int | None = Field(None, ge=1)
    shuffle: bool = True
    bottom_hidden: list[int] = Field(default_factory=lambda: [16])
    embedding_dim: int = Field(8, ge=1)
    top_hidden: list[int] = Field(default_factory=lambda: [16])
    bottom: list[VerticalOptimizerConfig] = Field(
        default_factory=lambda: [VerticalOptimizerConfig()], min_length=1
    )
    top: VerticalOptimizerConfig = Field(default_factory=VerticalOptimizerConfig)
    defense: Literal["none", "noise", "max_norm"] = "none"
    noise_scale: float = Field(1.0, gt=0.0)
    baselines: bool = False

    @model_validator(mode="after")
    def _check_parties(self) -> VerticalConfig:
        if len(self.bottom) not in (1, self.feature_parties):
            raise ValueError(
                f"vertical.bottom has {len(self.bottom)} optimizers; give one for all "
                f"feature parties or one per party ({self.feature_parties})"
            )
        return self


class AnomalyConfig(_Section):
    """Per-client anomaly scores, flags and a reputation (``fedloom.server.anomaly``).

    Each round every update gets a score by ``method`` (``sign``: share of coordinates
    whose sign disagrees with the coordinate-wise median update's; ``cosine``: 1 − cos
    to that median; ``distance``: distance to it over the round's median distance;
    ``norm``: robust z-score of the update norm). With ``score_decay`` > 0 a client's
    score is smoothed over the rounds it takes part in. ``rule = "robust_z"`` flags a
    client whose (smoothed) score lies more than ``threshold`` (default 2.5) robust
    standard deviations above the round's median; ``"absolute"`` flags a score above
    ``threshold`` (default per method: sign 0.5, cosine 1.0, distance 3.0, norm 3.0).
    Reputation is an exponential moving average of "not flagged" with weight
    ``reputation_decay`` on the past; with ``exclude_below`` set, clients whose
    reputation is below it are no longer sampled.
    """

    enabled: bool = False
    method: Literal["sign", "cosine", "distance", "norm"] = "sign"
    rule: Literal["robust_z", "absolute"] = "robust_z"
    threshold: float | None = Field(None, gt=0.0)
    score_decay: float = Field(0.8, ge=0.0, lt=1.0)
    reputation_decay: float = Field(0.8, ge=0.0, lt=1.0)
    exclude_below: float | None = Field(None, gt=0.0, le=1.0)


class TrackingConfig(_Section):
    """Experiment tracking (``fedloom.server.tracking``): each is a callback, so a
    simulation (``fedloom run``) and a deployment (``fedloom server``) log alike.

    ``tensorboard``: a directory; the run's event files go to ``DIR/<run directory
    name>`` (every numeric field of each round record as a scalar at step = round, the
    config as text and hyper-parameters). ``mlflow``: a tracking URI (``http://…``) or a
    local file store (``file:///abs/path`` or a plain path); one MLflow run per fedloom
    run in experiment ``mlflow_experiment``, with the config as params, every round's
    numeric record fields as metrics (step = round), and at the end the summary, history,
    plots and final checkpoint as artifacts. Each needs its extra
    (``pip install 'fedloom[tensorboard]'`` / ``'fedloom[mlflow]'``).
    """

    tensorboard: str | None = None
    mlflow: str | None = None
    mlflow_experiment: str = "fedloom"


class ContributionConfig(_Section):
    """Who contributed (``fedloom.server.contribution``): per-client contribution scores
    of each round's updates, measured on a validation slice of the server's own examples.

    ``method``: ``gtg_shapley`` (Liu et al. 2022: Monte Carlo Shapley values over the
    round's updates with guided sampling and truncation), ``leave_one_out`` (v(N) −
    v(N∖{i}), n + 1 evaluations a round) or ``none``. ``permutations``: at most this many
    sampled permutations a round (GTG-Shapley); ``convergence``: stop earlier once a
    full cycle of permutations moves no estimate by more than this share of the mean
    absolute estimate; ``tolerance``: within-round truncation (skip the rest of a
    permutation once the coalition's utility is this close to the full round's);
    ``round_tolerance``: between-round truncation (every score 0 when the round changed
    the utility by less). ``validation_size``: examples reserved from the server's test
    set (they leave central evaluation); ``utility``: ``neg_loss`` (−validation loss, the
    default: accuracy on a few hundred examples moves in steps of 1/n, so small
    contributions tie or drown in its noise) or ``accuracy``. Refused under secure
    aggregation, which hides the individual updates.
    """

    method: Literal["none", "gtg_shapley", "leave_one_out"] = "none"
    permutations: int = Field(50, ge=1)
    convergence: float = Field(0.05, ge=0.0)
    tolerance: float = Field(0.0, ge=0.0)
    round_tolerance: float = Field(0.0, ge=0.0)
    validation_size: int = Field(200, ge=1)
    utility: Literal["neg_loss", "accuracy"] = "neg_loss"


class RunConfig(_Section):
    """A complete experiment."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, populate_by_name=True, serialize_by_alias=True
    )

    name: str = "fedloom"
    seed: int = 0
    rounds: int = Field(30, ge=1)
    strategy: str | None = "fedavg"
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0)
    checkpoint_every: int = Field(1, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    personal: PersonalizationConfig = Field(default_factory=PersonalizationConfig)
    system: SystemConfig = Field(default_factory=SystemConfig)
    #: ``sync``: rounds with a barrier; ``async``: FedBuff / FedAsync (the ``async`` table);
    #: ``gossip``: no server, peers average with their neighbours (the ``gossip`` table);
    #: ``vertical``: split learning between parties holding different columns (``vertical``).
    mode: Literal["sync", "async", "gossip", "vertical"] = "sync"
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async")
    gossip: GossipConfig = Field(default_factory=GossipConfig)
    vertical: VerticalConfig = Field(default_factory=VerticalConfig)
    watermark: WatermarkConfig = Field(default_factory=WatermarkConfig)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    contribution: ContributionConfig = Field(default_factory=ContributionConfig)
    #: Registered callbacks to add to the run, by name, with their options.
    callbacks: list[str] = Field(default_factory=list)
    callback_options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> RunConfig:
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(
                f"config key 'strategy': unknown strategy '{self.strategy}'; choose one of "
                f"{', '.join(sorted(STRATEGIES))}"
            )
        if self.server.min_aggregate_clients > self.data.num_clients:
            raise ValueError(
                f"server.min_aggregate_clients ({self.server.min_aggregate_clients}) exceeds "
                f"data.num_clients ({self.data.num_clients}); lower it"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def apply_strategy(cfg: RunConfig) -> RunConfig:
    """Fill in the stage settings a strategy implies, keeping every value the user set.

    Then checks the combinations that depend on the result (the privacy settings: a
    strategy such as ``dp-fedavg`` switches the mechanism on).
    """
    if cfg.strategy is not None:
        for section_name, defaults in STRATEGIES[cfg.strategy].items():
            section: _Section = getattr(cfg, section_name)
            for key, value in defaults.items():
                if key not in section.model_fields_set:
                    setattr(section, key, value)
    check_privacy(cfg)
    return cfg


def check_privacy(cfg: RunConfig) -> None:
    """Cross-field rules of the ``privacy`` section; a violation is a one-line ConfigError.

    Judged on values, not on which keys were written, so a config stored in a run
    directory (every key explicit) validates exactly as the original did.
    """
    p = cfg.privacy
    _check_local_dp(cfg)
    if p.secure_aggregation != "none" and cfg.engine.name in ("pool", "ray"):
        raise ConfigError(
            "privacy.secure_aggregation runs on engine.name = 'inprocess' or in a deployment "
            f"(fedloom server), not on the {cfg.engine.name} engine"
        )
    if p.secure_aggregation == "ckks" and importlib.util.find_spec("tenseal") is None:
        raise ConfigError(
            "privacy.secure_aggregation = 'ckks' needs TenSEAL; pip install 'fedloom[he]'"
        )
    if p.mechanism == "none":
        stray = [
            key
            for key, is_set in (
                ("noise_multiplier", p.noise_multiplier is not None),
                ("target_epsilon", p.target_epsilon is not None),
                ("max_epsilon", p.max_epsilon is not None),
                ("adaptive_clipping", p.adaptive_clipping),
            )
            if is_set
        ]
        if stray:
            raise ConfigError(
                f"privacy.{stray[0]} is set but privacy.mechanism is 'none'; set "
                "privacy.mechanism = 'central' (or strategy = 'dp-fedavg') to train with DP"
            )
        return
    if p.noise_multiplier is None and p.target_epsilon is None:
        raise ConfigError(
            "central DP needs privacy.noise_multiplier or privacy.target_epsilon; set one"
        )
    if p.noise_multiplier is not None and p.target_epsilon is not None:
        raise ConfigError(
            "set privacy.noise_multiplier or privacy.target_epsilon, not both "
            "(target_epsilon calibrates the noise multiplier)"
        )
    if p.accountant == "pld" and cfg.server.sampling != "poisson":
        raise ConfigError(
            "privacy.accountant = 'pld' needs server.sampling = 'poisson' (dp-accounting's "
            "PLD accountant has no fixed-size sampling); use privacy.accountant = 'rdp'"
        )


def _check_local_dp(cfg: RunConfig) -> None:
    """Cross-field rules of local (example-level) DP; a violation is a one-line ConfigError."""
    p = cfg.privacy
    if not p.local_dp and p.local_delta is not None:
        raise ConfigError(
            "privacy.local_delta is set but privacy.local_dp is false; set "
            "privacy.local_dp = true to train clients with DP-SGD"
        )


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown config key '{key}'; check the spelling against the documented keys"
    msg = first["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg if key == "config" else f"config key '{key}': {msg}"
    if "input" in first and not isinstance(first["input"], dict):
        return f"config key '{key}' = {first['input']!r} is invalid: {msg}"
    return f"config key '{key}' is invalid: {msg}"


def _parse_override_value(raw: str) -> Any:
    """``--set`` values are TOML literals where possible (numbers, booleans, lists)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["client.lr=0.05", "rounds=10"]`` into a nested dict."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'")
        _set_dotted(tree, key.strip(), _parse_override_value(raw.strip()))
    return tree


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig` with the strategy applied."""
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None
    return apply_strategy(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML file (or the embedded default when ``path`` is None) and apply overrides.

    The embedded default (``fedloom/default.toml``, the same experiment as
    ``examples/digits.toml``) is what ``fedloom run`` with no config runs.
    """
    if path is None:
        tree = tomllib.loads(resources.files("fedloom").joinpath("default.toml").read_text())
    else:
        p = Path(path)
        try:
            tree = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"config file '{p}' does not exist; pass an existing TOML file"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file '{p}' is not valid TOML ({err})") from None
    tree = merge_trees(tree, parse_overrides(overrides or []))
    return config_from_dict(tree)


def config_from_json(text: str) -> RunConfig:
    """Rebuild a config saved in a run directory (used by ``--resume``)."""
    return config_from_dict(json.loads(text))
