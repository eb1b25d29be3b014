"""Post-aggregation model transforms: stages that edit the new global model on the server.

After the server optimizer's step, and only in a round that aggregated, the strategy
passes the new global vector through its transforms in order; what comes out is the
model that is evaluated, checkpointed and broadcast next round. A transform may need
to run the model (a watermark is embedded by a few SGD steps), so its factory gets a
:class:`ServerModel` besides the stage context: the model the server already holds for
central evaluation, and what it may know about the inputs without any client data.

Factories are registered in :data:`fedloom.registry.MODEL_TRANSFORMS` with the signature
``(section, StageContext, ServerModel)``. A transform that also implements
:class:`~fedloom.callbacks.Callback` hooks (e.g. to write a file into the run
directory) is added to the run's callbacks as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedloom.client.learner import Learner
from fedloom.data.base import ArrayDataset


@dataclass(frozen=True, kw_only=True)
class ServerModel:
    """The model the server runs, and the shape and range of its inputs.

    The range comes from the server's own test set (which central evaluation holds
    anyway), never from a client's data.
    """

    learner: Learner
    input_shape: tuple[int, ...]
    num_classes: int
    input_low: float
    input_high: float
    #: False for token ids (text models): generated inputs must then be integers.
    real_inputs: bool = True

    @staticmethod
    def of(learner: Learner, *, test: ArrayDataset, num_classes: int) -> ServerModel:
        """The server model of ``learner``, its input facts read from the test set."""
        x = test.x
        low, high = (float(x.min()), float(x.max())) if len(x) else (0.0, 1.0)
        if high <= low:
            high = low + 1.0
        return ServerModel(
            learner=learner,
            input_shape=tuple(int(s) for s in x.shape[1:]),
            num_classes=num_classes,
            input_low=low,
            input_high=high,
            real_inputs=x.dtype.kind == "f",
        )


class ModelTransform(Protocol):
    """Edits the global model after each aggregation; checkpointed through ``state``."""

    def transform(self, rnd: int, weights: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The global model to keep instead of ``weights``, and fields for the round record."""
        ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: Mapping[str, Any]) -> None: ...
