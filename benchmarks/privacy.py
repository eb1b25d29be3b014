"""Privacy benchmarks: what privacy costs in accuracy, in time and in bytes.

Run as a script: ``python benchmarks/privacy.py [--sections secagg,he]`` prints one
section per benchmark (all by default: central-dp, accountants, secagg, he, local-dp). Each
section is a function that returns its rows and a printer for them.

Section "central DP": accuracy against ε on the embedded digits, DP-FedAvg (McMahan et
al. 2018) with user-level ε at δ = 1e-5:

* 700 clients with about 2 training examples each (IID split of the 1,437 training
  digits), so that a round can sample over a hundred clients, as user-level DP needs;
* Poisson sampling with q = 0.15 (105 clients per round expected), 100 rounds;
* multinomial logistic regression, one local epoch of SGD (lr 0.3, momentum 0.9);
* clients clip their update to C = 1; the server adds N(0, (zC)²) to the sum, divides
  by qN and takes a server step with lr 2;
* z is calibrated before training so that the 100 rounds cost at most the target ε
  (RDP accountant); the "∞" row is the same run without DP (no clipping, no noise,
  example-weighted mean).

Accuracy is on the held-out 360 test digits, averaged over seeds.

Section "secagg": the cost of one secure-aggregation round of a 100k-parameter float32
vector for n ∈ {10, 50, 100, 200} clients, in one run and on the same inputs:

* plain aggregation: each client serializes its vector (400 KB) and the server sums the
  received buffers with NumPy; the floor;
* fedloom SecAgg+ (Bell et al. 2020) with its defaults (degree 2·ceil(log2 n), threshold a
  majority of the neighbours, 16-bit quantization, 32-bit masks), without dropouts and
  with 10 % of the clients dropping before they send their masked input (the stage that
  makes the server reconstruct the dropped clients' pairwise masks);
* CKKS through TenSEAL (:mod:`fedloom.privacy.he`), a fresh key per round, with and
  without the same dropouts; its key holder's seconds are a column of their own;
* Flower's SecAgg+ (when ``flwr`` is installed): Flower's own ``SecAggPlusWorkflow``
  (server) and ``secaggplus_mod`` (client), unmodified, driven in process through a
  loopback ``Grid`` that serializes every message to its protobuf wire form, with the
  same graph degree (``num_shares = degree + 1``: Flower counts the client's own share)
  and threshold, ``max_weight = 1`` (every client's weight is 1, which keeps Flower's
  weight-scaled quantization from losing precision), and its default 2^22 quantization
  and 2^32 mask range.

Client compute is the mean over the n sampled clients of the wall-clock seconds spent in
the protocol's client code (training excluded); server compute is the aggregation
server's seconds; bytes are what each role's messages weigh on the wire (fedloom's
encodings, Flower's protobuf messages), not counting the model broadcast that every
scheme shares, nor TLS framing. "rel. error" is ‖ĥ − h‖₂/‖h‖₂ against the float64 sum h
of the contributors' vectors.

Section "local-dp": what local DP-SGD (Opacus, :mod:`fedloom.algorithms.dpsgd`) costs per
client fit on the default digits experiment (20 non-IID clients, one local epoch), in
one run on the same tasks: plain SGD, DP-SGD with seeded noise, and DP-SGD with noise
from the OS CSPRNG (``privacy.secure_noise``). Each configuration trains every client
once per repeat, repeats interleaved; the table gives the median seconds per sweep and
the ratio to seeded DP-SGD.

Section "he": the CKKS parameter choice, with one 100k vector from each of 20 clients:
the chain fedloom uses ([60, 60]: addition needs no multiplicative depth) against
TenSEAL's tutorial chain ([60, 40, 40, 60]), both at N = 8192 and scale 2^40.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fedloom.config import RunConfig, load_config
from fedloom.data.base import ClientData, FederatedDataset
from fedloom.engine.simulation import run_simulation
from fedloom.params import decode_vector, encode_vector
from fedloom.privacy.accounting import ClientSampling, calibrate_noise_multiplier
from fedloom.privacy.he import CKKSParams, run_he_round
from fedloom.privacy.secagg import Stage, default_degree, default_threshold, run_secagg_round

#: The central-DP digits experiment; the target ε is added per row.
DIGITS_DP: tuple[str, ...] = (
    "strategy=dp-fedavg",
    "data.name=digits",
    "data.partition=iid",
    "data.num_clients=700",
    "model.name=logreg",
    "client.epochs=1",
    "client.lr=0.3",
    "server.fraction_fit=0.15",
    "server.lr=2.0",
    "privacy.clipping_norm=1.0",
    "privacy.delta=1e-5",
    "rounds=100",
    "eval.every=100",
)

DEFAULT_EPSILONS: tuple[float, ...] = (math.inf, 16.0, 8.0, 4.0, 2.0)


@dataclass
class DpRow:
    """One target ε: what the accountant reached and what the model learned."""

    target_epsilon: float
    epsilon: float | None
    noise_multiplier: float | None
    accuracies: list[float]
    rounds: int
    clients_per_round: float
    wall_s: float

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def accuracy_sd(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def digits_dp_config(target_epsilon: float, seed: int, extra: Sequence[str] = ()) -> RunConfig:
    """The section's experiment at one target ε (∞: the same run without DP)."""
    overrides = [*DIGITS_DP, f"seed={seed}", *extra]
    if math.isinf(target_epsilon):
        overrides.append("privacy.mechanism=none")
    else:
        overrides.append(f"privacy.target_epsilon={target_epsilon}")
    return load_config(None, overrides)


def central_dp_tradeoff(
    epsilons: Sequence[float], seeds: Sequence[int], extra: Sequence[str] = ()
) -> list[DpRow]:
    """Train the digits experiment once per (ε, seed); return one row per ε."""
    rows: list[DpRow] = []
    for target in epsilons:
        accs: list[float] = []
        eps = z = None
        rounds, sampled, wall = 0, 0.0, 0.0
        for seed in seeds:
            cfg = digits_dp_config(target, seed, extra)
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                summary = run_simulation(cfg, Path(tmp) / "run")
            wall += time.perf_counter() - started
            accs.append(float(summary["final"]["accuracy"]))
            history = summary["history"]
            rounds = len(history)
            sampled = statistics.fmean(r["clients_sampled"] for r in history)
            ledger = summary.get("privacy")
            if ledger is not None:
                eps, z = float(ledger["epsilon"]), float(ledger["noise_multiplier"])
        rows.append(DpRow(target, eps, z, accs, rounds, sampled, wall / len(seeds)))
    return rows


def print_dp_rows(rows: Sequence[DpRow], seeds: int) -> None:
    print("## Central DP (DP-FedAvg) on digits: accuracy vs ε")
    print()
    print(
        "700 clients (~2 examples each), Poisson q = 0.15 (105 clients/round expected), "
        "100 rounds, logistic regression, C = 1, δ = 1e-5, RDP accountant; "
        f"accuracy = mean ± sd over {seeds} seed(s)."
    )
    print()
    print("| target ε | ε reached | noise multiplier z | test accuracy | rounds | s/run |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        target = "∞ (no DP)" if math.isinf(r.target_epsilon) else f"{r.target_epsilon:g}"
        eps = "∞" if r.epsilon is None else f"{r.epsilon:.2f}"
        z = "–" if r.noise_multiplier is None else f"{r.noise_multiplier:.3f}"
        acc = f"{100 * r.accuracy:.1f} % ± {100 * r.accuracy_sd:.1f}"
        print(f"| {target} | {eps} | {z} | {acc} | {r.rounds} | {r.wall_s:.1f} |")
    print()


@dataclass
class AccountantRow:
    target_epsilon: float
    z_rdp: float
    z_pld: float
    calibrate_s_rdp: float
    calibrate_s_pld: float


def accountant_comparison(epsilons: Sequence[float]) -> list[AccountantRow]:
    """The noise multiplier each accountant needs for the same (ε, δ) over the same run."""
    sampling = ClientSampling("poisson", 700, 105)
    rows: list[AccountantRow] = []
    for target in epsilons:
        if math.isinf(target):
            continue
        t0 = time.perf_counter()
        z_rdp = calibrate_noise_multiplier("rdp", sampling, 100, target, 1e-5)
        t1 = time.perf_counter()
        z_pld = calibrate_noise_multiplier("pld", sampling, 100, target, 1e-5)
        t2 = time.perf_counter()
        rows.append(AccountantRow(target, z_rdp, z_pld, t1 - t0, t2 - t1))
    return rows


def print_accountant_rows(rows: Sequence[AccountantRow]) -> None:
    print("## Accountants: noise multiplier for the same guarantee")
    print()
    print("Poisson q = 0.15, 100 rounds, δ = 1e-5. PLD's tighter bound needs less noise.")
    print()
    print("| target ε | z (RDP) | z (PLD) | PLD noise saved | calibration s (RDP / PLD) |")
    print("|---|---|---|---|---|")
    for r in rows:
        saved = 100 * (1 - r.z_pld / r.z_rdp)
        print(
            f"| {r.target_epsilon:g} | {r.z_rdp:.3f} | {r.z_pld:.3f} | {saved:.1f} % | "
            f"{r.calibrate_s_rdp:.1f} / {r.calibrate_s_pld:.1f} |"
        )
    print()


# --- secure aggregation: cost of one round -------------------------------------------

SECAGG_SIZES: tuple[int, ...] = (10, 50, 100, 200)
SECAGG_DIM = 100_000
DROPOUT_FRACTION = 0.1


@dataclass
class CostRow:
    """One scheme at one n: seconds per role and bytes on the wire for one round."""

    n: int
    scheme: str
    client_s: float  # mean over the n sampled clients
    server_s: float
    key_holder_s: float | None  # CKKS only
    bytes_up: float  # mean per sampled client
    bytes_down: float
    total_bytes: int  # everything sent by anyone this round
    rel_error: float


def cost_updates(n: int, dim: int, seed: int = 0) -> dict[int, np.ndarray]:
    """n float32 vectors, uniform in [-0.5, 0.5]: inside every scheme's clipping range."""
    rng = np.random.default_rng(seed)
    return {c: rng.uniform(-0.5, 0.5, dim).astype(np.float32) for c in range(1, n + 1)}


def dropped_clients(ids: Sequence[int], fraction: float) -> list[int]:
    """A fixed, spread-out subset of round(fraction · n) clients."""
    k = round(fraction * len(ids))
    return [ids[round(i * len(ids) / k)] for i in range(k)] if k else []


def rel_error(got: np.ndarray, updates: Mapping[int, np.ndarray], ids: Iterable[int]) -> float:
    want = np.sum([updates[c].astype(np.float64) for c in ids], axis=0)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def plain_cost(updates: Mapping[int, np.ndarray]) -> CostRow:
    """The floor: clients ship fedloom's plain wire format (raw little-endian float32,
    :func:`~fedloom.params.encode_vector`), the server decodes and adds them up."""
    client_s, payloads = [], []
    for vector in updates.values():
        started = time.perf_counter()
        payloads.append(encode_vector(vector))
        client_s.append(time.perf_counter() - started)
    started = time.perf_counter()
    dim = len(next(iter(updates.values())))
    total = np.zeros(dim, dtype=np.float64)
    for payload in payloads:
        total += decode_vector(payload, dim)
    server_s = time.perf_counter() - started
    size = len(payloads[0])
    return CostRow(
        len(updates),
        "plain (float32, no protection)",
        statistics.fmean(client_s),
        server_s,
        None,
        size,
        0,
        size * len(updates),
        rel_error(total, updates, updates),
    )


def fedloom_secagg_cost(updates: Mapping[int, np.ndarray], dropouts: Sequence[int]) -> CostRow:
    ids = sorted(updates)
    result = run_secagg_round(updates, dropouts={Stage.MASKED_INPUT: dropouts})
    sent, received = zip(*(result.total_bytes(c) for c in ids), strict=True)
    label = "fedloom SecAgg+" + (f", {len(dropouts)} dropped" if dropouts else "")
    return CostRow(
        len(ids),
        label,
        statistics.fmean(result.client_seconds[c] for c in ids),
        result.server_seconds,
        None,
        statistics.fmean(sent),
        statistics.fmean(received),
        sum(sent) + sum(received),
        rel_error(result.sum, updates, result.aggregate.contributors),
    )


def ckks_cost(
    updates: Mapping[int, np.ndarray],
    dropouts: Sequence[int],
    params: CKKSParams | None = None,
    label: str = "CKKS (TenSEAL)",
) -> CostRow:
    ids = sorted(updates)
    result = run_he_round(updates, params=params, dropouts=dropouts)
    up = [result.bytes_sent[c] for c in ids]
    down = [result.bytes_received[c] for c in ids]
    total = sum(up) + sum(down) + result.bytes_to_key_holder + result.bytes_from_key_holder
    return CostRow(
        len(ids),
        label + (f", {len(dropouts)} dropped" if dropouts else ""),
        statistics.fmean(result.client_seconds[c] for c in ids),
        result.server_seconds,
        result.key_holder_seconds,
        statistics.fmean(up),
        statistics.fmean(down),
        total,
        rel_error(result.sum, updates, result.contributors),
    )


def flower_version() -> str | None:
    try:
        import flwr
    except ImportError:
        return None
    return str(getattr(flwr, "__version__", "unknown"))


def flower_secaggplus_cost(updates: Mapping[int, np.ndarray], dropouts: Sequence[int]) -> CostRow:
    """Flower's SecAgg+ workflow and client mod, unmodified, through a loopback Grid.

    The Grid serializes every message to its protobuf wire form and back (so no object
    is shared between server and clients, as in a deployment), counts the bytes, and
    runs each client's ``secaggplus_mod`` in this process, timing it without the
    "training" call that hands over the update. Server seconds are the workflow's wall
    time minus the time spent inside the Grid. Clients in ``dropouts`` go silent when
    asked for their masked vector.
    """
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.client.mod.secure_aggregation.secaggplus_mod import secaggplus_mod
    from flwr.common import (
        Code,
        FitRes,
        Status,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
    )
    from flwr.common.secure_aggregation.secaggplus_constants import (
        Stage as FlowerStage,
    )
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.serverapp.grid import Grid
    from flwr.supercore.task_identity import TaskIdentity

    run_id = 1

    class CaptureMean(FedAvg):
        """Keeps the workflow's unmasked mean; no second averaging pass to time."""

        mean: np.ndarray | None = None

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            parameters = results[0][1].parameters
            self.mean = parameters_to_ndarrays(parameters)[0]
            return parameters, {}

    class LoopbackGrid(Grid):
        def __init__(self) -> None:
            self.contexts = {c: Context(run_id, c, {}, RecordDict(), {}) for c in updates}
            self.client_s = dict.fromkeys(updates, 0.0)
            self.up = dict.fromkeys(updates, 0)
            self.down = dict.fromkeys(updates, 0)
            self.inside_s = 0.0
            self.silent: set[int] = set()

        def set_run(self, run_id: Any) -> None:
            raise NotImplementedError

        @property
        def run(self) -> Any:
            raise NotImplementedError

        def create_message(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        def get_node_ids(self) -> list[int]:
            return list(updates)

        def push_messages(self, messages: Any) -> Any:
            raise NotImplementedError

        def pull_messages(self, message_ids: Any) -> Any:
            raise NotImplementedError

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
            entered = time.perf_counter()
            replies = []
            for message in messages:
                node = message.metadata.dst_node_id
                message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                wire = message_to_proto(message)
                self.down[node] += wire.ByteSize()
                stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
                if stage == FlowerStage.COLLECT_MASKED_VECTORS and node in dropouts:
                    self.silent.add(node)
                if node in self.silent:
                    continue
                training = 0.0

                def train(msg: Any, ctx: Any, node: int = node) -> Any:
                    nonlocal training
                    started = time.perf_counter()
                    fit = FitRes(
                        Status(Code.OK, ""), ndarrays_to_parameters([updates[node]]), 1, {}
                    )
                    reply = Message(compat.fitres_to_recorddict(fit, False), reply_to=msg)
                    training += time.perf_counter() - started
                    return reply

                inbound = message_from_proto(wire)
                started = time.perf_counter()
                reply = secaggplus_mod(inbound, self.contexts[node], train)
                self.client_s[node] += time.perf_counter() - started - training
                reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                wire = message_to_proto(reply)
                self.up[node] += wire.ByteSize()
                replies.append(message_from_proto(wire))
            self.inside_s += time.perf_counter() - entered
            return replies

    n = len(updates)
    degree = default_degree(n)
    grid = LoopbackGrid()
    strategy = CaptureMean(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n)
    manager = SimpleClientManager()
    for node in updates:
        manager.register(GridClientProxy(node, grid, run_id))
    context = LegacyContext(
        Context(run_id, SUPERLINK_NODE_ID, {}, RecordDict(), {}),
        strategy=strategy,
        client_manager=manager,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    # The model broadcast is not what is measured: a one-number placeholder.
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(1, np.float32)]), keep_input=True
    )
    workflow = SecAggPlusWorkflow(degree + 1, default_threshold(degree), max_weight=1.0)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    try:
        started = time.perf_counter()
        workflow(grid, context)
        wall = time.perf_counter() - started
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
        flwr_logger.setLevel(level)
    if strategy.mean is None:
        raise RuntimeError("Flower's SecAgg+ workflow halted without an aggregate")
    contributors = [c for c in updates if c not in grid.silent]
    ids = sorted(updates)
    up, down = [grid.up[c] for c in ids], [grid.down[c] for c in ids]
    return CostRow(
        n,
        "Flower SecAgg+" + (f", {len(dropouts)} dropped" if dropouts else ""),
        statistics.fmean(grid.client_s.values()),
        wall - grid.inside_s,
        None,
        statistics.fmean(up),
        statistics.fmean(down),
        sum(up) + sum(down),
        rel_error(strategy.mean * len(contributors), updates, contributors),
    )


def secagg_costs(sizes: Sequence[int], dim: int) -> tuple[list[CostRow], list[str]]:
    """All schemes at every n on the same inputs; also the notes to print under the table."""
    rows: list[CostRow] = []
    notes: list[str] = []
    flower = flower_version()
    flower_failed: str | None = None
    if flower is None:
        notes.append(
            "Flower SecAgg+: not run, flwr is not installed (pip install 'fedloom[bench]')."
        )
    graphs = ", ".join(
        f"n = {n}: k = {default_degree(n)}, t = {default_threshold(default_degree(n))}"
        for n in sizes
    )
    notes.append(f"SecAgg+ graph degree k and threshold t (fedloom and Flower alike): {graphs}.")
    for n in sizes:
        updates = cost_updates(n, dim, seed=n)
        gone = dropped_clients(sorted(updates), DROPOUT_FRACTION)
        rows.append(plain_cost(updates))
        rows.append(fedloom_secagg_cost(updates, []))
        rows.append(fedloom_secagg_cost(updates, gone))
        rows.append(ckks_cost(updates, []))
        rows.append(ckks_cost(updates, gone))
        if flower is not None and flower_failed is None:
            try:
                rows.append(flower_secaggplus_cost(updates, []))
                rows.append(flower_secaggplus_cost(updates, gone))
            except Exception as exc:  # Flower's internals moved: say so, keep the rest
                flower_failed = f"{type(exc).__name__}: {exc}"
                notes.append(
                    f"Flower {flower} SecAgg+: the in-process harness failed at n = {n} "
                    f"({flower_failed}); rows for it are missing."
                )
    return rows, notes


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.3f}" if ms < 1 else f"{ms:,.1f}"


def _kb(b: float) -> str:
    return f"{b / 1e3:,.1f} KB" if b < 1e6 else f"{b / 1e6:,.2f} MB"


def print_cost_rows(rows: Sequence[CostRow], notes: Sequence[str], dim: int) -> None:
    print(f"## Secure aggregation: cost of one round, {dim:,} float32 parameters")
    print()
    print(
        "Times: wall-clock compute in ms, client = mean over the n sampled clients. Bytes per "
        "client: mean over the n sampled clients; total: every message of the round "
        "(CKKS: also server → key holder → server). Dropouts: 10 % of the clients go "
        "silent before sending their (masked / encrypted) input. CKKS uses a fresh key "
        "per round, so every client downloads the 262 KB public context every round."
    )
    print()
    print(
        "| n | scheme | client ms | server ms | key holder ms | up / client | "
        "down / client | total / round | rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        holder = "–" if r.key_holder_s is None else _ms(r.key_holder_s)
        print(
            f"| {r.n} | {r.scheme} | {_ms(r.client_s)} | {_ms(r.server_s)} | {holder} | "
            f"{_kb(r.bytes_up)} | {_kb(r.bytes_down)} | {_kb(r.total_bytes)} | "
            f"{r.rel_error:.1e} |"
        )
    print()
    for note in notes:
        print(note)
    if notes:
        print()


@dataclass
class CkksParamRow:
    chain: tuple[int, ...]
    ciphertext_bytes: float  # per ciphertext of 4096 values
    expansion: float  # upload bytes / float32 bytes
    context_bytes: int
    client_s: float
    server_s: float
    key_holder_s: float
    rel_error: float


def ckks_parameter_rows(clients: int, dim: int) -> list[CkksParamRow]:
    updates = cost_updates(clients, dim, seed=7)
    rows = []
    for chain in ((60, 60), (60, 40, 40, 60)):
        params = CKKSParams(coeff_mod_bit_sizes=chain)
        result = run_he_round(updates, params=params)
        up = statistics.fmean(result.bytes_sent.values())
        rows.append(
            CkksParamRow(
                chain,
                up / params.num_chunks(dim),
                up / (4 * dim),
                next(iter(result.bytes_received.values())),
                statistics.fmean(result.client_seconds.values()),
                result.server_seconds,
                result.key_holder_seconds,
                rel_error(result.sum, updates, updates),
            )
        )
    return rows


def print_ckks_parameter_rows(rows: Sequence[CkksParamRow], clients: int, dim: int) -> None:
    print("## CKKS parameters: the modulus chain")
    print()
    print(
        f"{clients} clients, {dim:,} float32 parameters each, N = 8192 (4096 slots per "
        "ciphertext), scale 2^40, fresh key. Client s: load the context and encrypt; "
        "key holder s: key generation and decryption."
    )
    print()
    print(
        "| coeff_mod_bit_sizes | bytes / ciphertext | upload expansion vs float32 | "
        "public context | client s | server s | key holder s | rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {list(r.chain)} | {_kb(r.ciphertext_bytes)} | {r.expansion:.1f}x | "
            f"{_kb(r.context_bytes)} | {r.client_s:.3f} | {r.server_s:.3f} | "
            f"{r.key_holder_s:.3f} | {r.rel_error:.1e} |"
        )
    print()


Section = Callable[[argparse.Namespace], None]


@dataclass(frozen=True)
class LocalDpRow:
    name: str
    seconds: float


def _client_data(data: FederatedDataset, client_id: int) -> ClientData:
    return data.clients[client_id]


def local_dp_fit_costs(repeats: int = 5) -> list[LocalDpRow]:
    """Median seconds for one fit of every digits client, per way of training it."""
    from fedloom.client_store import ClientState
    from fedloom.data import build_federated_dataset
    from fedloom.messages import GLOBAL, FitTask
    from fedloom.strategies import build_client_runtime, build_learner

    variants = {
        "plain SGD": ["privacy.local_dp=false"],
        "DP-SGD, seeded noise": ["privacy.local_dp=true", "privacy.secure_noise=false"],
        "DP-SGD, CSPRNG noise": ["privacy.local_dp=true", "privacy.secure_noise=true"],
    }
    runtimes = {}
    num_clients = 0
    for name, overrides in variants.items():
        cfg = load_config(None, ["client.epochs=1", *overrides])
        data = build_federated_dataset(cfg.data, cfg.seed)
        num_clients = data.num_clients
        runtimes[name] = build_client_runtime(
            cfg,
            build_learner(cfg, data),
            functools.partial(_client_data, data),
            num_clients=num_clients,
        )
    w0 = next(iter(runtimes.values())).initial_vector()
    # Each client keeps its state (its local-DP ledger) from sweep to sweep, as an engine's
    # client store keeps it from round to round; every sweep trains from the same w0.
    states = {name: [ClientState() for _ in range(num_clients)] for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rnd in range(1, repeats + 1):
        for name, runtime in runtimes.items():
            started = time.perf_counter()
            for client in range(num_clients):
                task = FitTask(client_id=client, round=rnd, model_version=rnd - 1)
                runtime.fit(task, {GLOBAL: w0}, states[name][client])
            times[name].append(time.perf_counter() - started)
    return [LocalDpRow(name, statistics.median(t)) for name, t in times.items()]


def print_local_dp_rows(rows: Sequence[LocalDpRow]) -> None:
    seeded = next(r.seconds for r in rows if r.name == "DP-SGD, seeded noise")
    print("## Local DP-SGD: time per sweep of the 20 digits clients (one epoch each)\n")
    print("| training | s per sweep (median) | vs seeded DP-SGD |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.seconds:.3f} | {r.seconds / seeded:.2f}x |")
    print()


def section_local_dp(args: argparse.Namespace) -> None:
    print_local_dp_rows(local_dp_fit_costs())


def section_central_dp(args: argparse.Namespace) -> None:
    seeds = list(range(args.seeds))
    print_dp_rows(central_dp_tradeoff(args.epsilons, seeds, args.set), len(seeds))


def section_accountants(args: argparse.Namespace) -> None:
    print_accountant_rows(accountant_comparison(args.epsilons))


def section_secagg(args: argparse.Namespace) -> None:
    rows, notes = secagg_costs(args.sizes, args.dim)
    print_cost_rows(rows, notes, args.dim)


def section_he(args: argparse.Namespace) -> None:
    print_ckks_parameter_rows(ckks_parameter_rows(20, args.dim), 20, args.dim)


#: Sections in print order; add new benchmarks here (name → function).
SECTIONS: dict[str, Section] = {
    "central-dp": section_central_dp,
    "accountants": section_accountants,
    "secagg": section_secagg,
    "he": section_he,
    "local-dp": section_local_dp,
}


def parse_sections(values: Sequence[str]) -> list[str]:
    """``--sections secagg,he`` or ``--sections secagg he``: known names, in order given."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise ValueError(
            f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sections",
        nargs="+",
        default=list(SECTIONS),
        metavar="NAME",
        help=f"sections to run, comma- or space-separated (default: {','.join(SECTIONS)})",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (default 3)")
    parser.add_argument(
        "--epsilons",
        type=float,
        nargs="+",
        default=list(DEFAULT_EPSILONS),
        help="target ε values; inf = no DP (default: inf 16 8 4 2)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(SECAGG_SIZES),
        help="secagg: numbers of clients (default: 10 50 100 200)",
    )
    parser.add_argument(
        "--dim", type=int, default=SECAGG_DIM, help="secagg/he: parameters per update (100000)"
    )
    args = parser.parse_args(argv)
    try:
        args.sections = parse_sections(args.sections)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING)
    for name in args.sections:
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
