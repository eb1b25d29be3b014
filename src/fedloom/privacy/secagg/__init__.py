"""Secure aggregation: the server learns the sum of the clients' updates and nothing else.

This package implements SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS: SecAgg+), the sparse-graph version of the
protocol of Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS, Fig. 4, rounds 0-4; round 3, the consistency check, is omitted
because it only matters against an active server). Each client masks its quantized
update with a self mask PRG(b_u) and with pairwise masks PRG(s_uv) agreed by X25519
with its k neighbours in a public random k-regular graph; pairwise masks cancel in the
sum, and Shamir shares of b_u and s_u held by the neighbours let the server remove the
masks of clients that drop out at any stage.

Engine-neutral: :class:`SecAggClient` and :class:`SecAggServer` are pure state
machines that consume and produce the dataclass messages of :mod:`.messages`, each
with an explicit ``to_bytes`` / ``from_bytes`` wire format. One stage loop drives the
server (:func:`.transport.serve_stages`): the engines reach it through
:func:`.transport.serve_secagg_round`, in memory or over gRPC, and
:func:`run_secagg_round` (tests, benchmarks) adds scripted dropouts, a message hook and
cost counters around it.

Threat model (the semi-honest setting of both papers' security analyses):

- The server is honest-but-curious: it follows the protocol but tries to learn from
  everything it sees. It may collude with some clients. With the complete graph
  (``degree = n - 1``) the inputs of honest clients stay hidden from the server plus up
  to t - 1 colluding clients. With SecAgg+ the threshold is per neighbourhood: security
  holds while no client's neighbourhood contains t colluders; Bell et al. show that a
  random graph of degree k = O(log n) and t a suitable fraction of k ensure this with
  overwhelming probability when a small constant fraction of clients is corrupt (and
  correctness when a small constant fraction drops out). The default t is a strict
  majority of the k neighbours.
- What the server learns: the sum of the inputs of the clients whose masked input
  arrived (``contributors``), how many they were, and which clients dropped at which
  stage. Never an individual update: it only ever receives masked vectors, and it
  refuses masked inputs that arrive after unmasking began, and unmask responses that
  reveal shares other than those requested, so it never holds both b_u and s_u.
- Not covered: an actively malicious server (it could lie about dropouts to different
  clients, or bias the graph through the round seed it broadcasts), and client
  authentication, which is the transport's job (TLS and client tokens in deployment).
- Secrets are 255-bit field elements and 256-bit keys drawn from ``os.urandom`` fresh
  in every round; shares travel AES-GCM-encrypted and bound to (round, sender, receiver).

Composition with central differential privacy: the result is the unmasked, dequantized
float32 SUM and the number of contributors. The caller clips updates (L2) before they
enter secure aggregation and adds central noise to the returned sum afterwards; secure
aggregation adds no noise, only a quantization error of at most half a step per
client and coordinate with deterministic rounding.
"""

from fedloom.privacy.secagg.client import SecAggClient
from fedloom.privacy.secagg.config import STAGES, SecAggConfig, Stage
from fedloom.privacy.secagg.driver import SecAggRoundResult, run_secagg_round
from fedloom.privacy.secagg.errors import (
    MessageFormatError,
    ProtocolViolationError,
    QuantizationOverflowError,
    RoundAbortedError,
    SecAggError,
    ShareAuthenticationError,
)
from fedloom.privacy.secagg.graph import NeighbourGraph, default_degree, default_threshold
from fedloom.privacy.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    KeyBroadcast,
    MaskedInput,
    Message,
    PublicKeys,
    RevealedShare,
    RoundSetup,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
)
from fedloom.privacy.secagg.server import SecAggResult, SecAggServer

__all__ = [
    "STAGES",
    "AdvertiseKeys",
    "EncryptedShare",
    "KeyBroadcast",
    "MaskedInput",
    "Message",
    "MessageFormatError",
    "NeighbourGraph",
    "ProtocolViolationError",
    "PublicKeys",
    "QuantizationOverflowError",
    "RevealedShare",
    "RoundAbortedError",
    "RoundSetup",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggResult",
    "SecAggRoundResult",
    "SecAggServer",
    "ShareAuthenticationError",
    "ShareBundle",
    "ShareKeys",
    "Stage",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_message",
    "default_degree",
    "default_threshold",
    "run_secagg_round",
]
