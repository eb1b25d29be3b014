"""The numbers people judge a federated run by, derived from its round history.

This module is the one place those numbers are computed: the server writes them into
``summary.json`` through :func:`run_metrics`, and ``fedloom report`` derives the same
ones for an unfinished run through :func:`history_metrics`, so the two cannot disagree.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard


def is_number(value: Any) -> TypeGuard[int | float]:
    """A real number (bools excluded: a True in a metric column is a bug, not 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def rounds_to_target(history: Sequence[Mapping[str, Any]], target: float | None) -> int | None:
    """First round whose centralized test accuracy reached ``target`` (None if never)."""
    if target is None:
        return None
    for rec in history:
        acc = rec.get("accuracy")
        if acc is not None and acc >= target:
            return int(rec["round"])
    return None


def sim_time_to_target(history: Sequence[Mapping[str, Any]], target: float | None) -> float | None:
    """Simulated seconds (``sim_time_s``) at the round that first reached ``target``.

    None without a target, if it was never reached, or if the run had no virtual clock.
    """
    reached = rounds_to_target(history, target)
    if reached is None:
        return None
    rec = next(r for r in history if int(r["round"]) == reached)
    value = rec.get("sim_time_s")
    return float(value) if is_number(value) else None


def last_evaluation(history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The last round with a centralized evaluation (evaluation may skip rounds)."""
    return next((r for r in reversed(history) if is_number(r.get("accuracy"))), None)


def history_total(history: Sequence[Mapping[str, Any]], key: str) -> int:
    """Sum of a per-round counter; rounds where it is absent or not a number add 0."""
    return sum(int(v) for r in history if is_number(v := r.get(key)))


#: Per-client accuracy spread (``fedloom.server.client_quality``), from the last round
#: that recorded it.
CLIENT_QUALITY_KEYS = ("client_accuracy_mean", "client_accuracy_worst10", "client_accuracy_std")


def last_client_quality(history: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Mean, worst-10 % and spread of per-client accuracy in the last round that had them."""
    last = next((r for r in reversed(history) if is_number(r.get(CLIENT_QUALITY_KEYS[0]))), None)
    return {
        k: (float(last[k]) if last and is_number(last.get(k)) else None)
        for k in CLIENT_QUALITY_KEYS
    }


def contribution_totals(history: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Each client's contribution scores summed over the rounds (None: none recorded),
    highest first."""
    totals: dict[str, float] = {}
    for rec in history:
        scores = rec.get("contribution")
        if isinstance(scores, Mapping):
            for client, score in scores.items():
                if is_number(score):
                    totals[str(client)] = totals.get(str(client), 0.0) + float(score)
    if not totals:
        return None
    return dict(
        sorted(totals.items(), key=lambda kv: (-kv[1], int(kv[0]) if kv[0].isdigit() else 0))
    )


def history_metrics(
    history: Sequence[Mapping[str, Any]],
    target_accuracy: float | None,
    centralized_accuracy: float | None,
) -> dict[str, Any]:
    """Every summary metric the round history alone determines (all but participation)."""
    sampled = history_total(history, "clients_sampled")
    succeeded = history_total(history, "clients_succeeded")
    last = last_evaluation(history)
    gap = None
    if centralized_accuracy is not None and last is not None:
        gap = float(centralized_accuracy) - float(last["accuracy"])
    return {
        "target_accuracy": target_accuracy,
        "rounds_to_target": rounds_to_target(history, target_accuracy),
        "sim_time_to_target_s": sim_time_to_target(history, target_accuracy),
        # Share of sampled client-rounds that returned a usable update.
        "success_rate": succeeded / sampled if sampled else 0.0,
        "clients_sampled_total": sampled,
        "clients_succeeded_total": succeeded,
        # A round's bytes_up/bytes_down already hold any secure-aggregation traffic
        # (its secagg_bytes_* are the breakdown, not extra): add nothing more here.
        "bytes_up_total": history_total(history, "bytes_up"),
        "bytes_down_total": history_total(history, "bytes_down"),
        "centralized_accuracy": centralized_accuracy,
        "accuracy_gap": gap,
        **last_client_quality(history),
        "contribution_total": contribution_totals(history),
    }


def run_metrics(
    history: list[dict[str, Any]],
    num_clients: int,
    target_accuracy: float | None,
    centralized_accuracy: float | None,
    contributors: set[int],
) -> dict[str, Any]:
    """Summary metrics: rounds to target, participation, traffic, gap to centralized.

    :func:`history_metrics` plus what needs the server's participation counts.
    """
    metrics = history_metrics(history, target_accuracy, centralized_accuracy)
    return {
        "target_accuracy": metrics.pop("target_accuracy"),
        "rounds_to_target": metrics.pop("rounds_to_target"),
        # Share of all clients whose update was aggregated at least once.
        "participation_rate": len(contributors) / num_clients if num_clients else 0.0,
        **metrics,
    }
