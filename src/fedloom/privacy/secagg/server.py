"""The server's side of one SecAgg+ round, as a message-in / message-out state machine.

The server relays keys and encrypted shares, adds up masked inputs, and at the end
removes the masks (Bonawitz et al. 2017, Fig. 4, server steps of rounds 0-4; SecAgg+
neighbourhoods of Bell et al. 2020):

- for every client u whose masked input arrived (U3), it reconstructs the self-mask
  seed b_u from t of u's neighbours' b-shares and subtracts PRG(b_u);
- for every client v that shared keys but sent no input (U2 minus U3), it reconstructs
  v's pairwise private key s_v from t s-shares, checks it against v's advertised public
  key, and removes the pairwise masks v's surviving neighbours added for v.

It never receives an unmasked update: its only vector input is :class:`MaskedInput`,
which it folds into a running masked sum and discards. Masked inputs that arrive after
unmask requests went out are refused, and each unmask response must reveal exactly
the b-shares of survivors and the s-shares of dropouts that were asked for, so no
client's two secrets are ever both reconstructed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum, auto

import numpy as np

from fedloom.privacy.secagg import crypto, prg, quantize, ring, shamir
from fedloom.privacy.secagg.config import SecAggConfig, Stage
from fedloom.privacy.secagg.errors import ProtocolViolationError, RoundAbortedError
from fedloom.privacy.secagg.graph import NeighbourGraph, default_degree, default_threshold
from fedloom.privacy.secagg.messages import (
    GRAPH_SEED_BYTES,
    AdvertiseKeys,
    EncryptedShare,
    KeyBroadcast,
    MaskedInput,
    PublicKeys,
    RevealedShare,
    RoundSetup,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedloom.privacy.secagg.randomness import SYSTEM_ENTROPY, Entropy


@dataclass(frozen=True)
class SecAggResult:
    """What the server learns: the sum of the contributors' inputs and who dropped when.

    ``sum`` is the dequantized float32 sum over ``contributors`` (the clients whose masked
    input arrived). To compose with central differential privacy, the caller adds noise
    to this sum (calibrated to its own clipping) and divides by ``num_contributors``
    afterwards; secure aggregation itself adds no noise. ``quantized_sum`` is the exact
    integer sum that ``sum`` dequantizes. ``dropped_at`` maps each stage to the clients
    that first failed to send at that stage.
    """

    sum: np.ndarray
    quantized_sum: np.ndarray
    num_contributors: int
    contributors: tuple[int, ...]
    dropped_at: dict[Stage, tuple[int, ...]]


class _Phase(Enum):
    KEYS = auto()
    SHARES = auto()
    INPUTS = auto()
    UNMASKING = auto()
    DONE = auto()


class SecAggServer:
    """The server of one round over ``client_ids``, aggregating vectors of ``vector_length``."""

    def __init__(
        self,
        client_ids: Sequence[int],
        vector_length: int,
        config: SecAggConfig | None = None,
        *,
        entropy: Entropy = SYSTEM_ENTROPY,
    ) -> None:
        config = config or SecAggConfig()
        ids = tuple(sorted(set(client_ids)))
        if len(ids) != len(client_ids):
            raise ValueError("client ids must be distinct")
        if vector_length < 1:
            raise ValueError(f"vector_length must be positive, got {vector_length}")
        degree = config.degree or default_degree(len(ids))
        threshold = config.threshold or default_threshold(degree)
        if threshold > degree:
            raise ValueError(f"threshold {threshold} exceeds the degree {degree}")
        quantize.check_sum_fits(len(ids), config.quantization_bits, config.modulus_bits)
        self._min_clients = config.min_clients or threshold
        if self._min_clients > len(ids):
            raise ValueError(f"min_clients {self._min_clients} exceeds the {len(ids)} clients")
        self.setup = RoundSetup(
            round_id=entropy(crypto.ROUND_ID_BYTES),
            graph_seed=entropy(GRAPH_SEED_BYTES),
            client_ids=ids,
            degree=degree,
            threshold=threshold,
            vector_length=vector_length,
            clip_range=config.clip_range,
            quantization_bits=config.quantization_bits,
            modulus_bits=config.modulus_bits,
            stochastic_rounding=config.rounding == "stochastic",
        )
        graph = NeighbourGraph.build(ids, degree, self.setup.graph_seed)
        self._neighbours = graph.adjacency()
        self._phase = _Phase.KEYS
        self._keys: dict[int, PublicKeys] = {}  # U1
        self._inbox: dict[int, list[EncryptedShare]] = {}
        self._shared: set[int] = set()  # U2
        self._masked: set[int] = set()  # U3
        self._masked_sum = np.zeros(vector_length, dtype=np.uint64)
        self._requests: dict[int, UnmaskRequest] = {}
        self._b_shares: dict[int, dict[int, int]] = {}  # owner -> holder -> share
        self._s_shares: dict[int, dict[int, int]] = {}
        self._answered: set[int] = set()  # U4

    @property
    def round_id(self) -> bytes:
        return self.setup.round_id

    def neighbours(self, client_id: int) -> frozenset[int]:
        """The client's neighbours in this round's public graph."""
        return self._neighbours[client_id]

    # -- round 0 ---------------------------------------------------------------------------
    def receive_advertise_keys(self, message: AdvertiseKeys) -> None:
        self._expect(_Phase.KEYS, "AdvertiseKeys")
        sender = message.keys.client_id
        self._check_sender(message.round_id, sender, self.setup.client_ids, self._keys)
        for key in (message.keys.c_public, message.keys.s_public):
            if len(key) != crypto.PUBLIC_KEY_BYTES:
                raise ProtocolViolationError(f"client {sender} sent a malformed public key")
        self._keys[sender] = message.keys

    def broadcast_keys(self) -> dict[int, KeyBroadcast]:
        """Close round 0: each client that advertised gets its advertised neighbours' keys."""
        self._expect(_Phase.KEYS, "the end of round 0")
        advertised = set(self._keys)
        self._require(Stage.ADVERTISE_KEYS, advertised, advertised, self._counter(advertised))
        self._phase = _Phase.SHARES
        return {
            u: KeyBroadcast(
                self.round_id, u, tuple(self._keys[v] for v in sorted(self._live(u, advertised)))
            )
            for u in sorted(advertised)
        }

    # -- round 1 ---------------------------------------------------------------------------
    def receive_share_keys(self, message: ShareKeys) -> None:
        self._expect(_Phase.SHARES, "ShareKeys")
        sender = message.sender
        self._check_sender(message.round_id, sender, self._keys, self._shared)
        receivers = [entry.receiver for entry in message.shares]
        expected = self._live(sender, set(self._keys))
        if len(set(receivers)) != len(receivers) or set(receivers) != expected:
            raise ProtocolViolationError(
                f"client {sender} must send exactly one share to each of its "
                f"{len(expected)} neighbours that advertised keys"
            )
        if any(entry.sender != sender for entry in message.shares):
            raise ProtocolViolationError(f"client {sender} sent a share in another client's name")
        for entry in message.shares:
            self._inbox.setdefault(entry.receiver, []).append(entry)
        self._shared.add(sender)

    def route_shares(self) -> dict[int, ShareBundle]:
        """Close round 1: forward to each client that shared the shares addressed to it."""
        self._expect(_Phase.SHARES, "the end of round 1")
        shared = self._shared
        self._require(Stage.SHARE_KEYS, shared, shared, self._counter(shared))
        inbox, self._inbox = self._inbox, {}
        self._phase = _Phase.INPUTS
        return {
            v: ShareBundle(
                self.round_id, v, tuple(sorted(inbox.get(v, []), key=lambda e: e.sender))
            )
            for v in sorted(shared)
        }

    # -- round 2 ---------------------------------------------------------------------------
    def receive_masked_input(self, message: MaskedInput) -> None:
        if self._phase in (_Phase.UNMASKING, _Phase.DONE):
            raise ProtocolViolationError(
                f"masked input from client {message.sender} arrived after unmasking began; "
                "refused (its neighbours may already have revealed its pairwise key)"
            )
        self._expect(_Phase.INPUTS, "MaskedInput")
        self._check_sender(message.round_id, message.sender, self._shared, self._masked)
        setup = self.setup
        vector = ring.decode(message.vector, setup.vector_length, setup.modulus_bits)
        self._masked_sum += vector  # wraps modulo 2^64, hence modulo 2^k
        self._masked.add(message.sender)

    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        """Close round 2: ask each contributor for the shares of its neighbours."""
        self._expect(_Phase.INPUTS, "the end of round 2")
        masked, dropped = self._masked, self._shared - self._masked
        needing = masked | {v for v in dropped if self._live(v, masked)}
        self._require(Stage.MASKED_INPUT, masked, needing, self._counter(masked))
        self._requests = {
            u: UnmaskRequest(
                self.round_id,
                u,
                tuple(sorted(self._live(u, masked))),
                tuple(sorted(self._live(u, dropped))),
            )
            for u in sorted(masked)
        }
        self._phase = _Phase.UNMASKING
        return dict(self._requests)

    # -- round 4 ---------------------------------------------------------------------------
    def receive_unmask_response(self, message: UnmaskResponse) -> None:
        self._expect(_Phase.UNMASKING, "UnmaskResponse")
        sender = message.sender
        self._check_sender(message.round_id, sender, self._requests, self._answered)
        request = self._requests[sender]
        self._check_reveal(sender, message.self_mask_shares, request.survivors, "self-mask")
        self._check_reveal(sender, message.pairwise_key_shares, request.dropped, "pairwise-key")
        for store, group in (
            (self._b_shares, message.self_mask_shares),
            (self._s_shares, message.pairwise_key_shares),
        ):
            for entry in group:
                store.setdefault(entry.owner, {})[sender] = _decode(entry, sender)
        self._answered.add(sender)

    def finalize(self) -> SecAggResult:
        """Close round 4: reconstruct the secrets, remove every mask, return the sum."""
        self._expect(_Phase.UNMASKING, "the end of round 4")
        dropped = self._shared - self._masked
        needs_s = {v for v in dropped if self._live(v, self._masked)}

        def shares_of(owner: int) -> int:
            store = self._b_shares if owner in self._masked else self._s_shares
            return len(store.get(owner, {}))

        self._require(Stage.UNMASKING, self._answered, self._masked | needs_s, shares_of)
        total = self._masked_sum.copy()
        for u in sorted(self._masked):
            total -= self._expand(
                crypto.self_mask_seed(self._recover(self._b_shares[u]), self.round_id)
            )
        for v in sorted(needs_s):
            total = self._remove_pairwise_masks(total, v)
        self._phase, self._masked_sum = _Phase.DONE, np.zeros(0, dtype=np.uint64)
        return self._result(total)

    # -- helpers ---------------------------------------------------------------------------
    def _remove_pairwise_masks(self, total: np.ndarray, dropped: int) -> np.ndarray:
        pair = crypto.keypair_from_secret(self._recover(self._s_shares[dropped]))
        if pair.public != self._keys[dropped].s_public:
            raise ProtocolViolationError(
                f"the pairwise key reconstructed for client {dropped} does not match the public "
                "key it advertised (a corrupted share)"
            )
        for w in sorted(self._live(dropped, self._masked)):
            seed = crypto.pairwise_mask_seed(pair.private, self._keys[w].s_public, self.round_id)
            mask = self._expand(seed)
            # w added +mask if w < dropped, else -mask; undo exactly that.
            total = total - mask if w < dropped else total + mask
        return total

    def _recover(self, shares: dict[int, int]) -> int:
        holders = sorted(shares)[: self.setup.threshold]
        return shamir.reconstruct({shamir.share_point(h): shares[h] for h in holders})

    def _expand(self, seed: bytes) -> np.ndarray:
        return prg.expand(seed, self.setup.vector_length, self.setup.modulus_bits)

    def _result(self, total: np.ndarray) -> SecAggResult:
        setup = self.setup
        quantized_sum = ring.centred_lift(total, setup.modulus_bits)
        stages = (
            (Stage.ADVERTISE_KEYS, set(setup.client_ids), set(self._keys)),
            (Stage.SHARE_KEYS, set(self._keys), self._shared),
            (Stage.MASKED_INPUT, self._shared, self._masked),
            (Stage.UNMASKING, self._masked, self._answered),
        )
        return SecAggResult(
            sum=quantize.dequantize(quantized_sum, setup.clip_range, setup.quantization_bits),
            quantized_sum=quantized_sum,
            num_contributors=len(self._masked),
            contributors=tuple(sorted(self._masked)),
            dropped_at={stage: tuple(sorted(before - after)) for stage, before, after in stages},
        )

    def _counter(self, alive: set[int]) -> Callable[[int], int]:
        return lambda u: len(self._live(u, alive))

    def _live(self, client: int, alive: set[int]) -> set[int]:
        return set(self._neighbours[client] & alive)

    def _require(
        self,
        stage: Stage,
        survivors: set[int],
        needing: Iterable[int],
        count: Callable[[int], int],
    ) -> None:
        """Abort unless enough clients survive and every needed client keeps t helpers.

        ``count(u)`` is how many of u's neighbours can still help reconstruct u's secret.
        """
        if len(survivors) < self._min_clients:
            raise RoundAbortedError(
                stage, len(survivors), self._min_clients, of=len(self.setup.client_ids)
            )
        t = self.setup.threshold
        for u in sorted(needing):
            survived = count(u)
            if survived < t:
                raise RoundAbortedError(stage, survived, t, client=u, of=len(self._neighbours[u]))

    def _check_reveal(
        self, sender: int, group: Sequence[RevealedShare], asked: Sequence[int], kind: str
    ) -> None:
        owners = [entry.owner for entry in group]
        if len(set(owners)) != len(owners) or set(owners) != set(asked):
            raise ProtocolViolationError(
                f"server refuses client {sender}'s unmask response: its {kind} shares are not "
                "exactly those requested (mixing share kinds could reveal both secrets)"
            )

    def _check_sender(
        self, round_id: bytes, sender: int, allowed: Iterable[int], seen: Iterable[int]
    ) -> None:
        if round_id != self.round_id:
            raise ProtocolViolationError(f"message from client {sender} belongs to another round")
        if sender not in allowed:
            raise ProtocolViolationError(f"client {sender} is not expected at this stage")
        if sender in seen:
            raise ProtocolViolationError(f"client {sender} already sent this stage's message")

    def _expect(self, phase: _Phase, what: str) -> None:
        if self._phase is not phase:
            raise ProtocolViolationError(
                f"server cannot take {what} in phase {self._phase.name.lower()}"
            )


def _decode(entry: RevealedShare, sender: int) -> int:
    try:
        return shamir.decode_share(entry.share)
    except ValueError as exc:
        raise ProtocolViolationError(f"client {sender} revealed a malformed share: {exc}") from exc
