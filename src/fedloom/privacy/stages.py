"""Privacy mechanisms as stages: what the strategy composes, so the round loop and the
engines never branch on privacy.

* Central DP (DP-FedAvg, McMahan et al. 2018) is a clipping *codec* (clients clip their
  update to C before it leaves them; the server checks that they did), an *aggregator
  wrapper* that adds Gaussian noise to the sum, divides by the expected number of clients
  and counts the round in the accountant, and a *callback* that records the ledger and
  stops the run before a round that would exceed ``max_epsilon``.
* Secure aggregation (SecAgg+, CKKS) is a :class:`SecureAggregation` stage that runs its
  protocol over the engine's :class:`~fedloom.exchange.Exchange`; its client side is a
  participant registered by protocol name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.callbacks import Callback, RunContext
from fedloom.client_store import ClientState
from fedloom.codecs.base import Layout, RejectedUpdateError
from fedloom.config import ConfigError, PrivacyConfig
from fedloom.exchange import Exchange, ExchangeRequest, Role, SecureSumOutcome
from fedloom.messages import DELTA, KEY_HOLDER_ID, FitResult, Scalar
from fedloom.privacy.central import CentralDP, clip_update
from fedloom.privacy.secagg import STAGES, RoundAbortedError, SecAggConfig, Stage
from fedloom.privacy.secagg.config import secagg_message_limit
from fedloom.privacy.secagg.transport import SecAggParticipant, SecureSum, serve_secagg_round
from fedloom.registry import CODECS, PROTOCOL_PARTICIPANTS, SECURE_AGGREGATIONS
from fedloom.server.aggregators import AggregationInput, RoundRefusedError

log = logging.getLogger("fedloom.privacy")

# ----------------------------------------------------------------- central DP


class ClipCodec:
    """Clip the update to L2 norm C on the client; check it on the server.

    Clipping belongs to the client's update encoding, not to the server: the server then
    only ever sees bounded updates, and the step composes with secure aggregation, where
    the server sees only the sum. The metrics carry the clipped-count bit
    b = 1[‖Δ‖ ≤ C] that adaptive clipping aggregates with noise (Andrew et al. 2021), and
    the pre-clip norm as a simulation diagnostic that never leaves a deployed client.
    """

    name = "clip"
    #: Sent even under secure aggregation: adaptive clipping aggregates it with noise.
    server_metrics = frozenset({"below_clip"})

    def __init__(self, *, clipping_norm: float, adaptive: bool, dp: CentralDP | None = None):
        self.clipping_norm = clipping_norm
        self.adaptive = adaptive
        self.dp = dp  # the server's mechanism (server side only)

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
        clip_norm = config.get("clip_norm")
        if clip_norm is None:
            if self.adaptive:
                raise RuntimeError(
                    "adaptive clipping needs the round's clipping norm in the task, and this "
                    "engine did not send one"
                )
            clip_norm = self.clipping_norm
        clipped = clip_update(vectors[DELTA], float(clip_norm))
        metrics["update_norm"] = clipped.norm
        metrics["below_clip"] = 1.0 if clipped.below_clip else 0.0
        return {**vectors, DELTA: clipped.delta}

    def task_config(self, rnd: int) -> dict[str, Scalar]:
        assert self.dp is not None
        return {"clip_norm": self.dp.clip_norm}

    def encoded_layout(self, layout: Layout) -> Layout:
        return layout

    def decode_sum(self, vectors: dict[str, np.ndarray], *, rnd: int) -> dict[str, np.ndarray]:
        return vectors

    def decode(self, result: FitResult) -> FitResult:
        assert self.dp is not None
        delta = result.delta
        if delta is None:
            return result
        why = self.dp.check_update(delta)
        if why is None and self.dp.adaptive is not None and "below_clip" not in result.metrics:
            why = "the client did not report the clipped-count bit that adaptive clipping needs"
        if why is not None:
            raise RejectedUpdateError(why)
        return result


@CODECS.register("clip")
def make_clip_codec(settings: PrivacyConfig, context: Any) -> ClipCodec:
    return ClipCodec(clipping_norm=settings.clipping_norm, adaptive=settings.adaptive_clipping)


class CentralDPAggregator:
    """DP-FedAvg's aggregate: (Σ clipped Δ + z·C·ξ) / (qN), released every round.

    Wraps the mean (the only aggregator whose sensitivity the analysis covers); works on
    the clear rows or on a secure sum alike, since it needs only their sum.
    """

    needs_individual_updates = False
    aggregates_every_round = True

    def __init__(self, dp: CentralDP) -> None:
        self.dp = dp

    def aggregate(self, inp: AggregationInput) -> tuple[np.ndarray, dict[str, Any]]:
        if inp.updates is not None:
            clipped = list(inp.updates)
        else:
            clipped = [inp.total] if inp.total is not None and inp.count else []
        below = [m.get("below_clip", 0.0) for m in inp.metrics]
        sampling = self.dp.round_sampling(inp.pool_size, inp.sample_size)
        why = self.dp.refusal(inp.round, sampling)
        if why is not None:
            raise RoundRefusedError(why)
        return self.dp.aggregate(inp.round, clipped, below, inp.dimension, sampling)

    def state(self) -> dict[str, Any]:
        # The ledger (z, rounds) and the adaptive clipping norm: ε and C of a resumed run
        # continue exactly where they were.
        return {"privacy": self.dp.checkpoint_meta()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        meta = state.get("privacy")
        if not isinstance(meta, dict):
            raise ConfigError(
                "the checkpoint has no privacy ledger; it was not written by a central-DP "
                "run, so this run cannot resume from it"
            )
        self.dp.restore(meta, None)


class PrivacyLedger(Callback):
    """Records the privacy ledger every round and stops before the budget is exceeded.

    With ``privacy.max_epsilon`` the loop stops *before* a round whose ε would exceed it,
    logs one line saying so, and records it (``stopped_reason`` in the run store).
    """

    def __init__(self, dp: CentralDP) -> None:
        self.dp = dp

    def on_run_start(self, run: RunContext) -> None:
        if run.store is not None:
            run.store.set_meta("privacy", self.dp.ledger())

    def on_restore(self, run: RunContext) -> None:
        # With secure noise a replayed round is a new release of the same data, so the
        # rounds the resume discards and re-runs are counted again (the run store's
        # ledger says how many ran); with seeded noise it releases exactly what it did.
        previous = run.store.get_meta("privacy") if run.store is not None else None
        rounds_run = previous.get("rounds") if isinstance(previous, dict) else None
        accountant = self.dp.accountant
        if self.dp.noise.secure and isinstance(rounds_run, int) and rounds_run > accountant.rounds:
            accountant.rounds = rounds_run

    def stop_before_round(self, rnd: int, run: RunContext) -> str | None:
        return self.dp.next_round_exceeds_budget()

    def on_round_end(self, rnd: int, record: dict[str, Any], run: RunContext) -> None:
        if run.store is not None:
            run.store.set_meta("privacy", self.dp.ledger())


@dataclass
class CentralDPStages:
    """The three stages of central DP sharing one mechanism."""

    mechanism: CentralDP
    codec: ClipCodec
    aggregator: CentralDPAggregator
    callback: PrivacyLedger


def central_dp_stages(
    settings: PrivacyConfig, *, sampling: Any, rounds: int, seed: int
) -> CentralDPStages:
    """Central DP for a run; calibrates z before training when given a target ε."""
    dp = CentralDP.from_config(settings, sampling, rounds, seed)
    if dp.calibrated_for is not None:
        log.info(
            "privacy: noise multiplier z = %.4f calibrated for ε = %g at δ = %g over %d "
            "rounds (%s sampling, q = %.4g, %s accountant)",
            dp.noise_multiplier,
            dp.calibrated_for,
            settings.delta,
            rounds,
            sampling.scheme,
            sampling.rate,
            settings.accountant,
        )
    codec = ClipCodec(
        clipping_norm=settings.clipping_norm, adaptive=settings.adaptive_clipping, dp=dp
    )
    return CentralDPStages(dp, codec, CentralDPAggregator(dp), PrivacyLedger(dp))


# ----------------------------------------------------------- secure aggregation


#: Errors that abort a secure round cleanly (the round is recorded with the cause).
SECURE_ROUND_ABORTS: tuple[type[Exception], ...] = (RoundAbortedError, ValueError)


class SecureAggregation:
    """The server half of a secure-aggregation protocol: the sum of held uploads."""

    protocol: str

    def roles(self) -> list[Role]:
        """Participants besides the clients that the protocol needs (none by default)."""
        return []

    def secure_sum(
        self, rnd: int, client_ids: Sequence[int], length: int, exchange: Exchange
    ) -> SecureSum:
        raise NotImplementedError

    def run(
        self, rnd: int, client_ids: list[int], length: int, exchange: Exchange
    ) -> SecureSumOutcome:
        """The round's secure sum; an abort (too many dropouts, no key holder) is an
        outcome with its cause, never an exception, so the round is recorded."""
        try:
            result = self.secure_sum(rnd, client_ids, length, exchange)
        except SECURE_ROUND_ABORTS as err:  # HERoundAbortedError is a ValueError
            log.warning("round %d: secure aggregation aborted: %s", rnd, err)
            return SecureSumOutcome(
                total=None,
                contributors=(),
                bytes_up=getattr(err, "bytes_up", 0),
                bytes_down=getattr(err, "bytes_down", 0),
                aborted=str(err),
            )
        return SecureSumOutcome(
            total=result.sum,
            contributors=tuple(result.contributors),
            bytes_up=result.bytes_up,
            bytes_down=result.bytes_down,
        )


class SecAggPlus(SecureAggregation):
    """SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020); see :mod:`fedloom.privacy.secagg`."""

    protocol = "secagg"

    def __init__(self, *, clip_range: float, quantization_bits: int, dp: CentralDP | None):
        self.clip_range = clip_range
        self.quantization_bits = quantization_bits
        self.dp = dp

    def secure_sum(
        self, rnd: int, client_ids: Sequence[int], length: int, exchange: Exchange
    ) -> SecureSum:
        # Coordinates are clipped to the central-DP clipping norm when there is one (an
        # L2-clipped vector has no larger coordinate, so nothing more is lost).
        config = SecAggConfig(
            clip_range=self.dp.clip_norm if self.dp is not None else self.clip_range,
            quantization_bits=self.quantization_bits,
        )
        limit = secagg_message_limit(length)

        def stage_exchange(stage: Stage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
            request = ExchangeRequest(
                protocol=self.protocol, round=rnd, stage=STAGES.index(stage), reply_limit=limit
            )
            return exchange(request, outgoing)

        return serve_secagg_round(client_ids, length, config, stage_exchange)


class CKKSAggregation(SecureAggregation):
    """CKKS homomorphic aggregation (TenSEAL); see :mod:`fedloom.privacy.he_protocol`.

    In simulation the key holder runs in this process (``key_holder_in_process``); in a
    deployment it is its own participant, the role ``key-holder``.
    """

    protocol = "he"

    def __init__(self, *, key_holder_in_process: bool) -> None:
        self.key_holder_in_process = key_holder_in_process
        self._key_holder: Any = None

    def roles(self) -> list[Role]:
        if self.key_holder_in_process:
            return []
        return [Role(name="key-holder", participant_id=KEY_HOLDER_ID)]

    def secure_sum(
        self, rnd: int, client_ids: Sequence[int], length: int, exchange: Exchange
    ) -> SecureSum:
        from fedloom.privacy.he_protocol import (
            HE_STAGES,
            HEKeyHolderParticipant,
            HEStage,
            reply_limit,
            serve_he_round,
        )

        if self.key_holder_in_process and self._key_holder is None:
            # The simulated key holder releases sums of any size: the simulation is one party.
            self._key_holder = HEKeyHolderParticipant(min_contributors=1)
        public: list[bytes] = []

        def stage_exchange(stage: HEStage, outgoing: Mapping[int, bytes]) -> dict[int, bytes]:
            replies: dict[int, bytes] = {}
            remote = dict(outgoing)
            if self._key_holder is not None and KEY_HOLDER_ID in remote:
                try:
                    replies[KEY_HOLDER_ID] = self._key_holder.respond(
                        stage, remote.pop(KEY_HOLDER_ID)
                    )
                except ValueError as err:
                    log.warning("ckks %s: the key holder did not answer: %s", stage, err)
            if remote:
                limit = reply_limit(stage, length, public[0] if public else None)
                request = ExchangeRequest(
                    protocol=self.protocol,
                    round=rnd,
                    stage=HE_STAGES.index(stage),
                    reply_limit=limit,
                )
                replies.update(exchange(request, remote))
            if stage is HEStage.KEYGEN and KEY_HOLDER_ID in replies:
                public.append(replies[KEY_HOLDER_ID])
            return replies

        return serve_he_round(rnd, client_ids, length, stage_exchange)


@SECURE_AGGREGATIONS.register("secagg+")
def make_secagg_plus(settings: PrivacyConfig, dp: CentralDP | None, in_process: bool) -> Any:
    return SecAggPlus(
        clip_range=settings.secagg_clip_range,
        quantization_bits=settings.secagg_quantization_bits,
        dp=dp,
    )


@SECURE_AGGREGATIONS.register("ckks")
def make_ckks(settings: PrivacyConfig, dp: CentralDP | None, in_process: bool) -> Any:
    return CKKSAggregation(key_holder_in_process=in_process)


# ------------------------------------------------------ client-side participants


class _SecAggClientSide:
    def __init__(self, participant_id: int, held: np.ndarray) -> None:
        self.inner = SecAggParticipant(participant_id, held)

    def respond(self, stage: int, payload: bytes) -> bytes:
        return self.inner.respond(STAGES[stage], payload)

    def finished(self, stage: int) -> bool:
        return STAGES[stage] is Stage.UNMASKING


class _CKKSClientSide:
    def __init__(self, held: np.ndarray) -> None:
        self.held = held

    def respond(self, stage: int, payload: bytes) -> bytes:
        from fedloom.privacy.he_protocol import HE_STAGES, HEStage, encrypt_for_round

        if HE_STAGES[stage] is not HEStage.ENCRYPT:
            raise ValueError(f"a client does not answer the CKKS {HE_STAGES[stage]} stage")
        return encrypt_for_round(self.held, payload)

    def finished(self, stage: int) -> bool:
        return True


class KeyHolderSide:
    """The CKKS key holder as a participant (its own process in a deployment)."""

    def __init__(self, min_contributors: int = 2) -> None:
        from fedloom.privacy.he_protocol import HEKeyHolderParticipant

        self.inner = HEKeyHolderParticipant(min_contributors=min_contributors)

    def respond(self, stage: int, payload: bytes) -> bytes:
        from fedloom.privacy.he_protocol import HE_STAGES

        return self.inner.respond(HE_STAGES[stage], payload)

    def finished(self, stage: int) -> bool:
        return False


@PROTOCOL_PARTICIPANTS.register("secagg")
def make_secagg_participant(*, participant_id: int, held: np.ndarray | None) -> Any:
    if held is None:
        raise ValueError("no update held for secure aggregation")
    return _SecAggClientSide(participant_id, held)


@PROTOCOL_PARTICIPANTS.register("he")
def make_ckks_participant(*, participant_id: int, held: np.ndarray | None) -> Any:
    if held is None:
        raise ValueError("no update held for CKKS aggregation")
    return _CKKSClientSide(held)
