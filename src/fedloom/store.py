"""Run store: the durable record of one federated run (SQLite + safetensors).

A run directory is the contract between the round loop, ``fedloom run --resume`` and
``fedloom report``. It holds::

    config.json     the configuration the run was created with (human-readable copy)
    run.sqlite      per-round history, client failures, and run metadata
    checkpoints/    round_00012.safetensors: global vector, optimizer and client state
    summary.json    written at the end of a run (see :meth:`RunStore.write_summary`)
    history.csv     a flat export of the history, for spreadsheets and pandas
    accuracy.png    written by :mod:`fedloom.report`

Design choices, and why:

* **SQLite in WAL mode, one committed transaction per write.** A round is recorded the
  moment it completes, so a killed process (Ctrl-C, OOM killer, pre-empted node) never
  loses a recorded round, and ``fedloom report`` can read a run while it is still
  going (WAL lets one writer and many readers work concurrently).
* **Checkpoints are written atomically** (temporary file in the same directory, fsync,
  ``os.replace``), so a checkpoint file either is complete or does not exist. The
  files on disk, not the SQLite row, are the source of truth for "latest checkpoint":
  a kill between the rename and the SQLite update must not hide a good checkpoint.
* **Resume = latest checkpoint + truncate.** Rounds recorded after the last checkpoint
  were never captured in model state, so :meth:`RunStore.truncate_after` drops them
  and the resumed run re-executes (and re-records) them; seeded per-round randomness
  makes the replay identical.
* **Nothing is pickled.** Tensors go through safetensors, everything else through
  JSON, so a checkpoint from an untrusted source cannot execute code.

This module depends only on NumPy, safetensors and the standard library (no torch).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import secrets
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "DB_FILE",
    "HISTORY_CSV_FILE",
    "PLOT_FILE",
    "SCHEMA_VERSION",
    "SUMMARY_FILE",
    "Checkpoint",
    "RunStore",
    "RunStoreError",
    "atomic_write",
]

CONFIG_FILE = "config.json"
DB_FILE = "run.sqlite"
CHECKPOINTS_DIR = "checkpoints"
SUMMARY_FILE = "summary.json"
HISTORY_CSV_FILE = "history.csv"
PLOT_FILE = "accuracy.png"

#: Stored in SQLite's ``user_version``; bump when the schema changes incompatibly.
SCHEMA_VERSION = 1

_CKPT_RE = re.compile(r"^round_(\d+)\.safetensors$")
_CKPT_TMP_PREFIX = ".tmp-round_"
# Keys under this prefix are the store's own; user tensors may not use it.
_RESERVED_PREFIX = "__fedloom__"
# Some safetensors versions refuse to write a file with no tensors; an empty tensors
# dict is therefore stored as this one-byte placeholder and removed again on load.
_EMPTY_SENTINEL = _RESERVED_PREFIX + "/empty"
_MD_FORMAT = "fedloom.format"
_MD_ROUND = "fedloom.round"
_MD_META = "fedloom.meta"
_CKPT_FORMAT = "fedloom-checkpoint/1"

_SCHEMA = """
CREATE TABLE rounds (
    round       INTEGER PRIMARY KEY,
    record      TEXT    NOT NULL,
    recorded_at REAL    NOT NULL
);
CREATE TABLE failures (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    round       INTEGER NOT NULL,
    client_id   INTEGER NOT NULL,
    error       TEXT    NOT NULL,
    traceback   TEXT    NOT NULL,
    recorded_at REAL    NOT NULL
);
CREATE INDEX failures_by_round ON failures(round);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class RunStoreError(Exception):
    """A problem with a run directory that the user can fix (one line: what to do)."""


@dataclass
class Checkpoint:
    """Everything needed to continue a run after ``round``.

    ``tensors`` holds arrays (the flat global vector under ``"global"``, optimizer
    moments such as ``"opt/m"``, per-client state such as ``"client/17/c"``); keys are
    free-form strings. ``meta`` holds JSON-able values: RNG state, optimizer step
    count, privacy ledger, anything else that is not an array.
    """

    round: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _json_default(obj: Any) -> Any:
    """Let NumPy scalars/arrays and paths into JSON (round records often carry them)."""
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"value of type {type(obj).__name__} is not JSON-serializable")


def _dumps(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(value, default=_json_default, indent=indent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; a no-op where directories cannot be opened (Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(directory: Path, prefix: str) -> Path:
    """Create an empty, uniquely named file in ``directory`` and return its path.

    Unlike ``tempfile.mkstemp`` (always mode 0600) the file gets the usual
    ``0666 & ~umask`` mode, so results are as readable as any file the user creates.
    """
    for _ in range(100):
        path = directory / f"{prefix}{secrets.token_hex(6)}.part"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"cannot create a temporary file in {directory}")


def _replace_with(tmp: Path, path: Path, write: Callable[[Path], object]) -> None:
    """Have ``write`` fill ``tmp`` (a file from :func:`_create_temp` beside ``path``), fsync
    it and ``os.replace`` it onto ``path``: readers see the old file or the new one, never
    a torn one. On any failure ``tmp`` is removed and ``path`` is left as it was.
    """
    try:
        write(tmp)
        with open(tmp, "r+b") as fh:  # writable: Windows' fsync (_commit) needs that
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a
    torn one: write a temporary file in the same directory, fsync it, ``os.replace`` it.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    _replace_with(
        _create_temp(path.parent, f".tmp-{path.name}."), path, lambda tmp: tmp.write_bytes(payload)
    )
    return path


def _as_round(value: Any, what: str) -> int:
    """Validate a round number: a non-negative int (NumPy ints allowed, bools not)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    result = int(value)
    if result < 0:
        raise ValueError(f"{what} must be >= 0, got {result}")
    return result


def _prepare_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Make tensors safe to hand to safetensors, which copies raw memory.

    safetensors reads ``nbytes`` from the data pointer, so a non-contiguous view would
    be written as garbage; we make every array C-contiguous and little-endian (values,
    and therefore bits, are unchanged).
    """
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"checkpoint tensor keys must be non-empty strings, got {key!r}")
        if key.startswith(_RESERVED_PREFIX):
            raise ValueError(f"checkpoint tensor key {key!r} uses reserved prefix")
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(
                f"checkpoint tensor {key!r} has dtype {arr.dtype}; "
                "only bool, integer and floating arrays can be stored"
            )
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
        out[key] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    if not out:
        out[_EMPTY_SENTINEL] = np.zeros((1,), dtype=np.uint8)
    return out


def _csv_cell(value: Any) -> str:
    """One history value as CSV text: None → empty; nested values as JSON."""
    if value is None:
        return ""
    if isinstance(value, dict | list | tuple):
        return _dumps(value)
    return str(value)


class RunStore:
    """Read and write one run directory. Use :meth:`create` or :meth:`open`.

    A single process writes a run; other processes (``fedloom report``) may read it at
    the same time. The instance is safe to share between threads of that process (a
    lock serializes use of the SQLite connection), so engine worker threads may call
    :meth:`record_failure` directly.
    """

    def __init__(self, run_dir: Path, conn: sqlite3.Connection) -> None:
        """Internal: wrap an already-validated connection. Use create() or open()."""
        self._run_dir = Path(run_dir)
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def _connect(db_path: Path, *, must_exist: bool) -> sqlite3.Connection:
        """Open SQLite in autocommit mode; transactions are explicit (see ``_tx``)."""
        uri = db_path.resolve().as_uri() + ("?mode=rw" if must_exist else "")
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 30000")
            # FULL makes each commit reach the disk; at one commit per round the cost is
            # negligible, and it also survives power loss, not only a killed process.
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    @classmethod
    def create(cls, run_dir: Path, config: dict[str, Any], fedloom_version: str) -> RunStore:
        """Start a new run in ``run_dir`` (created if needed) and write ``config.json``.

        Refuses a directory that already holds a run, so a typo in ``--out`` can never
        overwrite someone's results. The database file is claimed with an exclusive
        create, so two processes racing for the same directory cannot both win.
        """
        run_dir = Path(run_dir)
        config_text = _dumps(config, indent=2) + "\n"  # fail on bad config before touching disk
        if run_dir.exists() and not run_dir.is_dir():
            raise RunStoreError(f"{run_dir} is a file, not a directory; choose another --out")
        try:
            (run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunStoreError(
                f"cannot create run directory {run_dir} ({exc.strerror}); choose another --out"
            ) from exc
        db_path = run_dir / DB_FILE
        try:
            os.close(os.open(db_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise RunStoreError(
                f"{run_dir} already holds a fedloom run ({DB_FILE}); choose another --out "
                "directory, or pass --resume to continue that run"
            ) from None
        conn: sqlite3.Connection | None = None
        try:
            conn = cls._connect(db_path, must_exist=True)
            # WAL is kept in the file header; some network file systems refuse it, and
            # then the rollback journal (still durable, just less concurrent) stays on.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [
                    ("fedloom_version", _dumps(fedloom_version)),
                    ("created_at", _dumps(time.time())),
                    ("config", config_text),
                ],
            )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
            atomic_write(run_dir / CONFIG_FILE, config_text)
        except BaseException:
            # Release the claim so that fixing the cause and rerunning works.
            if conn is not None:
                conn.close()
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(OSError):
                    os.unlink(f"{db_path}{suffix}")
            raise
        return cls(run_dir, conn)

    @classmethod
    def open(cls, run_dir: Path) -> RunStore:
        """Open an existing run (for ``--resume`` or ``fedloom report``) without changing it."""
        run_dir = Path(run_dir)
        db_path = run_dir / DB_FILE
        if not run_dir.is_dir():
            raise RunStoreError(f"{run_dir} does not exist; pass the --out directory of a run")
        if not db_path.is_file():
            raise RunStoreError(
                f"{run_dir} is not a fedloom run directory (no {DB_FILE}); "
                "pass the --out directory of a run"
            )
        try:
            conn = cls._connect(db_path, must_exist=True)
        except sqlite3.Error as exc:
            raise RunStoreError(f"cannot open {db_path}: {exc}") from exc
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise RunStoreError(
                f"{db_path} is not a readable fedloom run database ({exc})"
            ) from exc
        if version != SCHEMA_VERSION:
            conn.close()
            if version == 0:
                raise RunStoreError(
                    f"{db_path} is not a fedloom run database (empty or foreign); "
                    "pass the --out directory of a run"
                )
            raise RunStoreError(
                f"{db_path} has schema version {version}, this fedloom reads version "
                f"{SCHEMA_VERSION}; use the fedloom version that wrote the run"
            )
        return cls(run_dir, conn)

    def close(self) -> None:
        """Close the database. Idempotent. Every write is already committed."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def run_dir(self) -> Path:
        """The run directory this store reads and writes."""
        return self._run_dir

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints live (``run_dir/checkpoints``)."""
        return self._run_dir / CHECKPOINTS_DIR

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One committed write transaction, under the thread lock."""
        with self._lock:
            conn = self._require_conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("RunStore is closed")
        return self._conn

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._require_conn().execute(sql, params).fetchall())

    # --------------------------------------------------------------- config, meta

    def config(self) -> dict[str, Any]:
        """The configuration the run was created with.

        Read from SQLite, not ``config.json``: the JSON file is a copy for people, and
        editing it must not silently change what a resumed run believes it ran.
        """
        value = self.get_meta("config")
        if not isinstance(value, dict):
            raise RunStoreError(f"{self._run_dir / DB_FILE} has no stored config")
        return value

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key`` (replacing any previous value)."""
        text = _dumps(value)
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, text))

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The JSON value stored under ``key``, or ``default`` if there is none."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    # ------------------------------------------------------------ rounds, failures

    def record_round(self, record: dict[str, Any]) -> None:
        """Store one round's record, keyed by ``record["round"]``; committed on return.

        Recording a round again replaces it (a resumed run re-executes rounds that were
        recorded but not checkpointed).
        """
        if "round" not in record:
            raise KeyError("round record has no 'round' key")
        rnd = _as_round(record["round"], "record['round']")
        text = _dumps({**record, "round": rnd})
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO rounds(round, record, recorded_at) VALUES (?, ?, ?)",
                (rnd, text, time.time()),
            )

    def history(self) -> list[dict[str, Any]]:
        """All round records, ordered by round."""
        rows = self._query("SELECT record FROM rounds ORDER BY round")
        return [json.loads(text) for (text,) in rows]

    def round_times(self) -> list[tuple[int, float]]:
        """``(round, recorded_at)`` for every recorded round (Unix time), ordered by round.

        What a live view needs for its ETA without parsing every record again.
        """
        return [
            (int(r), float(t))
            for r, t in self._query("SELECT round, recorded_at FROM rounds ORDER BY round")
        ]

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to this run.

        SQLite's ``PRAGMA data_version``: a reader polls it (cheap) and re-reads the run
        only when it changed.
        """
        return int(self._query("PRAGMA data_version")[0][0])

    def record_failure(self, round: int, client_id: int, error: str, traceback: str) -> None:
        """Keep a client's failure (error line and full traceback) for the post-mortem."""
        rnd = _as_round(round, "round")
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO failures(round, client_id, error, traceback, recorded_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (rnd, int(client_id), str(error), str(traceback), time.time()),
            )

    def failures(self, round: int | None = None) -> list[dict[str, Any]]:
        """Client failures, in round then arrival order; only ``round``'s if given.

        Each is ``{"round", "client_id", "error", "traceback", "recorded_at"}``.
        """
        sql = "SELECT round, client_id, error, traceback, recorded_at FROM failures"
        params: tuple[Any, ...] = ()
        if round is not None:
            sql += " WHERE round = ?"
            params = (_as_round(round, "round"),)
        rows = self._query(sql + " ORDER BY round, id", params)
        keys = ("round", "client_id", "error", "traceback", "recorded_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def truncate_after(self, round: int) -> None:
        """Forget rounds after ``round`` (history rows and failures), in one transaction.

        Used on resume: rounds after the last checkpoint are not reflected in the
        restored model state and will be run again.
        """
        rnd = _as_round(round, "round")
        with self._tx() as conn:
            conn.execute("DELETE FROM rounds WHERE round > ?", (rnd,))
            conn.execute("DELETE FROM failures WHERE round > ?", (rnd,))

    # ----------------------------------------------------------------- checkpoints

    def _checkpoint_files(self) -> list[tuple[int, Path]]:
        """Complete checkpoint files on disk, oldest round first."""
        found: list[tuple[int, Path]] = []
        if not self.checkpoint_dir.is_dir():
            return found
        for entry in self.checkpoint_dir.iterdir():
            match = _CKPT_RE.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), entry))
        found.sort()
        return found

    def checkpoint_path(self, round: int) -> Path:
        """Where the checkpoint for ``round`` is (or would be) stored."""
        return self.checkpoint_dir / f"round_{_as_round(round, 'round'):05d}.safetensors"

    def save_checkpoint(self, ckpt: Checkpoint, keep_last: int = 3) -> Path:
        """Write ``ckpt`` atomically, record it as latest, and prune old checkpoints.

        Keeps the ``keep_last`` newest checkpoints up to ``ckpt.round``. Checkpoints for
        rounds *after* ``ckpt.round`` are deleted: they belong to a timeline that a
        resume abandoned (their history rows were truncated), and keeping them would
        make :meth:`latest_checkpoint` return stale state.
        """
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        rnd = _as_round(ckpt.round, "Checkpoint.round")
        tensors = _prepare_tensors(ckpt.tensors)
        metadata = {
            _MD_FORMAT: _CKPT_FORMAT,
            _MD_ROUND: str(rnd),
            _MD_META: _dumps(ckpt.meta),
        }
        ckpt_dir = self.checkpoint_dir
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()
        final = self.checkpoint_path(rnd)

        def write(tmp: Path) -> None:
            mode = tmp.stat().st_mode & 0o777  # safetensors may recreate the file as 0600
            save_file(tensors, tmp, metadata=metadata)
            os.chmod(tmp, mode)

        _replace_with(_create_temp(ckpt_dir, f"{_CKPT_TMP_PREFIX}{rnd:05d}."), final, write)
        self.set_meta("latest_checkpoint_round", rnd)

        files = self._checkpoint_files()
        older = [path for r, path in files if r <= rnd]
        doomed = [path for r, path in files if r > rnd] + older[: max(0, len(older) - keep_last)]
        for path in doomed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return final

    def _remove_stale_temp_files(self) -> None:
        """Delete temp files left by a process killed mid-save (only one writer per run)."""
        for entry in self.checkpoint_dir.glob(f"{_CKPT_TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                entry.unlink()

    @staticmethod
    def load_checkpoint(path: Path) -> Checkpoint:
        """Read one checkpoint file. Raises on a damaged or foreign file."""
        path = Path(path)
        with safe_open(str(path), framework="numpy") as fh:
            metadata: dict[str, str] = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
        if metadata.get(_MD_FORMAT) != _CKPT_FORMAT:
            raise ValueError(f"{path} is not a fedloom checkpoint")
        tensors.pop(_EMPTY_SENTINEL, None)
        for key, arr in tensors.items():
            if not arr.flags.writeable:  # callers update optimizer state in place
                tensors[key] = arr.copy()
        meta = json.loads(metadata.get(_MD_META, "{}"))
        return Checkpoint(round=int(metadata[_MD_ROUND]), tensors=tensors, meta=meta)

    def latest_checkpoint_tensor(self, key: str) -> tuple[int, np.ndarray] | None:
        """``(round, array)`` of one tensor of the newest readable checkpoint holding it.

        Reads only that tensor (safetensors opens lazily), so a live view can show the
        participation counts without loading the model and every client's state.
        """
        for rnd, path in reversed(self._checkpoint_files()):
            try:
                with safe_open(str(path), framework="numpy") as fh:
                    if key in fh.keys():  # noqa: SIM118
                        return rnd, fh.get_tensor(key)
            except (SafetensorError, OSError):
                continue
        return None

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest readable checkpoint, or None if the run has none.

        Scans the files rather than trusting the SQLite pointer (a kill between rename
        and update would otherwise hide the newest one). A damaged newest file is
        skipped with a warning, and the previous one is used; if checkpoints exist but
        none is readable, resuming would silently restart from scratch, so that raises.
        """
        files = self._checkpoint_files()
        for _rnd, path in reversed(files):
            try:
                return self.load_checkpoint(path)
            except (SafetensorError, OSError, ValueError, KeyError) as exc:
                warnings.warn(f"skipping unreadable checkpoint {path}: {exc}", stacklevel=2)
        if files:
            raise RunStoreError(
                f"no readable checkpoint in {self.checkpoint_dir}; "
                "start a new run with another --out"
            )
        return None

    # --------------------------------------------------------------------- exports

    def write_history_csv(self, history: Sequence[Mapping[str, Any]] | None = None) -> Path:
        """Export the history to ``history.csv`` (atomically) and return its path.

        Columns are the union of all record keys in first-seen order with ``round``
        first, so adding a metric never reorders existing columns. ``None`` is an empty
        cell; nested values are JSON. A caller that has just read :meth:`history` passes
        it in, so the rounds are not read and parsed again.
        """
        if history is None:
            history = self.history()
        columns: dict[str, None] = {"round": None}
        for record in history:
            columns.update(dict.fromkeys(record))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(list(columns))
        for record in history:
            writer.writerow([_csv_cell(record.get(col)) for col in columns])
        return atomic_write(self._run_dir / HISTORY_CSV_FILE, buf.getvalue())

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json`` (atomically, indent=2) and return its path."""
        return atomic_write(self._run_dir / SUMMARY_FILE, _dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any] | None:
        """The run's ``summary.json``, or None if the run has not written one (yet)."""
        path = self._run_dir / SUMMARY_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RunStoreError(
                f"{path} is not valid JSON ({exc.msg}); delete it and rerun `fedloom report`"
            ) from exc
        if not isinstance(value, dict):
            raise RunStoreError(f"{path} does not hold a JSON object; delete it")
        return value
