"""The Ray engine on a real two-node cluster: the in-process model, and a dead actor.

The cluster is started here (``ray start --head`` and a second ``ray start --address``
worker node, one CPU each) and stopped by the fixture's finalizer whatever happens.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from fedloom.config import ConfigError, load_config
from fedloom.engine.simulation import Wiring, make_executor, run_federation, run_simulation
from fedloom.server.loop import ClientExecutor
from fedloom.store import RunStore
from tests.helpers import final_weights

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fedloom[ray]')")

from fedloom.engine.ray import RayUnavailableError, _join, check_reachable  # noqa: E402
from tests.ray_helpers import TwoNodeCluster, dying_runtime, free_port  # noqa: E402

BASE = [
    "data.name=synthetic",
    "data.num_clients=6",
    "rounds=3",
    "client.epochs=1",
    "client.straggler_fraction=0.5",
    "strategy=fedavgm",
    "server.fraction_fit=1.0",
    "server.min_fit_clients=6",
    "eval.max_examples=200",
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[TwoNodeCluster]:
    nodes = TwoNodeCluster()
    try:
        yield nodes.start()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        nodes.stop()


def _ray_config(address: str, *extra: str) -> list[str]:
    return [*BASE, "engine.name=ray", f"engine.address='{address}'", "engine.workers=2", *extra]


@pytest.mark.timeout(900)  # two nodes and three sets of actors start on a 2-core machine
def test_cluster_run_equals_in_process_and_survives_a_killed_actor(
    cluster: TwoNodeCluster, tmp_path: Path
) -> None:
    run_simulation(load_config(None, BASE), tmp_path / "inprocess")
    nodes_seen: list[int] = []

    def on_ray(wiring: Wiring) -> ClientExecutor:
        executor = make_executor(wiring)
        nodes_seen.append(sum(1 for n in ray.nodes() if n["Alive"]))
        return executor

    cfg = load_config(None, _ray_config(cluster.address))
    run_federation(cfg, tmp_path / "ray", on_ray)
    assert nodes_seen == [2]
    np.testing.assert_allclose(
        final_weights(tmp_path / "ray"), final_weights(tmp_path / "inprocess"), atol=1e-6
    )

    # Round 2: the actor that trains client 0 is SIGKILLed mid-round.
    marker = tmp_path / "killed.pid"

    def with_a_death(wiring: Wiring) -> ClientExecutor:
        assert wiring.runtime_factory is not None
        wiring.runtime_factory = partial(dying_runtime, wiring.runtime_factory, str(marker), 0, 2)
        return make_executor(wiring)

    summary = run_federation(
        load_config(None, _ray_config(cluster.address)), tmp_path / "killed", with_a_death
    )
    assert marker.read_text().strip().isdigit()  # an actor process really died
    history = summary["history"]
    assert [r["round"] for r in history] == [1, 2, 3]
    died = history[1]
    assert died["aggregated"] and died["actors_replaced"] == 1
    # Client 0 and at most the one task queued behind it on the same actor.
    assert 1 <= died["clients_failed"] <= 2
    assert died["clients_succeeded"] == 6 - died["clients_failed"]
    with RunStore.open(tmp_path / "killed") as store:
        failures = store.failures()
    assert {f["round"] for f in failures} == {2}
    assert 0 in {f["client_id"] for f in failures}
    assert all(f["error"].startswith("Ray actor died") for f in failures)
    # The replacement trains round 3 with everyone.
    assert history[0]["clients_failed"] == history[2]["clients_failed"] == 0
    assert "actors_replaced" not in history[2]


def test_more_actors_than_the_cluster_holds_is_refused(
    cluster: TwoNodeCluster, tmp_path: Path
) -> None:
    cfg = load_config(None, _ray_config(cluster.address, "engine.workers=3", "rounds=1"))
    with pytest.raises(ConfigError, match="need 3 CPUs but the Ray cluster has 2"):
        run_simulation(cfg, tmp_path / "too-many")


@pytest.mark.slow
def test_local_ray_instance_equals_in_process(tmp_path: Path) -> None:
    """Without engine.address the engine starts Ray on this machine and stops it after."""
    base = [*BASE, "rounds=2"]
    run_simulation(load_config(None, base), tmp_path / "inprocess")
    run_simulation(
        load_config(None, [*base, "engine.name=ray", "engine.workers=1"]), tmp_path / "ray"
    )
    assert not ray.is_initialized()
    np.testing.assert_allclose(
        final_weights(tmp_path / "ray"), final_weights(tmp_path / "inprocess"), atol=1e-6
    )


def test_unreachable_cluster_is_one_line(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RayUnavailableError, match="cannot reach the Ray cluster") as err:
        check_reachable(address, timeout_s=5.0)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="cannot reach the Ray cluster"):
        run_simulation(
            load_config(None, _ray_config(address, "rounds=1")), tmp_path / "unreachable"
        )
    with pytest.raises(RayUnavailableError, match="is not host:port"):
        check_reachable("head-node")


def test_a_cluster_that_refuses_the_driver_is_one_line() -> None:
    """What ``ray.init`` raises when the head wants a token this driver lacks (Ray 2.60:
    ConnectionError after a minute of retries) becomes one line that says what to set."""

    class Refusing:
        exceptions = ray.exceptions

        @staticmethod
        def init(**_: object) -> None:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379\nmore")

    with pytest.raises(RayUnavailableError, match="RAY_AUTH_MODE=token") as err:
        _join(Refusing, "10.0.0.5:6379")
    assert "\n" not in str(err.value)
    assert "Failed to connect to Ray cluster at 10.0.0.5:6379" in str(err.value)


def test_ray_config_rules() -> None:
    with pytest.raises(ConfigError, match=r"engine\.address names a Ray cluster"):
        load_config(None, ["engine.address='127.0.0.1:6379'"])
    with pytest.raises(ConfigError, match="not on the ray engine"):
        load_config(None, ["engine.name=ray", "privacy.secure_aggregation='secagg+'"])


def test_vectorized_actors_equal_in_process(cluster: TwoNodeCluster, tmp_path: Path) -> None:
    """engine.vectorize: each actor trains its chunk's clients at once, and the federation
    ends at the in-process model (the vectorized engine's float tolerance)."""
    base = [*BASE, "model.name=logreg"]
    run_simulation(load_config(None, base), tmp_path / "inprocess")
    run_simulation(
        load_config(None, [*_ray_config(cluster.address, "engine.vectorize=true"), *base[-1:]]),
        tmp_path / "ray-vectorized",
    )
    np.testing.assert_allclose(
        final_weights(tmp_path / "ray-vectorized"),
        final_weights(tmp_path / "inprocess"),
        atol=1e-4,
    )
