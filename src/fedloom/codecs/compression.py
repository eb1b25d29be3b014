"""Uplink compression as update codecs: sparsification, quantization and signs, with error
feedback kept in the client's own state.

Every codec here compresses the ``"delta"`` upload (other uploads, such as SCAFFOLD's
control variate, pass unchanged) into *compact named arrays*: int32 indices and float32
values, packed integer codes and float32 scales, packed sign bits. Those arrays are what
leaves the client, what the engines and the gRPC wire move, and what a round's
``bytes_up`` counts; the server decodes them back to a dense float32 update before the
aggregator sees it.

Error feedback (Stich et al. 2018, "Sparsified SGD with memory", Algorithm 1;
Karimireddy et al. 2019, "Error feedback fixes SignSGD", Algorithm 2): the client
compresses p = Δ + e instead of Δ, sends C(p), and keeps e' = p − C(p), so whatever a
round does not send is sent later instead of lost. e is the client's own state
(:data:`RESIDUAL` in its :class:`~fedloom.client_store.ClientState`), so it survives
rounds the client sits out, pool workers, a deployed client's restarts and a resumed run
exactly like any other per-client state. A biased compressor (top-k, random-k, sign)
uses it by default, unbiased QSGD does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from fedloom.client_store import ClientState
from fedloom.codecs.base import Layout, RejectedUpdateError
from fedloom.config import CompressionConfig
from fedloom.messages import DELTA, FitResult, Scalar
from fedloom.registry import CODECS
from fedloom.seeding import COMPRESSION, derive_rng

#: Where a client keeps its error-feedback residual e in its persisted state.
RESIDUAL = "compression/residual"


def topk_count(ratio: float, dimension: int) -> int:
    """k = round(ratio · d), at least one coordinate and at most all of them."""
    return max(1, min(dimension, round(ratio * dimension)))


class CompressionCodec:
    """The shared half of every compressor: error feedback and the codec protocol.

    A subclass says how ``p`` becomes compact arrays (:meth:`compress`), how those
    become a dense vector again (:meth:`decompress`), and what they look like
    (:meth:`delta_layout`); :meth:`decompress` must refuse anything malformed, since on
    the server its input comes from a client.
    """

    name = "compression"

    def __init__(self, *, dimension: int, seed: int, error_feedback: bool) -> None:
        self.dimension = dimension
        self.seed = seed
        self.error_feedback = error_feedback

    # ------------------------------------------------------------ subclasses
    def compress(self, p: np.ndarray, *, rnd: int, client_id: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decompress(self, encoded: Mapping[str, np.ndarray], *, rnd: int) -> np.ndarray:
        raise NotImplementedError

    def delta_layout(self) -> Layout:
        raise NotImplementedError

    # ----------------------------------------------------------- client side
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
        delta = np.asarray(vectors[DELTA], dtype=np.float32)
        if delta.shape != (self.dimension,):
            raise ValueError(f"update has shape {delta.shape}, expected ({self.dimension},)")
        p = delta
        if self.error_feedback:
            residual = state.tensors.get(RESIDUAL)
            if residual is not None:
                if residual.shape != delta.shape:
                    raise ValueError(
                        f"the client's error-feedback residual has shape {residual.shape}, "
                        f"the model ({self.dimension},); it belongs to another model"
                    )
                p = delta + residual.astype(np.float32, copy=False)
        encoded = self.compress(p, rnd=round, client_id=client_id)
        if self.error_feedback:
            sent = self.decompress(encoded, rnd=round)
            state.tensors[RESIDUAL] = (p - sent).astype(np.float32)
        out = {k: v for k, v in vectors.items() if k != DELTA}
        out.update(encoded)
        return out

    # ----------------------------------------------------------- server side
    def task_config(self, rnd: int) -> dict[str, Scalar]:
        return {}

    def encoded_layout(self, layout: Layout) -> Layout:
        out = {k: v for k, v in layout.items() if k != DELTA}
        out.update(self.delta_layout())
        return out

    def decode(self, result: FitResult) -> FitResult:
        own = self.delta_layout()
        encoded: dict[str, np.ndarray] = {}
        for name, (size, dtype) in own.items():
            v = result.vectors.get(name)
            if v is None:
                raise RejectedUpdateError(f"the compressed update lacks its '{name}' array")
            if v.shape != (size,) or v.dtype != np.dtype(dtype):
                raise RejectedUpdateError(
                    f"compressed array '{name}' is {v.dtype} of shape {v.shape}, expected "
                    f"{dtype} of shape ({size},)"
                )
            encoded[name] = v
        delta = self.decompress(encoded, rnd=result.round)
        vectors = {k: v for k, v in result.vectors.items() if k not in own}
        vectors[DELTA] = delta
        return replace(result, vectors=vectors)

    def decode_sum(self, vectors: dict[str, np.ndarray], *, rnd: int) -> dict[str, np.ndarray]:
        raise NotImplementedError(
            f"{self.name} is not linear in the update; secure aggregation cannot sum it"
        )


def _check_finite(name: str, v: np.ndarray) -> None:
    if not np.all(np.isfinite(v)):
        raise RejectedUpdateError(f"compressed array '{name}' contains NaN or Inf")


# ------------------------------------------------------------------- top-k


class TopKCodec(CompressionCodec):
    """Top-k sparsification (Stich et al. 2018, top_k operator of Section 2): send the k
    coordinates of largest magnitude as int32 indices (ascending) and float32 values."""

    name = "topk"

    def __init__(self, *, dimension: int, seed: int, error_feedback: bool, ratio: float):
        super().__init__(dimension=dimension, seed=seed, error_feedback=error_feedback)
        self.k = topk_count(ratio, dimension)

    def delta_layout(self) -> Layout:
        return {f"{DELTA}.idx": (self.k, "int32"), f"{DELTA}.val": (self.k, "float32")}

    def compress(self, p: np.ndarray, *, rnd: int, client_id: int) -> dict[str, np.ndarray]:
        if self.k == self.dimension:
            idx = np.arange(self.dimension)
        else:
            idx = np.sort(np.argpartition(np.abs(p), self.dimension - self.k)[-self.k :])
        return {
            f"{DELTA}.idx": idx.astype(np.int32),
            f"{DELTA}.val": p[idx].astype(np.float32),
        }

    def decompress(self, encoded: Mapping[str, np.ndarray], *, rnd: int) -> np.ndarray:
        idx, val = encoded[f"{DELTA}.idx"], encoded[f"{DELTA}.val"]
        if idx.size and (idx[0] < 0 or idx[-1] >= self.dimension or np.any(np.diff(idx) <= 0)):
            raise RejectedUpdateError(
                "top-k indices are not strictly increasing within the model's coordinates"
            )
        _check_finite(f"{DELTA}.val", val)
        out = np.zeros(self.dimension, dtype=np.float32)
        out[idx] = val
        return out


# ------------------------------------------------------------------ random-k


class RandomKCodec(CompressionCodec):
    """Random-k sparsification (Stich et al. 2018, rand_k) with one index set per round,
    drawn from (run seed, round) and so shared by every client.

    Shared indices need not travel: a client sends only its k float32 values, under the
    name ``"delta"``. Decoding is a scatter, linear in the update, so the server can also
    decode the *sum* of the clients' values: random-k composes with secure aggregation.
    The values are not rescaled by d/k: with error feedback (the default) the residual
    carries the rest, as in Stich et al.'s Algorithm 1.
    """

    name = "randk"

    def __init__(self, *, dimension: int, seed: int, error_feedback: bool, ratio: float):
        super().__init__(dimension=dimension, seed=seed, error_feedback=error_feedback)
        self.k = topk_count(ratio, dimension)
        self._cached: tuple[int, np.ndarray] | None = None

    def indices(self, rnd: int) -> np.ndarray:
        """The round's shared coordinates, ascending (cached: every client of a round
        and the server ask for the same ones)."""
        if self._cached is None or self._cached[0] != rnd:
            rng = derive_rng(self.seed, COMPRESSION, rnd)
            idx = np.sort(rng.choice(self.dimension, size=self.k, replace=False))
            self._cached = (rnd, idx.astype(np.int64))
        return self._cached[1]

    def delta_layout(self) -> Layout:
        return {DELTA: (self.k, "float32")}

    def compress(self, p: np.ndarray, *, rnd: int, client_id: int) -> dict[str, np.ndarray]:
        return {DELTA: p[self.indices(rnd)].astype(np.float32)}

    def decompress(self, encoded: Mapping[str, np.ndarray], *, rnd: int) -> np.ndarray:
        val = encoded[DELTA]
        _check_finite(DELTA, val)
        out = np.zeros(self.dimension, dtype=np.float32)
        out[self.indices(rnd)] = val
        return out

    def decode_sum(self, vectors: dict[str, np.ndarray], *, rnd: int) -> dict[str, np.ndarray]:
        out = dict(vectors)
        total = np.zeros(self.dimension, dtype=np.float64)
        total[self.indices(rnd)] = vectors[DELTA]
        out[DELTA] = total
        return out


# -------------------------------------------------------------------- QSGD


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes (bits ∈ {1, 2, 4}) into bytes, the first code in
    the lowest bits; the tail is padded with zero codes."""
    per = 8 // bits
    padded = np.zeros(math.ceil(codes.size / per) * per, dtype=np.uint8)
    padded[: codes.size] = codes
    lanes = padded.reshape(-1, per)
    out = np.zeros(lanes.shape[0], dtype=np.uint8)
    for j in range(per):
        out |= lanes[:, j] << np.uint8(bits * j)
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes."""
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    lanes = np.stack([(packed >> np.uint8(bits * j)) & mask for j in range(per)], axis=1)
    return lanes.reshape(-1)[:count]


class QSGDCodec(CompressionCodec):
    """QSGD (Alistarh et al. 2017, Section 3.1): stochastic uniform quantization with s
    levels per bucket,

        Q_s(v_i) = ‖v‖ · sgn(v_i) · ξ_i(v, s),   ξ_i = (l + 1)/s with probability
        |v_i|·s/‖v‖ − l, else l/s,   l = ⌊|v_i|·s/‖v‖⌋,

    so E[Q_s(v)] = v. The vector is cut into buckets of ``bucket_size`` coordinates, each
    scaled by its own norm (the paper's bucketing; ``norm = "max"`` scales by the
    bucket's largest magnitude instead, a lower-variance variant). With b bits a
    coordinate is a sign and a level in 0..s, s = 2^(b−1) − 1 (127 for 8 bits, 7 for 4):
    8-bit codes travel as int8, smaller ones as unsigned codes q + 2^(b−1) packed into
    bytes (two 4-bit codes a byte), plus one float32 scale per bucket.
    """

    name = "qsgd"

    def __init__(
        self,
        *,
        dimension: int,
        seed: int,
        error_feedback: bool,
        bits: int,
        bucket_size: int,
        norm: str,
    ) -> None:
        super().__init__(dimension=dimension, seed=seed, error_feedback=error_feedback)
        if bits not in (2, 4, 8):
            raise ValueError(f"QSGD packs 2, 4 or 8 bits a coordinate, not {bits}")
        self.bits = bits
        self.levels = (1 << (bits - 1)) - 1
        self.bucket_size = bucket_size
        self.norm = norm
        self.buckets = math.ceil(dimension / bucket_size)

    def delta_layout(self) -> Layout:
        if self.bits == 8:
            codes = (self.dimension, "int8")
        else:
            codes = (math.ceil(self.dimension / (8 // self.bits)), "uint8")
        return {f"{DELTA}.q": codes, f"{DELTA}.scale": (self.buckets, "float32")}

    def _rows(self, v: np.ndarray) -> np.ndarray:
        padded = np.zeros(self.buckets * self.bucket_size, dtype=np.float64)
        padded[: v.size] = v
        return padded.reshape(self.buckets, self.bucket_size)

    def quantize(self, p: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Signed levels q ∈ [−s, s] (one per coordinate) and float32 bucket scales."""
        rows = self._rows(p)
        if self.norm == "max":
            scale = np.abs(rows).max(axis=1)
        else:
            scale = np.sqrt(np.square(rows).sum(axis=1))
        scale = scale.astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
        r = np.minimum(np.abs(rows) / safe[:, None] * self.levels, self.levels)
        low = np.floor(r)
        level = low + (rng.random(r.shape) < (r - low))
        q = (np.sign(rows) * level).reshape(-1)[: self.dimension]
        return q.astype(np.int8), scale

    def compress(self, p: np.ndarray, *, rnd: int, client_id: int) -> dict[str, np.ndarray]:
        q, scale = self.quantize(p, derive_rng(self.seed, COMPRESSION, rnd, client_id))
        if self.bits == 8:
            codes = q
        else:
            offset = q.astype(np.int16) + (1 << (self.bits - 1))
            codes = pack_codes(offset.astype(np.uint8), self.bits)
        return {f"{DELTA}.q": codes, f"{DELTA}.scale": scale}

    def decompress(self, encoded: Mapping[str, np.ndarray], *, rnd: int) -> np.ndarray:
        codes, scale = encoded[f"{DELTA}.q"], encoded[f"{DELTA}.scale"]
        _check_finite(f"{DELTA}.scale", scale)
        if np.any(scale < 0):
            raise RejectedUpdateError("a QSGD bucket scale is negative")
        if self.bits == 8:
            q = codes.astype(np.float64)
        else:
            q = unpack_codes(codes, self.bits, self.dimension).astype(np.float64)
            q -= 1 << (self.bits - 1)
        if np.any(np.abs(q) > self.levels):
            raise RejectedUpdateError(f"a QSGD code lies outside the {self.levels} levels")
        per_coord = np.repeat(scale.astype(np.float64), self.bucket_size)[: self.dimension]
        return (q * per_coord / self.levels).astype(np.float32)


# -------------------------------------------------------------------- sign


class SignCodec(CompressionCodec):
    """Scaled sign compression (Karimireddy et al. 2019, EF-SignSGD, Algorithm 1):
    C(p) = (‖p‖₁ / d) · sgn(p), one packed bit a coordinate plus one float32 scale.
    A zero coordinate is sent as +1 (one bit has no third value); error feedback takes
    back the difference."""

    name = "sign"

    def delta_layout(self) -> Layout:
        return {
            f"{DELTA}.sign": (math.ceil(self.dimension / 8), "uint8"),
            f"{DELTA}.scale": (1, "float32"),
        }

    def compress(self, p: np.ndarray, *, rnd: int, client_id: int) -> dict[str, np.ndarray]:
        scale = np.float32(np.abs(p.astype(np.float64)).sum() / self.dimension)
        bits = np.packbits(p >= 0, bitorder="little")
        return {f"{DELTA}.sign": bits, f"{DELTA}.scale": np.array([scale], dtype=np.float32)}

    def decompress(self, encoded: Mapping[str, np.ndarray], *, rnd: int) -> np.ndarray:
        bits, scale = encoded[f"{DELTA}.sign"], encoded[f"{DELTA}.scale"]
        _check_finite(f"{DELTA}.scale", scale)
        if scale[0] < 0:
            raise RejectedUpdateError("the sign codec's scale is negative")
        signs = np.unpackbits(bits, count=self.dimension, bitorder="little").astype(np.float32)
        return (signs * 2.0 - 1.0) * scale[0]


# ----------------------------------------------------------------- factories


def _error_feedback(section: CompressionConfig, *, default: bool) -> bool:
    return default if section.error_feedback is None else section.error_feedback


@CODECS.register("topk")
def make_topk(section: CompressionConfig, context: Any) -> TopKCodec:
    return TopKCodec(
        dimension=context.dimension,
        seed=context.seed,
        error_feedback=_error_feedback(section, default=True),
        ratio=section.ratio,
    )


@CODECS.register("randk")
def make_randk(section: CompressionConfig, context: Any) -> RandomKCodec:
    return RandomKCodec(
        dimension=context.dimension,
        seed=context.seed,
        error_feedback=_error_feedback(section, default=True),
        ratio=section.ratio,
    )


@CODECS.register("qsgd")
def make_qsgd(section: CompressionConfig, context: Any) -> QSGDCodec:
    return QSGDCodec(
        dimension=context.dimension,
        seed=context.seed,
        error_feedback=_error_feedback(section, default=False),
        bits=section.bits,
        bucket_size=section.bucket_size,
        norm=section.norm,
    )


@CODECS.register("int8")
def make_int8(section: CompressionConfig, context: Any) -> QSGDCodec:
    """8-bit QSGD, whatever ``compression.bits`` says."""
    return QSGDCodec(
        dimension=context.dimension,
        seed=context.seed,
        error_feedback=_error_feedback(section, default=False),
        bits=8,
        bucket_size=section.bucket_size,
        norm=section.norm,
    )


@CODECS.register("sign")
def make_sign(section: CompressionConfig, context: Any) -> SignCodec:
    return SignCodec(
        dimension=context.dimension,
        seed=context.seed,
        error_feedback=_error_feedback(section, default=True),
    )
