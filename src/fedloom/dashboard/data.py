"""What the dashboard shows of a run: a JSON-able snapshot read through its RunStore.

The snapshot is built from what a run already records (round records, failures, meta,
the latest checkpoint's participation counts) plus, in a deployment, the session
registry's status copy; nothing here writes to a run or reaches the round loop. It
carries metrics and statuses only: never a client's update, model or data.

Which curves appear is decided by the record keys, not by a list of features: every
numeric key containing ``accuracy`` is an accuracy curve, every key ending in ``loss`` a
loss curve, so a stage or callback that adds such a key (federated, personalized,
backdoor, worst-10 % accuracy) is drawn without a change here. Dict-valued per-client
keys (``client_accuracies``, ``contribution``) become a distribution and a ranking.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedloom.store import DB_FILE, RunStore, RunStoreError

__all__ = ["LiveStatus", "RunView", "sanitize"]

#: A deployment's live client statuses: one dict per client (``client_id``, ``state``,
#: ``detail``, ``name``, ``tasks_done``, ...), from ``Registry.status_snapshot``.
LiveStatus = Callable[[], Sequence[Mapping[str, Any]]]

_ACCURACY = re.compile(r"accuracy")
_LOSS = re.compile(r"loss$")
#: Other per-round numbers the page draws (privacy and traffic).
_OTHER_SERIES = ("epsilon", "local_epsilon", "bytes_up", "bytes_down")
#: Record keys of per-client events (robust aggregation, anomaly detection).
_EXCLUDED = "excluded_clients"
_FLAGGED = "flagged_clients"
MAX_CLIENT_ROWS = 300
MAX_FAILURES = 50
MAX_EVENTS = 100
TRACEBACK_CHARS = 8000
#: States in the order the client table lists them (the ones needing attention first).
STATE_ORDER = (
    "dropped",
    "rejected",
    "failed",
    "straggling",
    "training",
    "connected",
    "participated",
    "idle",
)


def sanitize(value: Any) -> Any:
    """JSON for a browser: NaN and infinities (which ``JSON.parse`` rejects) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize(v) for v in value]
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class RunView:
    """One run directory, read by the dashboard (opened when it first has a database).

    ``live`` is a deployment's client-status source; without it clients are described
    from the records alone. The store is re-read only when SQLite says another
    connection committed (``RunStore.data_version``), so an idle page costs one cheap
    query per poll.
    """

    def __init__(self, run_dir: Path, *, key: str, live: LiveStatus | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.key = key
        self.live = live
        self._store: RunStore | None = None
        self._version: int | None = None
        self._cached: dict[str, Any] | None = None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _open(self) -> RunStore | None:
        if self._store is None and (self.run_dir / DB_FILE).is_file():
            try:
                self._store = RunStore.open(self.run_dir)
            except RunStoreError:
                return None  # created this instant (no schema yet): next poll
        return self._store

    def snapshot(self) -> dict[str, Any]:
        """The run as the page shows it (JSON-able, NaN-free)."""
        statuses = list(self.live()) if self.live is not None else []
        store = self._open()
        if store is None:
            return {
                "key": self.key,
                "name": self.run_dir.name,
                "path": str(self.run_dir),
                "state": "waiting",
                "round": 0,
                "clients": sanitize(self._clients(statuses, {}, None)),
            }
        version = store.data_version()
        if self._cached is None or version != self._version:
            self._cached = self._read(store)
            self._version = version
        cached = self._cached
        snap = {k: v for k, v in cached.items() if not k.startswith("_")}
        if cached["state"] == "running":
            snap.update(_timing(cached["_times"], cached["rounds"], cached["round"]))
        base = cached["_clients_base"]
        snap["clients"] = sanitize(self._clients(statuses, base, base["num_clients"]))
        return snap

    # ------------------------------------------------------------------ reading

    def _read(self, store: RunStore) -> dict[str, Any]:
        history = store.history()
        config = store.config()
        summary = store.read_summary()
        times = store.round_times()
        failures = store.failures()
        participation = store.latest_checkpoint_tensor("participation")
        last = history[-1] if history else {}
        rnd = int(last.get("round", 0))
        if summary is not None:
            state = str(summary.get("outcome", "finished"))
        elif store.get_meta("stopped_reason"):
            state = "stopped"
        else:
            state = "running"
        metrics = (summary or {}).get("metrics", {}) if summary else {}
        baseline = _number(metrics.get("centralized_accuracy"))
        if baseline is None:
            baseline = _number(store.get_meta("centralized_accuracy"))
        privacy = config.get("privacy", {}) if isinstance(config.get("privacy"), dict) else {}
        budget = None
        if privacy.get("mechanism") == "central":
            budget = _number(privacy.get("max_epsilon")) or _number(privacy.get("target_epsilon"))
        rounds_x = [int(r["round"]) for r in history]
        out: dict[str, Any] = {
            "key": self.key,
            "name": self.run_dir.name,
            "path": str(self.run_dir),
            "state": state,
            "stopped_reason": store.get_meta("stopped_reason"),
            "round": rnd,
            "rounds": int(config.get("rounds", rnd) or rnd),
            "mode": config.get("mode", "sync"),
            "strategy": config.get("strategy"),
            "target": _number(config.get("target_accuracy")),
            "baseline": baseline,
            "epsilon_budget": budget,
            "delta": _number(privacy.get("delta")) if budget is not None else None,
            "rounds_x": rounds_x,
            "series": _series(history),
            "events": _events(history),
            "failures": [
                {**f, "traceback": f["traceback"][-TRACEBACK_CHARS:]}
                for f in failures[-MAX_FAILURES:]
            ],
            "failures_total": len(failures),
            "client_accuracies": _latest_dict(history, "client_accuracies"),
            "contribution": _contribution(history),
        }
        out = sanitize(out)
        out["_times"] = times
        participants: dict[int, int] = {}
        participation_round = None
        if participation is not None:
            participation_round, counts = participation
            participants = {int(i): int(c) for i, c in enumerate(counts.tolist())}
        num_clients = config.get("data", {}).get("num_clients") if config.get("data") else None
        out["_clients_base"] = {
            "num_clients": int(num_clients) if isinstance(num_clients, int) else None,
            "participation": participants,
            "participation_round": participation_round,
            "last": {k: last.get(k) for k in (_EXCLUDED, _FLAGGED)},
            "flag_counts": _counts(history, _FLAGGED),
            "exclusion_counts": _counts(history, _EXCLUDED),
            "failed": {int(f["client_id"]): f["error"] for f in failures if f["round"] == rnd},
            "accuracy": {
                int(c): v for c, v in (out["client_accuracies"] or {}).get("values", {}).items()
            },
        }
        return out

    # ------------------------------------------------------------------ clients

    def _clients(
        self,
        statuses: Sequence[Mapping[str, Any]],
        base: Mapping[str, Any],
        num_clients: int | None,
    ) -> dict[str, Any]:
        participation: Mapping[int, int] = base.get("participation", {})
        last = base.get("last", {})
        flagged_now = {int(c) for c in last.get(_FLAGGED) or []}
        excluded_now = {int(c) for c in last.get(_EXCLUDED) or []}
        flag_counts: Mapping[int, int] = base.get("flag_counts", {})
        exclusion_counts: Mapping[int, int] = base.get("exclusion_counts", {})
        failed: Mapping[int, str] = base.get("failed", {})
        accuracy = base.get("accuracy", {})
        live = {int(s["client_id"]): s for s in statuses}
        ids = set(live) | set(failed) | flagged_now | excluded_now
        ids |= {c for c, n in participation.items() if n > 0}
        total = max(num_clients or 0, len(participation), len(live))
        counts: dict[str, int] = {}
        rows: list[dict[str, Any]] = []
        for cid in sorted(ids):
            status = live.get(cid)
            if status is not None:
                state, detail = str(status["state"]), str(status.get("detail", ""))
            elif cid in failed:
                state, detail = "failed", failed[cid]
            else:
                state = "participated" if participation.get(cid, 0) > 0 else "idle"
                detail = ""
            if status is not None and cid in failed and state in ("connected", "training"):
                state, detail = "failed", failed[cid]
            flags = [
                name
                for name, on in (("flagged", cid in flagged_now), ("excluded", cid in excluded_now))
                if on
            ]
            counts[state] = counts.get(state, 0) + 1
            for name in flags:
                counts[name] = counts.get(name, 0) + 1
            row: dict[str, Any] = {
                "id": cid,
                "state": state,
                "detail": detail[:300],
                "flags": flags,
                "participation": participation.get(cid),
                "flagged_rounds": flag_counts.get(cid, 0),
                "excluded_rounds": exclusion_counts.get(cid, 0),
                "accuracy": accuracy.get(cid),
            }
            if status is not None:
                row["name"] = str(status.get("name", ""))
                row["tasks_done"] = status.get("tasks_done")
                row["deadlines_missed"] = status.get("deadlines_missed")
                row["rejected"] = status.get("rejected")
            rows.append(row)
        order = {s: i for i, s in enumerate(STATE_ORDER)}
        rows.sort(key=lambda r: (order.get(r["state"], len(order)), not r["flags"], r["id"]))
        never = max(0, total - len(rows))
        if never and not live:
            counts["idle"] = counts.get("idle", 0) + never
        return {
            "total": total,
            "live": self.live is not None,
            "counts": counts,
            "rows": rows[:MAX_CLIENT_ROWS],
            "hidden": max(0, len(rows) - MAX_CLIENT_ROWS),
            "participation_round": base.get("participation_round"),
        }


def _timing(times: Sequence[tuple[int, float]], rounds: int, rnd: int) -> dict[str, Any]:
    """A running run's pace: seconds per round over the last ten, ETA, time since the last
    record (from the store's commit times, so a page opened late still has an ETA)."""
    if not times:
        return {}
    recent = times[-11:]
    per_round = (recent[-1][1] - recent[0][1]) / (len(recent) - 1) if len(recent) > 1 else None
    left = max(0, rounds - rnd)
    return {
        "since_last_s": round(time.time() - times[-1][1], 1),
        "round_s": round(per_round, 2) if per_round is not None else None,
        "eta_s": round(per_round * left, 1) if per_round is not None else None,
    }


def _series(history: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
    """Per-round numbers by record key: accuracy-like, loss-like, privacy and traffic."""
    keys: dict[str, None] = {}
    for record in history:
        for key, value in record.items():
            if key == "round" or _number(value) is None:
                continue
            if _ACCURACY.search(key) or _LOSS.search(key) or key in _OTHER_SERIES:
                keys[key] = None
    return {key: [_number(r.get(key)) for r in history] for key in keys}


def _events(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rounds in which robust aggregation excluded or anomaly detection flagged clients,
    or which were discarded (newest last)."""
    out: list[dict[str, Any]] = []
    for record in history:
        excluded = record.get(_EXCLUDED) or []
        flagged = record.get(_FLAGGED) or []
        discarded = record.get("discarded")
        if excluded or flagged or discarded:
            out.append(
                {
                    "round": record["round"],
                    "excluded": list(excluded),
                    "flagged": list(flagged),
                    "discarded": discarded if isinstance(discarded, str) else None,
                }
            )
    return out[-MAX_EVENTS:]


def _counts(history: Sequence[Mapping[str, Any]], key: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for record in history:
        for cid in record.get(key) or []:
            counts[int(cid)] = counts.get(int(cid), 0) + 1
    return counts


def _latest_dict(history: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any] | None:
    """The newest round's ``{client id: number}`` under ``key``, with its round."""
    for record in reversed(history):
        value = record.get(key)
        if isinstance(value, dict) and value:
            numbers = {str(c): _number(v) for c, v in value.items()}
            return {
                "round": record["round"],
                "values": {c: v for c, v in numbers.items() if v is not None},
            }
    return None


def _contribution(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Each client's contribution estimate summed over the rounds that recorded one."""
    total: dict[str, float] = {}
    rounds = 0
    for record in history:
        value = record.get("contribution")
        if not isinstance(value, dict):
            continue
        rounds += 1
        for cid, score in value.items():
            number = _number(score)
            if number is not None:
                total[str(cid)] = total.get(str(cid), 0.0) + number
    if not rounds:
        return None
    return {"rounds": rounds, "total": total}
