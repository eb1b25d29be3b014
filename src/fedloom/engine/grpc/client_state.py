"""A deployed client's durable state, on the client's own machine.

A client's :class:`~fedloom.client_store.ClientState` is what its algorithm keeps across
rounds: tensors (SCAFFOLD's control variate, personal layers) and JSON, among them
local DP's privacy ledger (``meta["local_dp"]``). With ``privacy.local_dp`` a client's ε
is the composition of every DP-SGD step it has taken in the experiment
(:mod:`fedloom.algorithms.dpsgd_opacus`); kept only in memory, a restart would silently
return the site's spent budget to zero and account its next releases as if none had
come before. So the client writes its state to a file after every fit and reads it back
when it starts.

Choices:

* **Keyed by what the budget is about**: the *site* and the *experiment*. The site is
  the built-in partition (``partition-K``, the server's client id for it) or, for a
  client that reads its own data, that data's resolved path: the server gives such a
  client the first free id, which can change across a restart, and the ledger is about
  the data, not the id. The experiment is the SHA-256 of the config the server sent
  (canonical JSON), so another experiment starts its own ledger and a restarted client
  of the same experiment resumes. File: ``STATE_DIR/SITE-DIGEST16.json``.
* **Written before the update leaves the machine**: a crash between the write and the
  push over-counts (safe); the reverse order could release an update nobody recorded.
* **Atomic and durable**: :func:`fedloom.store.atomic_write` (a temporary file in the
  same folder, fsync, ``os.replace``, fsync of the folder). A torn write leaves the
  previous ledger.
* **Versioned JSON** naming its site and config digest, checked when read: a file from a
  newer fedloom, another site or another experiment is refused, not misread. The state's
  JSON is kept readable (``meta``); its tensors are one base64 safetensors document
  (``tensors``). Version 1 files (a ledger only, under ``state``) are read as ``meta``.
* **Never silently reset**: an unreadable or corrupt file stops the client with one line
  (:class:`ClientStateError`, exit 2); only the operator may delete it.
* **One writer**: an exclusive ``flock`` on ``FILE.lock`` while the client runs; two
  processes of one site and experiment would each overwrite the other's steps.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from fedloom.algorithms.dpsgd import LEDGER_KEY
from fedloom.client_store import ClientState
from fedloom.config import ConfigError
from fedloom.engine.grpc import RESUMABLE_SETTINGS
from fedloom.store import atomic_write

if sys.platform != "win32":
    import fcntl

STATE_FORMAT = "fedloom-client-state"
#: Bump when the file's layout changes; a reader refuses versions it does not know.
STATE_VERSION = 2
#: Older versions this fedloom still reads.
READABLE_VERSIONS = (1, STATE_VERSION)

log = logging.getLogger("fedloom.client")


class ClientStateError(ConfigError):
    """The client's state file cannot be used; one line saying what to fix (exit 2)."""


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/fedloom``, or ``~/.local/state/fedloom`` (the XDG default).

    A relative ``XDG_STATE_HOME`` is ignored, as the XDG base-directory spec requires.
    """
    base = os.environ.get("XDG_STATE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "fedloom"


def config_digest(config_json: str) -> str:
    """SHA-256 (hex) of the experiment config, canonicalised (sorted keys, no spaces).

    Canonical so that formatting alone (key order, whitespace) never starts a new ledger,
    and without the settings a resumed server may change (:data:`RESUMABLE_SETTINGS`:
    rounds, timeouts), so extending a run keeps every site's ledger.
    """
    tree = json.loads(config_json)
    for dotted in RESUMABLE_SETTINGS:
        *sections, key = dotted.split(".")
        node = tree
        for part in sections:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(key, None)
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def site_name(partition: int, data_path: Path | None = None) -> str:
    """The site a ledger belongs to: ``partition-K``, or ``data-HASH`` of the local data.

    The data path is resolved, so the same file named two ways is one site. With
    neither (an app that reads its data its own way) the site is ``local-data``: one
    per state folder, and the lock refuses a second running client of the experiment.
    """
    if data_path is not None:
        resolved = str(data_path.expanduser().resolve())
        return "data-" + hashlib.sha256(resolved.encode()).hexdigest()[:16]
    return f"partition-{partition}" if partition >= 0 else "local-data"


class ClientStateFile:
    """One site's state in one experiment: ``STATE_DIR/SITE-DIGEST16.json``.

    :meth:`open` locks the file for this process and reads it; :meth:`save` replaces it
    atomically; :meth:`close` releases the lock (so does the process's end, even a kill).
    """

    def __init__(self, state_dir: Path, site: str, config_json: str, *, run_id: str = "") -> None:
        self.site = site
        #: The server run this state's tensors belong to ("" when the server sent none).
        self.run_id = run_id
        self.digest = config_digest(config_json)
        self.path = state_dir / f"{site}-{self.digest[:16]}.json"
        self._lock: IO[bytes] | None = None

    @property
    def is_open(self) -> bool:
        return self._lock is not None

    def open(self) -> ClientState | None:
        """Take this file for this process; return the saved state (None: none saved yet).

        Raises :class:`ClientStateError` if the folder cannot be made, another running
        client holds the file, or the file is unreadable.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = (self.path.parent / (self.path.name + ".lock")).open("ab")
        except OSError as err:
            raise ClientStateError(
                f"cannot create the client state folder '{self.path.parent}' "
                f"({err.strerror or err}); pass a writable --state-dir"
            ) from None
        if sys.platform != "win32":
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                raise ClientStateError(
                    f"client state file '{self.path}' is in use by another running fedloom "
                    "client of the same site and experiment; stop that client first"
                ) from None
        self._lock = lock
        try:
            return self._read()
        except ClientStateError:
            self.close()
            raise

    def _read(self) -> ClientState | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise self.unusable("not UTF-8 text") from None
        except OSError as err:
            raise self.unusable(err.strerror or str(err)) from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise self.unusable(f"not valid JSON: {err.msg} at line {err.lineno}") from None
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise self.unusable("not a fedloom client state file")
        version = doc.get("version")
        if version not in READABLE_VERSIONS:
            raise ClientStateError(
                f"client state file '{self.path}' has state version {version!r} and this "
                f"fedloom reads version {STATE_VERSION}; run the fedloom release that wrote it"
            )
        if doc.get("site") != self.site or doc.get("config_sha256") != self.digest:
            raise self.unusable("it belongs to another site or experiment")
        if version == 1:
            meta, tensors = doc.get("state"), None
        else:
            meta, tensors = doc.get("meta"), doc.get("tensors")
        if not isinstance(meta, dict):
            raise self.unusable("its state's JSON is not an object")
        check_ledger(meta, self.unusable)
        saved_run = doc.get("run_id", "")
        if tensors is not None and saved_run and self.run_id and saved_run != self.run_id:
            # Algorithm state (control variates, personal layers) belongs to one run; a
            # new run of the same experiment starts it afresh. The privacy ledger is the
            # site's and is kept: its data spent that budget whatever the run.
            log.info(
                "client state file '%s' holds algorithm state of another run; starting it "
                "afresh (the privacy ledger is kept)",
                self.path,
            )
            tensors = None
        if tensors is None:
            return ClientState({}, meta)
        if not isinstance(tensors, str):
            raise self.unusable("its 'tensors' is not a string")
        try:
            raw = base64.b64decode(tensors.encode("ascii"), validate=True)
            return ClientState(ClientState.from_bytes(raw).tensors, meta)
        except Exception as err:  # base64's, safetensors' own error types
            raise self.unusable(f"its tensors do not decode: {str(err)[:80]}") from None

    def unusable(self, why: str) -> ClientStateError:
        """The one-line refusal for a state file that exists but cannot be used.

        Deleting the file is the operator's call, never ours: it resets the site's budget.
        """
        return ClientStateError(
            f"client state file '{self.path}' is unusable ({why}) and starting without it "
            "would reset this site's spent privacy budget; restore it from a backup, or "
            "delete it to knowingly start again from zero"
        )

    def save(self, state: ClientState) -> None:
        """Replace the file with ``state`` atomically and durably (see the module doc)."""
        doc: dict[str, Any] = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "site": self.site,
            "config_sha256": self.digest,
            "run_id": self.run_id,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "meta": state.meta,
        }
        if state.tensors:
            tensors_only = ClientState(state.tensors, {})
            doc["tensors"] = base64.b64encode(tensors_only.to_bytes()).decode("ascii")
        atomic_write(self.path, json.dumps(doc, indent=1) + "\n")

    def close(self) -> None:
        """Release the lock; the file stays."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def check_ledger(meta: dict[str, Any], unusable: Any) -> None:
    """Refuse at start, not at the next fit, a local-DP ledger no accountant can read.

    The ledger is Opacus' RDP history, ``[[noise multiplier, sample rate, steps], ...]``.
    """
    ledger = meta.get(LEDGER_KEY)
    if ledger is None:
        return
    ok = isinstance(ledger, list) and all(
        isinstance(entry, list)
        and len(entry) == 3
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in entry)
        for entry in ledger
    )
    if not ok:
        raise unusable("malformed state: its local-DP ledger is not [[sigma, q, steps], ...]")
