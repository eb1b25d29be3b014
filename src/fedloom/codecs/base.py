"""Update codecs: a chain that encodes a client's update before it leaves the client and
decodes (or checks) it on the server, in reverse order.

Central DP's clipping is the first codec; compression and error feedback are next.
A codec object holds both halves and each side uses its own: ``encode`` runs on the
client (its per-client state, such as an error-feedback residual, lives in the client's
:class:`~fedloom.client_store.ClientState`), ``task_config`` and ``decode`` on the server.
(The shape is pfl-research's postprocessor chain.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from fedloom.client_store import ClientState
from fedloom.messages import FitResult, Scalar


class RejectedUpdateError(Exception):
    """The server refuses an update (the message is the one-line reason it records)."""


class UpdateCodec(Protocol):
    name: str

    def encode(
        self,
        vectors: dict[str, np.ndarray],
        metrics: dict[str, float],
        *,
        config: Mapping[str, Scalar],
        state: ClientState,
    ) -> dict[str, np.ndarray]:
        """Client side: the vectors as they leave the client (metrics may be added)."""
        ...

    def task_config(self, rnd: int) -> dict[str, Scalar]:
        """Server side: what clients need to encode this round (e.g. the clipping norm)."""
        ...

    def decode(self, result: FitResult) -> FitResult:
        """Server side: the result as the aggregator should see it; raises
        :class:`RejectedUpdateError` for one that must not be aggregated."""
        ...
