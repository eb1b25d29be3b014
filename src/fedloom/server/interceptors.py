"""Update interceptors: stages that may rewrite the round's decoded updates before the
guard rails and the aggregator see them.

A simulation sometimes needs a party that sees more than any client process can: the
omniscient colluding attacker of Baruch et al. 2019, Xie et al. 2020 and Shejwalkar &
Houmansadr 2021 crafts the malicious clients' updates from the honest updates of the
same round. Such an adversary has no place on a client (it cannot see the others'
uploads), so it is a server-side stage over the round's decoded updates, in front of
everything that screens or aggregates them: the guard rails, the monitors and the
aggregator judge what the adversary sent exactly as they would judge a real upload.

:class:`~fedloom.server.strategy.Strategy` applies its interceptors in order inside
``process_fit``; the round loop does not know they exist. Interceptors are built by
:mod:`fedloom.strategies` from :data:`fedloom.registry.UPDATE_INTERCEPTORS`, and one
that reads updates is refused with secure aggregation (the server holds no clear update
to give it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from fedloom.messages import FitResult


class UpdateInterceptor(Protocol):
    """Rewrite a round's decoded updates (sorted by client id) before screening."""

    #: Its prefix in checkpoints (``icpt/<name>/…``) and in logs.
    name: str
    #: True when it reads the clear updates (refused with secure aggregation).
    needs_individual_updates: bool

    def intercept(
        self, rnd: int, updates: list[FitResult], *, global_weights: np.ndarray
    ) -> tuple[list[FitResult], dict[str, Any]]:
        """The updates to screen and aggregate instead, and fields for the round record."""
        ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: Mapping[str, Any]) -> None: ...
