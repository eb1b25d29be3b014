"""Which torch device a process trains clients on (``engine.device``).

Every engine resolves the setting here, so ``cpu``/``cuda``/``auto`` mean the same in
each and a missing GPU is refused with the same sentence. It lives beside the client
runtime (which moves its learner to the device) rather than in ``engine/``, so that no
engine imports another for it.
"""

from __future__ import annotations

import torch

from fedloom.config import ConfigError

NO_CUDA = (
    "engine.device = 'cuda' but torch sees no CUDA device here; set engine.device = 'auto' or 'cpu'"
)


def resolve_device(name: str, *, cuda_available: bool | None = None) -> torch.device:
    """``cpu``, ``cuda`` (refused without a GPU) or ``auto`` (CUDA when there is one).

    ``cuda_available`` replaces torch's own answer (a Ray cluster's GPUs are not this
    process's); None asks torch.
    """
    if name not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"engine.device = '{name}' is not one of 'cpu', 'cuda', 'auto'")
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    if name == "cuda" and not has_cuda:
        raise ConfigError(NO_CUDA)
    return torch.device(name)


def worker_device(index: int, device: torch.device, *, gpus: int) -> torch.device:
    """The device of worker ``index`` of a pool: worker i trains on ``cuda:(i mod gpus)``,
    so the workers spread evenly over the GPUs present; on the CPU every worker is there.
    """
    if device.type != "cuda":
        return device
    if gpus < 1:
        raise ConfigError(NO_CUDA)
    return torch.device("cuda", index % gpus)
