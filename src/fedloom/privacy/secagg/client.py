"""The client's side of one SecAgg+ round, as a message-in / message-out state machine.

Rounds follow Bonawitz et al. 2017, Fig. 4 (honest-but-curious variant), restricted to
the client's neighbours in the SecAgg+ graph of Bell et al. 2020:

0. :meth:`SecAggClient.advertise_keys`: fresh X25519 pairs (c for share encryption,
   s for pairwise masks); send both public keys.
1. :meth:`SecAggClient.share_keys`: draw the self-mask seed b_u; Shamir-share b_u and the
   s private key t-of-k among the neighbours that advertised keys; seal each pair of
   shares with AES-GCM under the c-key agreed with that neighbour.
2. :meth:`SecAggClient.masked_input`: authenticate and keep the shares received; send
   y_u = q(x_u) + PRG(b_u) + Σ_{v>u} PRG(s_uv) - Σ_{v<u} PRG(s_uv)  (mod 2^k) over the
   neighbours v that shared keys.
4. :meth:`SecAggClient.unmask`: for each neighbour, reveal the b-share if the server
   says it survived and the s-share if it dropped, never both: the client answers one
   survivor set per round and refuses any request that contradicts it.

One object serves one round; a new round needs a new client object, so keys, seeds and
nonces are never reused.
"""

from __future__ import annotations

from collections.abc import Set
from enum import Enum, auto

import numpy as np

from fedloom.privacy.secagg import crypto, prg, quantize, ring, shamir
from fedloom.privacy.secagg.config import Rounding, SecAggConfig, Stage
from fedloom.privacy.secagg.errors import (
    ProtocolViolationError,
    RoundAbortedError,
    ShareAuthenticationError,
)
from fedloom.privacy.secagg.graph import NeighbourGraph
from fedloom.privacy.secagg.messages import (
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
from fedloom.privacy.secagg.randomness import SYSTEM_ENTROPY, Entropy, random_below


class _Phase(Enum):
    NEW = auto()
    ADVERTISED = auto()
    SHARED = auto()
    MASKED = auto()
    UNMASKED = auto()


class SecAggClient:
    """One client in one round. Holds its secrets; never sends its unmasked update."""

    def __init__(
        self,
        client_id: int,
        *,
        entropy: Entropy = SYSTEM_ENTROPY,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.client_id = client_id
        self._entropy = entropy
        self._rng = rng
        self._phase = _Phase.NEW
        self._peers: dict[int, PublicKeys] = {}
        self._held: dict[int, tuple[int, int]] = {}  # neighbour -> (s-share, b-share)
        self._self_mask: int | None = None
        self._answer: tuple[frozenset[int], frozenset[int], UnmaskResponse] | None = None

    # -- round 0 ---------------------------------------------------------------------------
    def advertise_keys(self, setup: RoundSetup) -> AdvertiseKeys:
        self._expect(_Phase.NEW, "RoundSetup")
        _validate_setup(setup, self.client_id)
        self._setup = setup
        graph = NeighbourGraph.build(setup.client_ids, setup.degree, setup.graph_seed)
        self._neighbours = graph.neighbours(self.client_id)
        self._c = crypto.generate_keypair(self._entropy)
        self._s = crypto.generate_keypair(self._entropy)
        self._phase = _Phase.ADVERTISED
        keys = PublicKeys(self.client_id, self._c.public, self._s.public)
        return AdvertiseKeys(setup.round_id, keys)

    # -- round 1 ---------------------------------------------------------------------------
    def share_keys(self, broadcast: KeyBroadcast) -> ShareKeys:
        self._expect(_Phase.ADVERTISED, "KeyBroadcast")
        self._check_addressing(broadcast.round_id, broadcast.recipient)
        peers = {entry.client_id: entry for entry in broadcast.keys}
        self._check_parties([e.client_id for e in broadcast.keys], self._neighbours)
        self._require_neighbours(Stage.SHARE_KEYS, len(peers))
        self._peers = peers
        self._self_mask = random_below(shamir.PRIME, self._entropy)
        t, xs = self._setup.threshold, [shamir.share_point(v) for v in sorted(peers)]
        s_shares = shamir.split(self._s.secret, t, xs, self._entropy)
        b_shares = shamir.split(self._self_mask, t, xs, self._entropy)
        sealed = tuple(
            self._seal_for(v, s_shares[shamir.share_point(v)], b_shares[shamir.share_point(v)])
            for v in sorted(peers)
        )
        self._phase = _Phase.SHARED
        return ShareKeys(self._setup.round_id, self.client_id, sealed)

    # -- round 2 ---------------------------------------------------------------------------
    def masked_input(self, bundle: ShareBundle, update: np.ndarray) -> MaskedInput:
        self._expect(_Phase.SHARED, "ShareBundle")
        self._check_addressing(bundle.round_id, bundle.recipient)
        senders = [entry.sender for entry in bundle.shares]
        self._check_parties(senders, set(self._peers))
        self._require_neighbours(Stage.MASKED_INPUT, len(senders))
        held = {entry.sender: self._open(entry) for entry in bundle.shares}
        vector = self._mask(update, sorted(held))
        self._held, self._self_mask = held, None  # b_u lives on only as shares
        self._phase = _Phase.MASKED
        return MaskedInput(self._setup.round_id, self.client_id, vector)

    # -- round 4 ---------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        if self._phase not in (_Phase.MASKED, _Phase.UNMASKED):
            self._expect(_Phase.MASKED, "UnmaskRequest")
        self._check_addressing(request.round_id, request.recipient)
        survivors, dropped = frozenset(request.survivors), frozenset(request.dropped)
        if self._answer is not None:
            return self._repeat_answer(survivors, dropped)
        self._check_partition(request, survivors, dropped)
        self._require_neighbours(Stage.UNMASKING, len(survivors))
        response = UnmaskResponse(
            self._setup.round_id,
            self.client_id,
            tuple(
                RevealedShare(v, shamir.encode_share(self._held[v][1])) for v in sorted(survivors)
            ),
            tuple(RevealedShare(v, shamir.encode_share(self._held[v][0])) for v in sorted(dropped)),
        )
        self._answer = (survivors, dropped, response)
        self._phase = _Phase.UNMASKED
        return response

    # -- helpers ---------------------------------------------------------------------------
    def _mask(self, update: np.ndarray, pair_peers: list[int]) -> bytes:
        setup = self._setup
        values = np.asarray(update)
        if values.shape != (setup.vector_length,):
            raise ValueError(
                f"update has shape {values.shape}, the round expects ({setup.vector_length},)"
            )
        rounding: Rounding = "stochastic" if setup.stochastic_rounding else "deterministic"
        q = quantize.quantize(
            values, setup.clip_range, setup.quantization_bits, rounding, self._generator()
        )
        bits, length, round_id = setup.modulus_bits, setup.vector_length, setup.round_id
        assert self._self_mask is not None
        y = ring.reduce(q, bits) + prg.expand(
            crypto.self_mask_seed(self._self_mask, round_id), length, bits
        )
        for v in pair_peers:
            seed = crypto.pairwise_mask_seed(self._s.private, self._peers[v].s_public, round_id)
            mask = prg.expand(seed, length, bits)
            y = y + mask if self.client_id < v else y - mask
        return ring.encode(y & ring.ring_mask(bits), bits)

    def _generator(self) -> np.random.Generator | None:
        if self._setup.stochastic_rounding and self._rng is None:
            self._rng = np.random.default_rng(int.from_bytes(self._entropy(32), "little"))
        return self._rng

    def _seal_for(self, receiver: int, s_share: int, b_share: int) -> EncryptedShare:
        round_id = self._setup.round_id
        key = crypto.share_key(self._c.private, self._peers[receiver].c_public, round_id)
        plaintext = shamir.encode_share(s_share) + shamir.encode_share(b_share)
        ad = crypto.share_associated_data(round_id, self.client_id, receiver)
        return EncryptedShare(
            self.client_id, receiver, crypto.seal(key, plaintext, ad, self._entropy)
        )

    def _open(self, entry: EncryptedShare) -> tuple[int, int]:
        if entry.receiver != self.client_id:
            raise ShareAuthenticationError(
                f"client {self.client_id} got a share addressed to client {entry.receiver}"
            )
        round_id = self._setup.round_id
        key = crypto.share_key(self._c.private, self._peers[entry.sender].c_public, round_id)
        ad = crypto.share_associated_data(round_id, entry.sender, self.client_id)
        try:
            plaintext = crypto.open_sealed(key, entry.ciphertext, ad)
        except ShareAuthenticationError as exc:
            raise ShareAuthenticationError(
                f"share from client {entry.sender} to client {self.client_id} failed "
                f"authentication in round {round_id.hex()} (tampered, replayed or misrouted)"
            ) from exc
        half = shamir.SHARE_BYTES
        return shamir.decode_share(plaintext[:half]), shamir.decode_share(plaintext[half:])

    def _check_partition(
        self, request: UnmaskRequest, survivors: frozenset[int], dropped: frozenset[int]
    ) -> None:
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise ProtocolViolationError("unmask request lists a client twice")
        if survivors & dropped:
            both = min(survivors & dropped)
            raise ProtocolViolationError(
                f"client {self.client_id} refuses to unmask: client {both} is listed both as "
                "surviving and as dropped (that would reveal both of its secrets)"
            )
        if survivors | dropped != set(self._held):
            raise ProtocolViolationError(
                f"client {self.client_id} refuses to unmask: the request does not partition "
                f"the {len(self._held)} neighbours whose shares it holds"
            )

    def _repeat_answer(self, survivors: frozenset[int], dropped: frozenset[int]) -> UnmaskResponse:
        assert self._answer is not None
        answered_survivors, answered_dropped, response = self._answer
        if (survivors, dropped) == (answered_survivors, answered_dropped):
            return response  # a retransmitted request gets the same answer
        flipped = (survivors & answered_dropped) | (dropped & answered_survivors)
        who = f"client {min(flipped)}" if flipped else "a different survivor set"
        raise ProtocolViolationError(
            f"client {self.client_id} refuses a second unmask request that contradicts the "
            f"first ({who}); answering it could reveal both secrets of a neighbour"
        )

    def _require_neighbours(self, stage: Stage, survived: int) -> None:
        if survived < self._setup.threshold:
            raise RoundAbortedError(
                stage,
                survived,
                self._setup.threshold,
                client=self.client_id,
                of=len(self._neighbours),
            )

    def _check_parties(self, listed: list[int], allowed: Set[int]) -> None:
        if len(set(listed)) != len(listed):
            raise ProtocolViolationError(f"message to client {self.client_id} lists a client twice")
        strangers = set(listed) - allowed
        if strangers:
            raise ProtocolViolationError(
                f"client {self.client_id} got material from client {min(strangers)}, which is "
                "not one of its neighbours in this round"
            )

    def _check_addressing(self, round_id: bytes, recipient: int) -> None:
        if round_id != self._setup.round_id:
            raise ProtocolViolationError(
                f"client {self.client_id} got a message for round {round_id.hex()}, "
                f"expected {self._setup.round_id.hex()}"
            )
        if recipient != self.client_id:
            raise ProtocolViolationError(
                f"client {self.client_id} got a message addressed to client {recipient}"
            )

    def _expect(self, phase: _Phase, what: str) -> None:
        if self._phase is not phase:
            raise ProtocolViolationError(
                f"client {self.client_id} cannot take a {what} in phase {self._phase.name.lower()}"
            )


def _validate_setup(setup: RoundSetup, client_id: int) -> None:
    if len(setup.round_id) != crypto.ROUND_ID_BYTES:
        raise ProtocolViolationError("round id must be 16 bytes")
    if client_id not in setup.client_ids:
        raise ProtocolViolationError(f"client {client_id} is not part of this round")
    if len(set(setup.client_ids)) != len(setup.client_ids):
        raise ProtocolViolationError("round setup lists a client twice")
    if setup.vector_length < 1:
        raise ProtocolViolationError("round setup has an empty vector")
    if not 1 <= setup.threshold <= setup.degree:
        raise ProtocolViolationError(
            f"threshold {setup.threshold} must be in [1, degree {setup.degree}]"
        )
    SecAggConfig(  # re-validates the numeric ranges
        clip_range=setup.clip_range,
        quantization_bits=setup.quantization_bits,
        modulus_bits=setup.modulus_bits,
    )
    quantize.check_sum_fits(len(setup.client_ids), setup.quantization_bits, setup.modulus_bits)
