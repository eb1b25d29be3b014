"""FLTrust: trust bootstrapped from a small clean root data set held by the server.

Cao, Fang, Liu and Gong 2021, "FLTrust: Byzantine-robust federated learning via trust
bootstrapping" (NDSS), Algorithm 1 and Eqs. (2)–(4). Each round the server trains the
current global model on its own root data set, exactly as a client trains (same epochs,
steps, batch size and optimizer), and takes that update g_0 as the reference:

* trust score TS_i = ReLU(cos(g_i, g_0))                                  (Eq. 2)
* normalised update ḡ_i = (‖g_0‖ / ‖g_i‖) · g_i                            (Eq. 3)
* aggregate g = Σ_i TS_i ḡ_i / Σ_j TS_j                                    (Eq. 4)

so an update pointing away from the server's own gets no weight, and no update, however
large, moves the model further than the server's own update would: ‖g‖ ≤ ‖g_0‖. When
every trust score is 0 the aggregate is 0 (the model does not move). Example counts are
ignored, as in the paper.

The root data set (option ``root_size``, default 100 examples as in the paper's MNIST
setting) is a seeded uniform draw from the server's own examples, the held-out test set
(:class:`fedloom.data.server.ServerData`), never from a client's data; the drawn examples
leave the central evaluation set, so the reported accuracy is on examples FLTrust never
trained on. The paper draws the root set from the training distribution; the test set is
that distribution's only sample the server holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.base import StageContext
from fedloom.client.learner import Learner, SGDSettings, WorkPlan, WorkSettings
from fedloom.config import ConfigError
from fedloom.data.base import ArrayDataset
from fedloom.registry import AGGREGATORS
from fedloom.seeding import SERVER_TRAIN, torch_generator
from fedloom.server.aggregators import AggregationInput
from fedloom.server.robust_coordinate import check_option_keys, int_option, rows_of

#: The paper's root data set size for its image tasks (Cao et al. 2021, Section 5.1).
DEFAULT_ROOT_SIZE = 100


def fltrust_combine(
    rows: np.ndarray, server_update: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eqs. (2)–(4): the aggregate, each row's trust score and each row's rescaling factor.

    A zero update (or a zero server update) has no direction: its trust score is 0.
    """
    rows = np.asarray(rows, dtype=np.float64)
    g0 = np.asarray(server_update, dtype=np.float64)
    norm0 = float(np.linalg.norm(g0))
    norms = np.linalg.norm(rows, axis=1)
    safe = np.where(norms > 0.0, norms, 1.0)
    cos = (rows @ g0) / (safe * norm0) if norm0 > 0.0 else np.zeros(len(rows))
    trust = np.where(norms > 0.0, np.maximum(cos, 0.0), 0.0)
    scale = np.where(norms > 0.0, norm0 / safe, 0.0)
    total = float(trust.sum())
    if total <= 0.0:
        return np.zeros(rows.shape[1]), trust, scale
    aggregate = ((trust * scale) @ rows) / total
    return aggregate, trust, scale


class FLTrust:
    """FLTrust (Cao et al. 2021, Algorithm 1); see the module docstring for the equations.

    ``excluded_clients`` are the clients whose trust score is 0; ``trust_scores`` maps
    every contributor's id to its score and ``fltrust_server_norm`` is ‖g_0‖.
    """

    needs_individual_updates = True
    aggregates_every_round = False

    def __init__(
        self,
        *,
        root: ArrayDataset,
        learner_factory: Callable[[], Learner],
        work: WorkSettings,
        sgd: SGDSettings,
        seed: int,
    ) -> None:
        self.root = root
        self.learner_factory = learner_factory
        self.work = work
        self.sgd = sgd
        self.seed = seed
        self._learner: Learner | None = None

    def server_update(self, rnd: int, weights: np.ndarray) -> np.ndarray:
        """g_0: the clients' local training, run by the server on the root data set from
        the round's global model (shuffles seeded by run and round; never a straggler)."""
        if self._learner is None:
            self._learner = self.learner_factory()
        start = np.asarray(weights, dtype=np.float32)
        out = self._learner.train(
            start=start,
            data=self.root,
            plan=WorkPlan(self.work.epochs, self.work.steps, straggler=False),
            batch_size=self.work.batch_size,
            sgd=self.sgd,
            generator=torch_generator(self.seed, SERVER_TRAIN, rnd),
        )
        return out.weights.astype(np.float64) - start.astype(np.float64)

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        rows = rows_of(inp)
        k = rows.shape[0]
        if k == 0:
            return np.zeros(inp.dimension, dtype=np.float32), {"excluded_clients": []}
        if inp.global_weights is None:
            raise ValueError("fltrust needs the round's global model to compute its own update")
        g0 = self.server_update(inp.round, inp.global_weights)
        aggregate, trust, _ = fltrust_combine(rows, g0)
        ids = [int(c) for c in inp.client_ids] if len(inp.client_ids) == k else list(range(k))
        return aggregate.astype(np.float32), {
            "excluded_clients": [c for c, t in zip(ids, trust, strict=True) if t <= 0.0],
            "trust_scores": {str(c): round(float(t), 6) for c, t in zip(ids, trust, strict=True)},
            "fltrust_server_norm": float(np.linalg.norm(g0)),
        }

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        return None


@AGGREGATORS.register("fltrust")
def make_fltrust(options: dict[str, Any], context: StageContext) -> FLTrust:
    check_option_keys("fltrust", options, ("root_size",))
    size = int_option(options, "root_size", minimum=1, what="examples in the root data set")
    if context.server_data is None or context.learner_factory is None:
        raise ConfigError(
            "server.aggregator = 'fltrust' trains on the server's own root data set, but this "
            "run gives the server no examples or model; choose another aggregator"
        )
    root = context.server_data.reserve(
        DEFAULT_ROOT_SIZE if size is None else size, who="server.aggregator_options.root_size"
    )
    return FLTrust(
        root=root,
        learner_factory=context.learner_factory,
        work=context.work,
        sgd=context.sgd,
        seed=context.seed,
    )
