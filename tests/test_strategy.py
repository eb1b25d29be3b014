"""The strategy over a fake engine: triage (codec rejections, NaN, wrong sizes), the
aggregation minimum, and stage state through checkpoints."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.base import PlainServer
from fedloom.client_store import ClientState
from fedloom.codecs.base import Layout, RejectedUpdateError
from fedloom.codecs.downlink import Int8Broadcast
from fedloom.config import ServerConfig
from fedloom.engine.inprocess import LocalClients
from fedloom.exchange import ExchangeRequest
from fedloom.messages import (
    DROP_STRAGGLERS,
    GLOBAL,
    Broadcast,
    ClientFailure,
    EvalResult,
    EvalTask,
    FitResult,
    FitTask,
    Scalar,
)
from fedloom.server.aggregators import AggregationInput, MeanAggregator
from fedloom.server.arrivals import Arrivals, InstantArrivals
from fedloom.server.loop import FederatedServer
from fedloom.server.optimizers import make_server_optimizer
from fedloom.server.strategy import Strategy

D = 3
Answer = Callable[[FitTask, Broadcast], FitResult | ClientFailure]


def _result(task: FitTask, n: int = 10, **vectors: np.ndarray) -> FitResult:
    return FitResult(
        client_id=task.client_id,
        round=task.round,
        model_version=task.model_version,
        num_examples=n,
        vectors=dict(vectors),
        metrics={"train_loss": 1.0},
    )


def _update(values: Sequence[float], n: int = 10) -> Answer:
    return lambda task, broadcast: _result(task, n, delta=np.array(values, np.float32))


def _fail(task: FitTask, broadcast: Broadcast) -> ClientFailure:
    return ClientFailure(client_id=task.client_id, round=task.round, error="RuntimeError: down")


class _Clients(LocalClients):
    """A ClientExecutor whose clients answer as scripted, recording what they were sent."""

    def __init__(self, answers: Mapping[int, Answer]) -> None:
        self.answers = answers
        self.tasks: list[FitTask] = []
        self.broadcasts: list[Broadcast] = []

    def fit(
        self, tasks: Sequence[FitTask], broadcast: Broadcast
    ) -> list[FitResult | ClientFailure]:
        self.tasks.extend(tasks)
        self.broadcasts.append(broadcast)
        return [self.answers[t.client_id](t, broadcast) for t in tasks]

    def evaluate(
        self, tasks: Sequence[EvalTask], broadcast: Broadcast
    ) -> list[EvalResult | ClientFailure]:
        return []

    def exchange(self, request: ExchangeRequest, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
        raise AssertionError("no protocol in these rounds")

    def save_client_state(self) -> dict[str, Any]:
        return {}

    def load_client_state(self, manifest: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class _RejectOdd:
    """A codec whose server half refuses odd clients' updates and sets a task key."""

    name = "reject-odd"

    def encode(
        self,
        vectors: dict[str, np.ndarray],
        metrics: dict[str, float],
        *,
        config: Mapping[str, Scalar],
        state: ClientState,
        client_id: int,
        round: int,
    ) -> dict[str, np.ndarray]:
        return vectors

    def encoded_layout(self, layout: Layout) -> Layout:
        return layout

    def decode_sum(self, vectors: dict[str, np.ndarray], *, rnd: int) -> dict[str, np.ndarray]:
        return vectors

    def task_config(self, rnd: int) -> dict[str, Scalar]:
        return {"codec_round": rnd}

    def decode(self, result: FitResult) -> FitResult:
        if result.client_id % 2:
            raise RejectedUpdateError(f"client {result.client_id}'s update is refused")
        return result


class _CountingAggregator(MeanAggregator):
    """The mean, plus checkpointed state: a tensor and a JSON value."""

    def __init__(self) -> None:
        self.count = np.zeros(1, np.float64)
        self.label = "fresh"

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        self.count += inp.count
        self.label = f"after round {inp.round}"
        return super().aggregate(inp)

    def state(self) -> dict[str, Any]:
        return {"count": self.count.copy(), "label": self.label}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.count = np.asarray(state["count"], np.float64).copy()
        self.label = str(state["label"])


def _strategy(
    *,
    codecs: Sequence[Any] = (),
    min_aggregate_clients: int = 1,
    optimizer: str = "sgd",
    aggregator: Any = None,
) -> Strategy:
    sampling = ServerConfig(fraction_fit=1.0, min_fit_clients=1, optimizer=optimizer, lr=1.0)
    return Strategy(
        algorithm=PlainServer(),
        aggregator=MeanAggregator() if aggregator is None else aggregator,
        optimizer=make_server_optimizer(sampling, D),
        sampling=sampling,
        codecs=list(codecs),
        min_aggregate_clients=min_aggregate_clients,
        dimension=D,
    )


def _server(strategy: Strategy, clients: _Clients, rounds: int = 3) -> FederatedServer:
    return FederatedServer(
        strategy=strategy,
        executor=clients,
        initial_weights=np.zeros(D, np.float32),
        num_clients=len(clients.answers),
        rounds=rounds,
        seed=0,
    )


def test_example_weighted_mean_in_client_id_order_then_the_optimizer_step() -> None:
    strategy = _strategy()
    w = np.array([1.0, 1.0, 1.0], np.float32)
    tasks = [FitTask(client_id=c, round=1, model_version=0) for c in (1, 0)]
    outcomes = [
        _update([4.0, 3.0, 0.0], n=30)(tasks[0], {}),
        _update([1.0, 0.0, 0.0], n=10)(tasks[1], {}),
    ]
    out = strategy.process_fit(1, outcomes, w, _Clients({}).exchange)
    assert out.aggregated and [u.client_id for u in out.updates] == [0, 1]
    np.testing.assert_allclose(out.weights, [1.0 + 3.25, 1.0 + 2.25, 1.0])


def test_a_codec_rejection_is_a_failure_and_its_task_key_reaches_the_clients() -> None:
    clients = _Clients({c: _update([float(c), 0.0, 0.0]) for c in range(4)})
    server = _server(_strategy(codecs=[_RejectOdd()]), clients)
    record = server.run_round(1)
    assert all(t.config["codec_round"] == 1 for t in clients.tasks)
    assert all(t.config[DROP_STRAGGLERS] is False for t in clients.tasks)
    assert set(clients.broadcasts[0]) == {GLOBAL}
    assert record["clients_failed"] == 2 and record["clients_succeeded"] == 2
    np.testing.assert_allclose(server.state.weights, [1.0, 0.0, 0.0])  # mean of clients 0, 2
    assert server.state.participation.tolist() == [1, 0, 1, 0]


class _CountingInt8(Int8Broadcast):
    """The int8 downlink, counting how often the broadcast is encoded."""

    def __init__(self, bucket_size: int) -> None:
        super().__init__(bucket_size)
        self.encodes = 0

    def encode(self, broadcast: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.encodes += 1
        return super().encode(broadcast)


class _RecordingArrivals(InstantArrivals):
    """Instant arrivals that keep the download size each round was timed by."""

    def __init__(self) -> None:
        self.down_bytes: list[int] = []

    def arrive(self, rnd: int, outcomes: Sequence[Any], **kw: Any) -> Arrivals:
        self.down_bytes.append(kw["down_bytes"])
        return super().arrive(rnd, outcomes, **kw)


def test_a_round_encodes_its_broadcast_once_and_times_the_download_by_its_size() -> None:
    """The arrival model gets the size of the broadcast the clients were sent: int8 codes
    of the 3 weights plus 2 float32 scales (buckets of 2) = 11 bytes, every round."""
    strategy = _strategy()
    strategy.downlink, strategy.arrivals = _CountingInt8(bucket_size=2), _RecordingArrivals()
    clients = _Clients({c: _update([0.5, -0.5, 1.0]) for c in range(2)})
    server = _server(strategy, clients, rounds=2)
    for rnd in (1, 2):
        server.run_round(rnd)
    sent = [sum(v.nbytes for v in b.values()) for b in clients.broadcasts]
    assert sent == [11, 11] and strategy.arrivals.down_bytes == sent
    assert strategy.downlink.encodes == 2  # one per round
    # Without a configure_fit for the round (a direct call) the size is still the same.
    strategy.process_fit(3, [], np.zeros(D, np.float32), clients.exchange)
    assert strategy.arrivals.down_bytes[-1] == 11 and strategy.downlink.encodes == 3


def test_nan_inf_wrong_size_and_wrong_names_are_failures_with_reasons() -> None:
    good = np.array([0.5, -0.5, 1.0], np.float32)
    answers: dict[int, Answer] = {
        0: _update(good.tolist()),
        1: _update([np.nan, 0.0, 0.0]),
        2: _update([np.inf, 0.0, 0.0]),
        3: _update([1.0, 2.0]),  # wrong length
        4: lambda t, b: _result(t, delta=good, control=good),  # an upload nobody expects
        5: lambda t, b: _result(t, control=good),  # no delta
        6: _fail,
    }
    strategy = _strategy()
    tasks = [FitTask(client_id=c, round=1, model_version=0) for c in answers]
    outcomes = [answers[t.client_id](t, {}) for t in tasks]
    out = strategy.process_fit(1, outcomes, np.zeros(D, np.float32), _Clients({}).exchange)
    why = {f.client_id: f.error for f in out.failures}
    assert set(why) == {1, 2, 3, 4, 5, 6} and [u.client_id for u in out.updates] == [0]
    assert "NaN or Inf" in why[1] and "NaN or Inf" in why[2]
    assert "shape (2,)" in why[3] and "expected (3,)" in why[3]
    assert "control" in why[4] and "control" in why[5]
    assert all(f.round == 1 for f in out.failures)
    np.testing.assert_array_equal(out.weights, good)


def test_dropped_stragglers_are_counted_and_held_uploads_pass_triage() -> None:
    def straggler(task: FitTask, broadcast: Broadcast) -> FitResult:
        result = _result(task)
        result.straggler = True
        return result

    def held(task: FitTask, broadcast: Broadcast) -> FitResult:
        result = _result(task)
        result.held = True
        return result

    tasks = [FitTask(client_id=c, round=2, model_version=1) for c in range(3)]
    outcomes = [straggler(tasks[0], {}), held(tasks[1], {}), _update([1.0, 1.0, 1.0])(tasks[2], {})]
    updates, failures, dropped, _ = _strategy()._triage(2, outcomes)
    assert dropped == 1 and failures == [] and [u.client_id for u in updates] == [1, 2]


@pytest.mark.parametrize(("succeeding", "aggregated"), [(1, False), (2, True)])
def test_min_aggregate_clients(succeeding: int, aggregated: bool) -> None:
    answers = {c: _update([1.0, 2.0, 3.0]) if c < succeeding else _fail for c in range(3)}
    server = _server(_strategy(min_aggregate_clients=2), _Clients(answers))
    record = server.run_round(1)
    assert record["aggregated"] is aggregated
    assert record["clients_succeeded"] == succeeding
    assert record["clients_failed"] == 3 - succeeding
    expected = [1.0, 2.0, 3.0] if aggregated else [0.0, 0.0, 0.0]
    np.testing.assert_array_equal(server.state.weights, expected)
    assert int(server.state.participation.sum()) == (succeeding if aggregated else 0)


def test_stage_state_round_trips_through_state_and_load_state() -> None:
    answers = {c: _update([1.0 + c, -1.0, 0.5]) for c in range(3)}
    first = _strategy(optimizer="momentum", aggregator=_CountingAggregator())
    server = _server(first, _Clients(answers))
    server.run_round(1)
    server.run_round(2)
    tensors, meta = first.state()
    assert set(tensors) == {"opt/velocity", "agg/count"} and meta == {"agg/label": "after round 2"}
    assert float(tensors["agg/count"][0]) == 6.0

    second = _strategy(optimizer="momentum", aggregator=_CountingAggregator())
    second.load_state(tensors, meta)
    again_tensors, again_meta = second.state()
    assert again_meta == meta
    for name, value in tensors.items():
        np.testing.assert_array_equal(again_tensors[name], value)

    # Through a checkpoint, a fresh server continues exactly as the first one does.
    ckpt = server.checkpoint()
    assert ckpt.meta["stages"] == {"agg/label": "after round 2"}
    resumed = _server(
        _strategy(optimizer="momentum", aggregator=_CountingAggregator()), _Clients(answers)
    )
    resumed.restore(ckpt, server.state.history)
    server.run_round(3)
    resumed.run_round(3)
    np.testing.assert_array_equal(resumed.state.weights, server.state.weights)
    assert resumed.strategy.aggregator.label == "after round 3"  # type: ignore[attr-defined]
    assert [r["round"] for r in resumed.state.history] == [1, 2, 3]
    # Without the state the momentum would differ: the check above can fail.
    fresh = _server(_strategy(optimizer="momentum"), _Clients(answers))
    fresh.state.weights = ckpt.tensors["global"].copy()
    fresh.run_round(3)
    assert not np.array_equal(fresh.state.weights, server.state.weights)
