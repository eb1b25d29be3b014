"""The omniscient colluding adversary: ALIE, IPM, min-max and min-sum crafted from the
honest updates of the round, as their papers' strongest threat model assumes.

Baruch et al. 2019 (ALIE, Section 3: the attackers know the mean and standard deviation
of the correct workers' gradients), Xie et al. 2020 (IPM, Section 3: the Byzantine
workers know the correct workers' gradients) and Shejwalkar & Houmansadr 2021 (Section 3,
"full knowledge" of the benign gradients) evaluate an adversary that sees every honest
client's update of the round before sending its own. No client process can see that, so
the adversary here is an *oracle* on the server side of a simulation: an
:class:`~fedloom.server.interceptors.UpdateInterceptor` that receives the round's decoded
updates before the guard rails, the monitors and the aggregator, and replaces the uploads
of the round's malicious clients with the one vector all colluders send. The malicious
clients themselves upload their honest updates (:class:`~fedloom.attacks.poisoning.
MaliciousClient` with ``knowledge = "omniscient"``), which the oracle discards.

References: the deltas of the round's honest clients (those not in
:func:`~fedloom.attacks.poisoning.attack_client_ids`); if a round sampled only malicious
clients, their own honest updates (what the "own" model would have). n and m are the
round's actual numbers of updates and of malicious updates (ALIE's z_max). The crafting
itself is :func:`~fedloom.attacks.poisoning.craft_colluding`, shared with the "own" model.

It cannot hold where the server holds no clear update (secure aggregation: refused by the
strategy for any interceptor that reads rows) nor outside a simulation (a deployed
red-team client cannot see the others' uploads): :mod:`fedloom.strategies` refuses both
with one line, and the crafted vector skips the uplink codecs, so central DP's clipping
and compression are refused with it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from fedloom.algorithms.base import StageContext
from fedloom.attacks.poisoning import COLLUDING_KINDS, attack_client_ids, craft_colluding
from fedloom.config import AttackConfig
from fedloom.messages import DELTA, FitResult
from fedloom.registry import UPDATE_INTERCEPTORS

#: Round-record fields the oracle writes.
CRAFTED = "attack_crafted"
REFERENCES = "attack_references"


class OmniscientAdversary:
    """Replace the malicious clients' uploads with one crafted from the honest ones."""

    name = "omniscient"
    needs_individual_updates = True

    def __init__(self, attack: AttackConfig, *, malicious: list[int]) -> None:
        if attack.kind not in COLLUDING_KINDS:
            raise ValueError(
                f"the omniscient adversary crafts {', '.join(sorted(COLLUDING_KINDS))}, "
                f"not '{attack.kind}'"
            )
        self.attack = attack
        self.malicious = frozenset(malicious)

    def intercept(
        self, rnd: int, updates: list[FitResult], *, global_weights: np.ndarray
    ) -> tuple[list[FitResult], dict[str, Any]]:
        clear = [u for u in updates if not u.held and DELTA in u.vectors]
        bad = [u for u in clear if u.client_id in self.malicious]
        if not bad:
            return updates, {CRAFTED: [], REFERENCES: 0}
        honest = [u for u in clear if u.client_id not in self.malicious]
        refs = np.stack([u.vectors[DELTA] for u in (honest or bad)]).astype(np.float32)
        forged, chosen = craft_colluding(self.attack, refs, n=len(clear), m=len(bad))
        crafted = {u.client_id for u in bad}
        out = [
            replace(u, vectors={**u.vectors, DELTA: forged.copy()})
            if u.client_id in crafted and not u.held
            else u
            for u in updates
        ]
        fields: dict[str, Any] = {
            CRAFTED: sorted(crafted),
            REFERENCES: len(refs),
        }
        fields.update({f"attack_{k}": float(v) for k, v in chosen.items()})
        return out, fields

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        pass


@UPDATE_INTERCEPTORS.register("omniscient")
def make_omniscient(attack: AttackConfig, context: StageContext) -> OmniscientAdversary:
    malicious = attack_client_ids(attack, num_clients=context.num_clients, seed=context.seed)
    return OmniscientAdversary(attack, malicious=malicious)
