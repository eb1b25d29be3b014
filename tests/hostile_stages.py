"""A hostile client, for the guard-rail tests: the attack of issue 9 (a 3e38 update that
claims 10^15 examples), as a registered client algorithm and as a patch of a real
``fedloom client`` process.

* In a simulation, ``client.algorithm = "hostile-sgd"`` trains like ``sgd`` except for the
  clients in ``client.options.hostile`` (default ``[0]``), which return the attack.
* ``fedloom client --import tests.hostile_stages ...`` makes every update this process
  sends hostile (the server's config names plain ``sgd``): an authenticated client that
  is malicious, over the real wire.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedloom.algorithms.base import AlgorithmSettings, ClientContext, ClientUpdate, StageContext
from fedloom.client.runtime import ClientRuntime
from fedloom.messages import DELTA, Broadcast, FitResult, FitTask
from fedloom.registry import CLIENT_ALGORITHMS

#: The attack's values: finite in float32 (max 3.4e38), and far beyond any honest count.
HUGE = 3e38
CLAIMED = 10**15
#: Set by the environment of a hostile process: "count" claims 10^15 examples with an
#: honest update; anything else (the default) also uploads the 3e38 vector.
MODE_ENV = "FEDLOOM_HOSTILE_MODE"


class HostileSGD:
    """``sgd`` for honest clients; the attack for the hostile ones."""

    def __init__(self, inner: Any, hostile: set[int], mode: str) -> None:
        self.inner = inner
        self.hostile = hostile
        self.mode = mode

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        update = self.inner.fit(ctx)
        if ctx.client_id not in self.hostile:
            return update
        vectors = dict(update.vectors)
        if self.mode != "count":
            vectors[DELTA] = np.full_like(vectors[DELTA], HUGE)
        return ClientUpdate(vectors=vectors, metrics=update.metrics, num_examples=CLAIMED)

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        return dict(self.inner.evaluate(ctx))


if "hostile-sgd" not in CLIENT_ALGORITHMS:

    @CLIENT_ALGORITHMS.register("hostile-sgd")
    def make_hostile(settings: AlgorithmSettings, context: StageContext) -> HostileSGD:
        inner = CLIENT_ALGORITHMS.create("sgd", settings, context)
        hostile = {int(c) for c in settings.options.get("hostile", [0])}
        return HostileSGD(inner, hostile, str(settings.options.get("mode", "vector")))


def _patch_this_process() -> None:
    """Every fit result this process sends becomes the attack (a deployed client)."""
    import os

    mode = os.environ.get(MODE_ENV, "vector")
    original = ClientRuntime.fit

    def hostile_fit(self: ClientRuntime, task: FitTask, broadcast: Broadcast, state: Any) -> Any:
        result: FitResult = original(self, task, broadcast, state)
        if mode != "count" and result.vectors:
            result.vectors = {**result.vectors, DELTA: np.full_like(result.vectors[DELTA], HUGE)}
        result.num_examples = CLAIMED
        return result

    ClientRuntime.fit = hostile_fit  # type: ignore[method-assign]


def patch_if_deployed() -> None:
    import sys

    if "client" in sys.argv[1:2]:
        _patch_this_process()


patch_if_deployed()
