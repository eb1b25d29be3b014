"""Model weights as one flat float32 vector plus a :class:`ParamSpec` that maps it back.

Every server-side operation (weighted mean, clipping, compression, robust statistics)
is then a vector operation on contiguous memory, whatever framework trained the model.

On the client side, :func:`bind_flat_parameters` goes one step further: it makes every
parameter of a PyTorch module a *view* into a single flat buffer (and every gradient a
view into a flat gradient buffer). Loading a global model is then one ``copy_`` and the
local optimizer step is a handful of vector operations, with no per-tensor Python loop.
This is the main reason simulation with thousands of clients is cheap (the same idea as
Apple's pfl-research, which avoids per-client model construction and state-dict copies).

Wire encoding of vectors is raw little-endian bytes: nothing is pickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

WIRE_DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class ParamEntry:
    """One named tensor inside the flat vector."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and dtypes of a model's parameters, in vector order."""

    entries: tuple[ParamEntry, ...]

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def offsets(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each entry within the flat vector."""
        out: list[tuple[int, int]] = []
        start = 0
        for e in self.entries:
            out.append((start, start + e.size))
            start += e.size
        return out

    def flatten(self, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> np.ndarray:
        """Concatenate named arrays into one float32 vector, checking every shape."""
        out = np.empty(self.size, dtype=np.float32)
        for entry, (a, b) in zip(self.entries, self.offsets(), strict=True):
            if entry.name not in arrays:
                raise KeyError(f"parameter '{entry.name}' is missing from the given arrays")
            value = arrays[entry.name]
            arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            if tuple(arr.shape) != entry.shape:
                raise ValueError(
                    f"parameter '{entry.name}' has shape {tuple(arr.shape)}, expected {entry.shape}"
                )
            out[a:b] = arr.reshape(-1)
        return out

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Split a flat vector into named arrays (views, no copy)."""
        self.check_vector(vector)
        return {
            e.name: vector[a:b].reshape(e.shape)
            for e, (a, b) in zip(self.entries, self.offsets(), strict=True)
        }

    def personal_mask(self, prefixes: Sequence[str]) -> np.ndarray:
        """Which coordinates of the flat vector stay on the client (True) in personalized FL.

        A prefix names a module (``"net.2"`` selects ``net.2.weight`` and ``net.2.bias``,
        not ``net.20.weight``) or one parameter. No prefixes means the model's last layer:
        every entry that shares the last parameter's module prefix, the classifier head
        that FedPer (Arivazhagan et al. 2019) and FedRep (Collins et al. 2021) keep home.
        A prefix that matches nothing is refused: a typo would otherwise federate the
        whole model silently.
        """
        if not self.entries:
            raise ValueError("the model has no parameters to split into shared and personal")
        if prefixes:
            wanted = [p.rstrip(".") for p in prefixes]
            if "" in wanted:
                raise ValueError("an empty personal layer prefix would select every parameter")
        else:
            last = self.entries[-1].name
            wanted = [last.rsplit(".", 1)[0]] if "." in last else [""]
        mask = np.zeros(self.size, dtype=bool)
        matched: set[str] = set()
        for entry, (a, b) in zip(self.entries, self.offsets(), strict=True):
            for prefix in wanted:
                if prefix == "" or entry.name == prefix or entry.name.startswith(prefix + "."):
                    mask[a:b] = True
                    matched.add(prefix)
        missing = [p for p in wanted if p not in matched]
        if missing:
            raise ValueError(
                f"personal layer prefix {', '.join(repr(p) for p in missing)} matches no "
                f"parameter; the model's parameters are {', '.join(self.names)}"
            )
        return mask

    def check_vector(self, vector: np.ndarray) -> None:
        if vector.ndim != 1 or vector.shape[0] != self.size:
            raise ValueError(f"vector has shape {vector.shape}, expected ({self.size},)")

    def to_json(self) -> str:
        return json.dumps([[e.name, list(e.shape), e.dtype] for e in self.entries])

    @classmethod
    def from_json(cls, text: str) -> ParamSpec:
        raw: list[Any] = json.loads(text)
        return cls(
            tuple(ParamEntry(str(n), tuple(int(s) for s in shape), str(d)) for n, shape, d in raw)
        )

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> ParamSpec:
        """Trainable parameters only; buffers (e.g. BatchNorm statistics) are not federated."""
        return cls(
            tuple(
                ParamEntry(name, tuple(p.shape), str(p.dtype).removeprefix("torch."))
                for name, p in module.named_parameters()
            )
        )


def encode_vector(vector: np.ndarray) -> bytes:
    """Raw little-endian float32 bytes: the wire and IPC format for vectors."""
    return np.ascontiguousarray(vector, dtype=WIRE_DTYPE).tobytes()


def decode_vector(data: bytes | bytearray | memoryview, expected_size: int) -> np.ndarray:
    """Inverse of :func:`encode_vector`; rejects a buffer of the wrong length."""
    if len(data) != expected_size * WIRE_DTYPE.itemsize:
        raise ValueError(
            f"vector payload has {len(data)} bytes, expected {expected_size * WIRE_DTYPE.itemsize}"
        )
    # A copy: frombuffer views are read-only, and receivers (torch.from_numpy) need writable.
    return np.frombuffer(data, dtype=WIRE_DTYPE).astype(np.float32)


#: The compact dtypes a codec may put on the wire besides float32 (codes, indices,
#: half-precision values); they travel as they are, little-endian.
COMPACT_DTYPES = frozenset({"int8", "uint8", "int16", "int32", "float16"})


def wire_dtype(vector: np.ndarray) -> np.dtype[Any]:
    """The dtype a vector travels in: a compact dtype as it is, any other as float32."""
    if vector.dtype.name in COMPACT_DTYPES:
        return vector.dtype.newbyteorder("<")
    return WIRE_DTYPE


def encoded_nbytes(vector: np.ndarray) -> int:
    """Bytes the vector occupies on the wire (float32, or its compact dtype)."""
    return int(vector.size) * wire_dtype(vector).itemsize


def encode_array(vector: np.ndarray) -> tuple[str, bytes]:
    """``(dtype name, raw little-endian bytes)`` of a vector in its wire dtype."""
    dtype = wire_dtype(vector)
    return dtype.name, np.ascontiguousarray(vector, dtype=dtype).tobytes()


def decode_array(data: bytes | bytearray | memoryview, size: int, dtype: str) -> np.ndarray:
    """Inverse of :func:`encode_array`; rejects an unknown dtype or a wrong length."""
    if dtype != "float32" and dtype not in COMPACT_DTYPES:
        raise ValueError(f"vector dtype '{dtype}' is not one fedloom sends")
    dt = np.dtype(dtype).newbyteorder("<")
    if len(data) != size * dt.itemsize:
        raise ValueError(f"vector payload has {len(data)} bytes, expected {size * dt.itemsize}")
    return np.frombuffer(data, dtype=dt).astype(dt.newbyteorder("="))


@dataclass
class FlatBinding:
    """A module whose parameters and gradients live in two flat buffers."""

    module: torch.nn.Module
    spec: ParamSpec
    weights: torch.Tensor
    grads: torch.Tensor

    def load(self, vector: np.ndarray) -> None:
        """Set all parameters from a flat vector with a single copy."""
        self.weights.copy_(torch.from_numpy(vector))

    def vector(self) -> np.ndarray:
        """A copy of the current weights as a NumPy vector."""
        return self.weights.detach().cpu().numpy().copy()


def bind_flat_parameters(module: torch.nn.Module) -> FlatBinding:
    """Re-home every parameter of ``module`` into one contiguous float32 buffer.

    Parameters keep their identity (optimizers and hooks still see the same objects);
    only their storage moves. Gradients are pre-allocated as views into a second flat
    buffer, and autograd accumulates into them in place.
    """
    spec = ParamSpec.from_module(module)
    params = list(module.parameters())
    for p in params:
        if p.dtype != torch.float32:
            raise TypeError(f"fedloom trains float32 parameters; found {p.dtype}; cast the model")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError("fedloom trains a model whose parameters are on one device; move it")
    device = devices.pop() if devices else torch.device("cpu")
    weights = torch.empty(spec.size, dtype=torch.float32, device=device)
    grads = torch.zeros(spec.size, dtype=torch.float32, device=device)
    for p, (a, b) in zip(params, spec.offsets(), strict=True):
        view = weights[a:b].view_as(p)
        view.copy_(p.data)
        p.data = view
        p.grad = grads[a:b].view_as(p)
    return FlatBinding(module=module, spec=spec, weights=weights, grads=grads)


def module_to_vector(module: torch.nn.Module) -> np.ndarray:
    """Flatten a module's parameters into a new float32 vector."""
    spec = ParamSpec.from_module(module)
    return spec.flatten(dict(module.named_parameters()))


def vector_to_module(vector: np.ndarray, module: torch.nn.Module) -> None:
    """Copy a flat vector into a module's parameters in place."""
    spec = ParamSpec.from_module(module)
    arrays = spec.unflatten(vector)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.from_numpy(np.ascontiguousarray(arrays[name])))
