"""The numbers people judge a federated run by, derived from its round history."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def rounds_to_target(history: Sequence[Mapping[str, Any]], target: float | None) -> int | None:
    """First round whose centralized test accuracy reached ``target`` (None if never)."""
    if target is None:
        return None
    for rec in history:
        acc = rec.get("accuracy")
        if acc is not None and acc >= target:
            return int(rec["round"])
    return None


def run_metrics(
    history: list[dict[str, Any]],
    num_clients: int,
    target_accuracy: float | None,
    centralized_accuracy: float | None,
    contributors: set[int],
) -> dict[str, Any]:
    """Summary metrics: rounds to target, participation, traffic, gap to centralized."""
    sampled = sum(int(r.get("clients_sampled", 0)) for r in history)
    succeeded = sum(int(r.get("clients_succeeded", 0)) for r in history)
    final_acc = next(
        (r["accuracy"] for r in reversed(history) if r.get("accuracy") is not None), None
    )
    gap = None
    if centralized_accuracy is not None and final_acc is not None:
        gap = float(centralized_accuracy) - float(final_acc)
    return {
        "target_accuracy": target_accuracy,
        "rounds_to_target": rounds_to_target(history, target_accuracy),
        # Share of all clients whose update was aggregated at least once.
        "participation_rate": len(contributors) / num_clients if num_clients else 0.0,
        # Share of sampled client-rounds that returned a usable update.
        "success_rate": succeeded / sampled if sampled else 0.0,
        "clients_sampled_total": sampled,
        "clients_succeeded_total": succeeded,
        "bytes_up_total": sum(int(r.get("bytes_up", 0)) for r in history),
        "bytes_down_total": sum(int(r.get("bytes_down", 0)) for r in history),
        "centralized_accuracy": centralized_accuracy,
        "accuracy_gap": gap,
    }
