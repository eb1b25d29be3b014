"""Update codecs: a chain that encodes a client's update before it leaves the client and
decodes (or checks) it on the server, in reverse order; and broadcast codecs, the same
for the model the server sends down.

Central DP's clipping is the first update codec; compression (sparsification,
quantization, signs, with error feedback) is the next. A codec object holds both halves
and each side uses its own: ``encode`` runs on the client (its per-client state, such as
an error-feedback residual, lives in the client's
:class:`~fedloom.client_store.ClientState`), ``task_config`` and ``decode`` on the server.
(The shape is pfl-research's postprocessor chain.)

An encoded update is still a set of *named arrays*, but of any compact dtype (int32
indices, packed uint8 codes, float16), so every engine and the gRPC wire move it as it
is and the bytes a round records are the bytes really encoded. ``encoded_layout`` tells
the transport, before any client answers, exactly what a well-formed upload looks like.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from fedloom.client_store import ClientState
from fedloom.messages import FitResult, Scalar

#: name → (number of elements, NumPy dtype name): what a well-formed upload carries.
Layout = dict[str, tuple[int, str]]


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
        client_id: int,
        round: int,
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

    def encoded_layout(self, layout: Layout) -> Layout:
        """The layout of what ``encode`` returns, given the layout it receives."""
        ...

    def decode_sum(self, vectors: dict[str, np.ndarray], *, rnd: int) -> dict[str, np.ndarray]:
        """Server side under secure aggregation: decode the *sum* of encoded uploads.

        Only a codec that is linear in the update and identical for every client can
        do this (random-k with a shared index set); the strategy refuses the others
        with secure aggregation before training.
        """
        ...


class BroadcastCodec(Protocol):
    """Downlink compression: the server encodes the round's broadcast once, every client
    decodes it before training. The server keeps its full-precision model."""

    name: str

    def encode(self, broadcast: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def decode(self, broadcast: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def float_layout(sizes: Mapping[str, int]) -> Layout:
    """The layout of plain float32 uploads of the given sizes."""
    return {name: (int(size), "float32") for name, size in sizes.items()}
