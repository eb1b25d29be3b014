"""What an attacked run measures besides clean accuracy, as stage callbacks.

* :class:`AttackRecord` stores the truth once per run (``attack`` in the run store's
  metadata and in ``summary.json``: kind, fraction, ``malicious_clients``).
* :class:`BackdoorAccuracy` adds ``backdoor_accuracy`` to every evaluated round: the
  share of triggered test inputs whose true label is not the target that the global model
  classifies as the target (the attack success rate of Bagdasaryan et al. 2020, §5).
* :class:`FlaggedPrecisionRecall` scores a detector: when a round record carries
  ``flagged_clients`` (an anomaly stage's verdict), it adds ``flagged_precision`` and
  ``flagged_recall`` against the malicious clients that took part in the round.

:func:`attack_callbacks` is what the strategy builder registers for an ``[attack]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fedloom.attacks.poisoning import COLLUDING_KINDS, attack_client_ids, triggered_test_set
from fedloom.callbacks import Callback, RunContext
from fedloom.config import AttackConfig
from fedloom.server.callbacks import ServerTestBench


class AttackRecord(Callback):
    """Writes the attack and its malicious clients into the run store's metadata."""

    def __init__(self, attack: AttackConfig, malicious: list[int]) -> None:
        self.attack = attack
        self.malicious = list(malicious)

    def on_run_start(self, run: RunContext) -> None:
        if run.store is not None:
            meta: dict[str, Any] = {
                "kind": self.attack.kind,
                "fraction": self.attack.fraction,
                "malicious_clients": self.malicious,
            }
            if self.attack.kind in COLLUDING_KINDS:  # what its crafting saw
                meta["knowledge"] = self.attack.knowledge
            run.store.set_meta("attack", meta)


class BackdoorAccuracy(Callback):
    """``backdoor_accuracy`` in every round that was evaluated centrally."""

    def __init__(self, attack: AttackConfig, bench: ServerTestBench) -> None:
        self.bench = bench
        self.triggered = triggered_test_set(bench.test_set, attack)

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        if "accuracy" not in record or len(self.triggered) == 0:
            return
        server = run.server
        model = server.strategy.algorithm.global_for_evaluation(server.state.weights)
        record["backdoor_accuracy"] = self.bench.evaluate(model, self.triggered)["accuracy"]


def precision_recall(
    flagged: Iterable[int], malicious: Iterable[int]
) -> tuple[float | None, float | None]:
    """(precision, recall) of ``flagged`` against ``malicious``; None where undefined
    (nothing flagged; no malicious client present)."""
    f, m = set(flagged), set(malicious)
    hits = len(f & m)
    return (hits / len(f) if f else None, hits / len(m) if m else None)


class FlaggedPrecisionRecall(Callback):
    """Precision and recall of a round's ``flagged_clients`` against the true attackers.

    The attackers counted are those among the round's participants (the clients whose
    results reached the server), since a detector can flag only what it saw.
    """

    def __init__(self, malicious: list[int]) -> None:
        self.malicious = frozenset(malicious)

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        flagged = record.get("flagged_clients")
        if flagged is None:
            return
        present = {getattr(r, "client_id", None) for r in run.fit_results}
        truth = self.malicious & present if run.fit_results else self.malicious
        precision, recall = precision_recall((int(c) for c in flagged), truth)
        record["flagged_precision"] = precision
        record["flagged_recall"] = recall


def attack_callbacks(
    attack: AttackConfig, *, num_clients: int, seed: int, bench: ServerTestBench | None
) -> list[Callback]:
    """The callbacks an attacked run records with (none without an attack)."""
    if attack.kind == "none":
        return []
    malicious = attack_client_ids(attack, num_clients=num_clients, seed=seed)
    callbacks: list[Callback] = [AttackRecord(attack, malicious)]
    if attack.kind == "backdoor" and bench is not None and len(bench.test_set):
        callbacks.append(BackdoorAccuracy(attack, bench))
    callbacks.append(FlaggedPrecisionRecall(malicious))
    return callbacks
