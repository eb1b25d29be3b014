"""The versioned per-client state store: versions, manifests, pruning, cache, memory mode."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedloom.client_store import ClientState, ClientStateStore


def _state(value: float, ledger: list[list[float]] | None = None) -> ClientState:
    meta = {"local_dp": ledger if ledger is not None else [[1.0, 0.1, value]]}
    return ClientState({"scaffold/c": np.full(3, value, np.float32)}, meta)


def _versions(directory: Path, client: int) -> list[str]:
    return sorted(p.name for p in (directory / str(client)).glob("r*.safetensors"))


def test_put_writes_a_version_per_round_and_get_returns_the_newest(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    assert store.get(7).is_empty() and store.clients() == []
    store.put(7, _state(1.0), round=1)
    store.put(7, _state(3.0), round=3)
    assert _versions(tmp_path, 7) == ["r000001.safetensors", "r000003.safetensors"]
    got = store.get(7)
    np.testing.assert_array_equal(got.tensors["scaffold/c"], np.full(3, 3.0, np.float32))
    assert got.meta == {"local_dp": [[1.0, 0.1, 3.0]]} and store.clients() == [7]
    # get returns a copy: editing it changes nothing until it is put back.
    got.tensors["scaffold/c"][:] = -1.0
    got.meta["local_dp"].append([9.0, 9.0, 9.0])
    again = store.get(7)
    assert float(again.tensors["scaffold/c"][0]) == 3.0 and len(again.meta["local_dp"]) == 1


def test_manifest_and_restore_go_back_to_the_checkpointed_versions(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.put(0, _state(1.0), round=1)
    store.put(1, ClientState(meta={"only": "json"}), round=1)
    manifest = store.manifest()
    assert json.loads(json.dumps(manifest)) == manifest  # it goes into checkpoint meta
    store.put(0, _state(2.0), round=2)  # a round that was never checkpointed
    store.restore(manifest)
    assert float(store.get(0).tensors["scaffold/c"][0]) == 1.0
    # A new process (a resume) reads the same versions from the directory.
    fresh = ClientStateStore(tmp_path)
    fresh.restore(manifest)
    assert float(fresh.get(0).tensors["scaffold/c"][0]) == 1.0
    assert fresh.get(1).meta == {"only": "json"} and fresh.get(1).tensors == {}
    assert fresh.clients() == [0, 1] and fresh.get(2).is_empty()


def test_pruning_keeps_the_versions_the_last_three_manifests_name(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.put(1, _state(100.0), round=1)  # never written again: always named
    manifests = []
    for rnd in range(1, 6):
        store.put(0, _state(float(rnd)), round=rnd)
        manifests.append(store.manifest(keep=3))
    assert _versions(tmp_path, 0) == [f"r{r:06d}.safetensors" for r in (3, 4, 5)]
    assert _versions(tmp_path, 1) == ["r000001.safetensors"]
    for rnd in (3, 4, 5):  # every kept checkpoint can still be resumed
        fresh = ClientStateStore(tmp_path)
        fresh.restore(manifests[rnd - 1])
        assert float(fresh.get(0).tensors["scaffold/c"][0]) == float(rnd)
        assert float(fresh.get(1).tensors["scaffold/c"][0]) == 100.0
    with pytest.raises(FileNotFoundError) as err:  # an older one says why, in one line
        ClientStateStore(tmp_path).restore(manifests[0])
    assert "client 0" in str(err.value) and "\n" not in str(err.value)

    # Two writes between manifests: the first version is named by none and goes.
    store.put(0, _state(6.0), round=6)
    store.put(0, _state(7.0), round=7)
    store.manifest(keep=3)
    assert _versions(tmp_path, 0) == [f"r{r:06d}.safetensors" for r in (4, 5, 7)]


def test_bounded_cache_still_returns_every_clients_state(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path, cache_clients=2)
    for c in range(50):
        store.put(c, _state(float(c), [[float(c), 0.5, 1.0]]), round=1)
    assert len(store._cache) <= 2
    for c in [*range(50), *reversed(range(50))]:
        got = store.get(c)
        np.testing.assert_array_equal(got.tensors["scaffold/c"], np.full(3, c, np.float32))
        assert got.meta == {"local_dp": [[float(c), 0.5, 1.0]]}
        assert len(store._cache) <= 2


def test_in_memory_store_round_trips_through_its_manifest() -> None:
    store = ClientStateStore()
    store.put(3, _state(1.0), round=1)
    store.put(3, _state(2.0), round=2)  # memory keeps only the newest
    store.put(5, ClientState(meta={"k": [1, 2]}), round=2)
    got = store.get(3)
    got.tensors["scaffold/c"][:] = 0.0  # a copy
    assert float(store.get(3).tensors["scaffold/c"][0]) == 2.0
    manifest = json.loads(json.dumps(store.manifest()))
    fresh = ClientStateStore()
    fresh.restore(manifest)
    assert fresh.clients() == [3, 5]
    np.testing.assert_array_equal(fresh.get(3).tensors["scaffold/c"], np.full(3, 2.0, np.float32))
    assert fresh.get(5).meta == {"k": [1, 2]} and fresh.get(5).tensors == {}
    assert fresh.get(4).is_empty()


def test_client_state_bytes_round_trip() -> None:
    for state in (_state(4.0), ClientState(), ClientState(meta={"a": {"b": None}})):
        back = ClientState.from_bytes(state.to_bytes())
        assert back.meta == state.meta and set(back.tensors) == set(state.tensors)
        for name, value in state.tensors.items():
            np.testing.assert_array_equal(back.tensors[name], value)
