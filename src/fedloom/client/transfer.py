"""Federated transfer learning: start from pretrained weights, keep part of the model
frozen, or train only low-rank adapters (LoRA) over a frozen backbone.

A frozen tensor is re-registered as a *buffer* of its module. The :class:`Learner`
binds only a module's parameters into the flat vector that every engine, codec,
aggregator, secure-aggregation protocol and checkpoint sees, so a frozen tensor is
neither trained nor uploaded nor broadcast, and none of those stages needs to know
that transfer learning exists: the model they receive simply has fewer parameters.
Every process (server, simulated or deployed client, pool worker) rebuilds the same
frozen tensors from ``model.pretrained`` on its own disk, so they never travel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedloom.config import ConfigError, RunConfig
from fedloom.seeding import MODEL_INIT, derive_seed

#: Second key under ``MODEL_INIT`` for the adapters' random initialisation.
_LORA_INIT = 1


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Named tensors from a safetensors file or a PyTorch state dict (``.pt``/``.pth``).

    PyTorch files are read with ``weights_only=True``: a state dict is data, and a file
    that needs arbitrary unpickling is refused rather than executed.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.pretrained '{p}' does not exist; create it or fix the path")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user error
        raise ConfigError(
            f"model.pretrained '{p}' cannot be read as "
            f"{'safetensors' if p.suffix == '.safetensors' else 'a PyTorch state dict'} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(
            f"model.pretrained '{p}' is not a state dict (a mapping of names to tensors); "
            "save it with torch.save(model.state_dict(), PATH) or safetensors"
        )
    return dict(state)


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Copy the file's tensors into ``model``; any name or shape difference is one line.

    Every entry of the model's state dict (parameters and persistent buffers) must be in
    the file with the same shape, and the file may hold nothing else: a silently
    partial load would fine-tune a half-random model and call it transfer learning.
    """
    state = read_state_file(path)
    expected = model.state_dict()
    problems: list[str] = []
    for name, tensor in expected.items():
        if name not in state:
            problems.append(f"'{name}' {tuple(tensor.shape)} is missing from the file")
        elif tuple(state[name].shape) != tuple(tensor.shape):
            problems.append(
                f"'{name}' has shape {tuple(state[name].shape)} in the file but "
                f"{tuple(tensor.shape)} in the model"
            )
    problems += [f"the file's '{n}' is not in the model" for n in state if n not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise ConfigError(
            f"model.pretrained '{path}' does not fit the configured model: {problems[0]}{more}; "
            "pretrain with the same [model] settings or change them"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name].to(tensor.dtype))


def _matches(name: str, prefix: str) -> bool:
    """A prefix names a module (``net.2`` selects ``net.2.weight``, not ``net.20.weight``)
    or one parameter, as :meth:`fedloom.params.ParamSpec.personal_mask` reads it."""
    return name == prefix or name.startswith(prefix + ".")


def freeze_parameters(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Turn every parameter under ``prefixes`` into a buffer; returns the frozen names.

    A prefix that matches no parameter is refused: a typo would otherwise train (and
    send) the layer the user meant to keep fixed.
    """
    wanted = [p.rstrip(".") for p in prefixes]
    if "" in wanted:
        raise ConfigError("model.freeze has an empty prefix, which would freeze every parameter")
    frozen: list[str] = []
    matched: set[str] = set()
    for module_name, module in list(model.named_modules()):
        for local in list(module._parameters):
            full = f"{module_name}.{local}" if module_name else local
            hits = [p for p in wanted if _matches(full, p)]
            if hits:
                matched.update(hits)
                frozen.append(full)
                _to_buffer(module, local)
    missing = [p for p in wanted if p not in matched]
    if missing:
        names = [n for n, _ in model.named_parameters()]
        raise ConfigError(
            f"model.freeze prefix {', '.join(repr(p) for p in missing)} matches no trainable "
            f"parameter; the model's parameters are {', '.join(names) or 'none'}"
        )
    return frozen


def _to_buffer(module: nn.Module, local: str) -> None:
    param = module._parameters.pop(local)
    if param is not None:
        module.register_buffer(local, param.detach().clone())


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al. 2022, Eq. 3):

        h = W x + b + (alpha / r) · B A x,   A ∈ R^{r×k}, B ∈ R^{d×r}.

    As in the paper (Sec. 4.1), A starts random Gaussian and B at zero, so the adapted
    model equals the pretrained one before the first step; ``alpha / r`` keeps the
    update's scale comparable across ranks. Only ``lora_A`` and ``lora_B`` are
    parameters; ``W`` and ``b`` are buffers of ``base`` and never travel.
    """

    def __init__(
        self, base: nn.Linear, *, rank: int, alpha: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        d, k = base.out_features, base.in_features
        if rank > min(d, k):
            raise ConfigError(
                f"lora.rank = {rank} exceeds the smaller side of a {d}x{k} linear layer; "
                f"choose lora.rank <= {min(d, k)}"
            )
        for local in list(base._parameters):
            _to_buffer(base, local)
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        # std 1/sqrt(k): A x has the scale of an ordinary layer's output.
        a = torch.randn(rank, k, generator=generator) / math.sqrt(k)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(d, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    layers: Sequence[str] = (),
    generator: torch.Generator,
) -> list[str]:
    """Wrap the chosen ``nn.Linear`` modules in :class:`LoRALinear` and freeze every other
    parameter of ``model``; returns the adapted module names.

    ``layers`` are module-name prefixes (empty: every linear layer). After this the
    model's parameters are exactly the adapters, which is what the Learner binds.
    """
    wanted = [p.rstrip(".") for p in layers]
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (not wanted or any(_matches(name, p) for p in wanted))
    ]
    unmatched = [p for p in wanted if not any(_matches(t, p) for t in targets)]
    if not targets or unmatched:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        which = f"lora.layers {', '.join(repr(p) for p in unmatched)}" if unmatched else "lora"
        raise ConfigError(
            f"{which} matches no linear layer; the model's linear layers are "
            f"{', '.join(linear) or 'none'}"
        )
    # Freeze the backbone first, so the adapters are the only parameters left.
    for module in model.modules():
        for local in list(module._parameters):
            _to_buffer(module, local)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, LoRALinear(base, rank=rank, alpha=alpha, generator=generator))
    return targets


def prepare_transfer(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """The configured model as the run trains it: pretrained weights loaded, frozen
    layers turned into buffers, LoRA adapters in place. Deterministic in the seed."""
    if cfg.model.pretrained is not None:
        load_pretrained(model, cfg.model.pretrained)
    if cfg.model.freeze:
        freeze_parameters(model, cfg.model.freeze)
    if cfg.client.adapter == "lora":
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, MODEL_INIT, _LORA_INIT))
        apply_lora(
            model,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            layers=cfg.lora.layers,
            generator=generator,
        )
    if not any(True for _ in model.parameters()):
        raise ConfigError(
            "model.freeze freezes every parameter, so nothing would train; "
            "leave at least one layer out of it"
        )
    return model


def refuse_for_own_model(cfg: RunConfig) -> None:
    """The Python API trains the user's own module, which ``prepare_transfer`` never
    sees: transfer keys in its config would be ignored silently, so they are refused."""
    keys = [
        key
        for key, is_set in (
            ("model.pretrained", cfg.model.pretrained is not None),
            ("model.freeze", bool(cfg.model.freeze)),
            ("client.adapter", cfg.client.adapter != "none"),
        )
        if is_set
    ]
    if keys:
        raise ValueError(
            f"{keys[0]} applies to the built-in models; build your own model from its "
            "pretrained weights and freeze layers with "
            "fedloom.client.transfer.freeze_parameters(model, prefixes) in your factory"
        )


def check_transfer_composition(cfg: RunConfig) -> None:
    """Refuse transfer settings that cannot train, before any work, in one line."""
    if cfg.client.adapter == "lora" and cfg.privacy.local_dp:
        raise ConfigError(
            "privacy.local_dp (Opacus DP-SGD) has no per-example gradients for LoRA layers; "
            "use model.freeze without client.adapter, or central DP"
        )
