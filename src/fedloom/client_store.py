"""Per-client state that outlives a round: tensors (SCAFFOLD's c_i, personal layers,
error-feedback residuals) and JSON (a local-DP ledger), keyed by client id.

Stages own their part of a client's state under their own names (``"scaffold/c"``,
``"local_dp"``); the store does not know what they mean.

Simulation keeps the store in the run directory, one safetensors file per client and
version (``client_state/<id>/r<round>.safetensors``, JSON in its metadata), with a
bounded in-memory cache: 10,000 clients with a vector each never sit in memory at once.
A write is a new version; a checkpoint records which version of every client it
belongs to (:meth:`ClientStateStore.manifest`), so a resumed run reads exactly the
state of its checkpoint round, and versions no kept checkpoint names are deleted.
Without a directory (a quick Python-API run) the store is a plain dict in memory.
A deployed client keeps its own state on its own disk instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

_VERSION_RE = re.compile(r"^r(\d+)\.safetensors$")
_META_KEY = "fedloom.client_state"
_EMPTY = "__fedloom__/empty"


@dataclass
class ClientState:
    """One client's state: named float tensors and JSON-able values."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not self.tensors and not self.meta

    def copy(self) -> ClientState:
        return ClientState(
            {k: v.copy() for k, v in self.tensors.items()}, json.loads(json.dumps(self.meta))
        )

    def to_bytes(self) -> bytes:
        """A self-contained encoding (safetensors), for pipes and the network."""
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(v) for k, v in self.tensors.items()}
        if not tensors:
            tensors[_EMPTY] = np.zeros(1, np.uint8)
        return save(tensors, metadata={_META_KEY: json.dumps(self.meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientState:
        from safetensors.numpy import load

        tensors = load(data)
        tensors.pop(_EMPTY, None)
        meta = _meta_of_bytes(data)
        return cls({k: v.copy() for k, v in tensors.items()}, meta)


def _meta_of_bytes(data: bytes) -> dict[str, Any]:
    # safetensors keeps metadata in the header: a little-endian u64 length, then JSON.
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    raw = header.get("__metadata__", {}).get(_META_KEY, "{}")
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError("client state metadata is not an object")
    return meta


class ClientStateStore:
    """Versioned per-client state, on disk with a bounded cache, or in memory."""

    def __init__(self, directory: Path | None = None, *, cache_clients: int = 512) -> None:
        self.directory = directory
        self.cache_clients = max(1, cache_clients)
        self._cache: OrderedDict[int, ClientState] = OrderedDict()
        #: client id → round of its newest version on disk.
        self._versions: dict[int, int] = {}
        self._memory: dict[int, ClientState] = {}  # the whole store when no directory
        self._kept: list[dict[int, int]] = []
        self._touched: set[int] = set()  # clients written since the last manifest
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ access
    def get(self, client_id: int) -> ClientState:
        """A copy of the client's state (empty if it has none): edit it, then :meth:`put`."""
        if self.directory is None:
            state = self._memory.get(client_id)
            return state.copy() if state is not None else ClientState()
        cached = self._cache.get(client_id)
        if cached is not None:
            self._cache.move_to_end(client_id)
            return cached.copy()
        version = self._versions.get(client_id)
        if version is None:
            return ClientState()
        state = self._read(client_id, version)
        self._remember(client_id, state)
        return state.copy()

    def put(self, client_id: int, state: ClientState, *, round: int) -> None:
        """Store ``state`` as the client's version of ``round`` (written through to disk)."""
        if self.directory is None:
            self._memory[client_id] = state.copy()
            return
        if state.is_empty() and client_id not in self._versions:
            return
        path = self._path(client_id, round)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v) for k, v in state.tensors.items()}
        if not tensors:
            tensors[_EMPTY] = np.zeros(1, np.uint8)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(state.meta)})
        os.replace(tmp, path)
        self._versions[client_id] = round
        self._touched.add(client_id)
        self._remember(client_id, state.copy())

    def clients(self) -> list[int]:
        """Ids of clients that have state."""
        if self.directory is None:
            return sorted(self._memory)
        return sorted(self._versions)

    # -------------------------------------------------------------- checkpoints
    def manifest(self, *, keep: int = 3) -> dict[str, Any]:
        """Which version of each client a checkpoint holds (JSON-able), and prune the
        versions that neither this nor the ``keep - 1`` previous manifests name."""
        if self.directory is None:
            return {"memory": {str(c): s.to_bytes().hex() for c, s in self._memory.items()}}
        current = dict(self._versions)
        self._kept = [*self._kept[-(keep - 1) :], current] if keep > 1 else [current]
        # Only a client written since the last manifest can have a version no kept
        # manifest names (an old version stays named until a newer one replaces it
        # in all kept manifests, which takes `keep` manifests with that client touched).
        self._touched |= {c for m in self._kept[:-1] for c in m if m[c] != current.get(c)}
        self._prune(self._touched)
        self._touched = set()
        return {"versions": {str(c): r for c, r in current.items()}}

    def restore(self, manifest: Mapping[str, Any]) -> None:
        """Go back to a manifest's versions (a resume); newer versions are ignored."""
        self._cache.clear()
        if self.directory is None:
            mem = manifest.get("memory", {})
            self._memory = {
                int(c): ClientState.from_bytes(bytes.fromhex(h)) for c, h in mem.items()
            }
            return
        self._versions = {int(c): int(r) for c, r in manifest.get("versions", {}).items()}
        self._kept = [dict(self._versions)]
        for cid, rnd in self._versions.items():
            if not self._path(cid, rnd).is_file():
                raise FileNotFoundError(
                    f"client {cid}'s state of round {rnd} is missing from {self.directory}; "
                    "the run directory is incomplete, start a new run"
                )

    # ---------------------------------------------------------------- internals
    def _path(self, client_id: int, round: int) -> Path:
        assert self.directory is not None
        return self.directory / str(client_id) / f"r{round:06d}.safetensors"

    def _read(self, client_id: int, round: int) -> ClientState:
        path = self._path(client_id, round)
        tensors = load_file(str(path))
        tensors.pop(_EMPTY, None)
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {}).get(_META_KEY, "{}"))
        return ClientState(dict(tensors), meta)

    def _remember(self, client_id: int, state: ClientState) -> None:
        self._cache[client_id] = state
        self._cache.move_to_end(client_id)
        while len(self._cache) > self.cache_clients:
            self._cache.popitem(last=False)

    def _prune(self, clients: Iterable[int]) -> None:
        """Delete version files of ``clients`` that no kept manifest names."""
        assert self.directory is not None
        for cid in clients:
            named = {m[cid] for m in self._kept if cid in m}
            folder = self.directory / str(cid)
            for entry in folder.iterdir() if folder.is_dir() else ():
                match = _VERSION_RE.match(entry.name)
                if match and int(match.group(1)) not in named:
                    # Versions newer than every manifest belong to rounds not yet
                    # checkpointed; none exist at manifest time (writes precede it).
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
