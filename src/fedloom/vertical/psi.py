"""Entity alignment by private set intersection: Diffie–Hellman PSI.

The classic commutative-encryption PSI (Meadows 1986; Huberman, Franklin and Hogg 1999,
"Enhancing privacy and trust in electronic communities", Section 3): every id is hashed
into a prime-order group and raised to each party's secret exponent. Because
(H(x)^a)^b = (H(x)^b)^a, two parties holding X and Y find X ∩ Y by comparing doubly
blinded values, and under the decisional Diffie–Hellman assumption (with H a random
oracle) a singly or doubly blinded value of an id outside the intersection reveals
nothing about it. Both parties learn the intersection and the other's set size; this is
the semi-honest model (a party that follows the protocol).

The group is the order-q subgroup of quadratic residues modulo the 2048-bit safe prime
p = 2q + 1 of RFC 3526 (MODP group 14). Hash to group: SHAKE-256 of the id (from
``cryptography``'s hash primitives) expanded to 2304 bits, reduced mod p and squared,
which lands in the quadratic residues. Exponents are 256-bit random numbers (short
exponents, as RFC 7919 Section 5.2 sizes them for 2048-bit groups: at least twice the
security level), drawn with :mod:`secrets`; exponentiation is Python's ``pow``. There is
no elliptic-curve or hash-to-curve code here.

With more than two parties the leader (the label party) runs the two-party protocol with
each feature party in turn on what is left of its own set, then tells every feature party
which of its own rows are in the final intersection. Everyone learns the ids common to
all; a feature party also learns the size of what the leader held when they met, and
the leader learns, per feature party, which of its remaining ids that party holds (the
pairwise intersection, a superset of the final one). Feature parties never exchange
anything with each other.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

#: RFC 3526, Section 3: the 2048-bit MODP group's prime,
#: p = 2^2048 − 2^1984 − 1 + 2^64 · (⌊2^1918 π⌋ + 124476). ``tests/test_vertical_psi.py``
#: recomputes it from that formula and checks that p and (p − 1)/2 are prime.
MODP_2048 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
#: Bytes of one group element on the wire.
ELEMENT_BYTES = (MODP_2048.bit_length() + 7) // 8
#: Bits of a party's secret exponent (RFC 7919, Section 5.2: ≥ 225 for 2048-bit groups).
EXPONENT_BITS = 256
#: Domain separation for the hash to the group, so ids hashed elsewhere never collide.
_HASH_DOMAIN = b"fedloom-psi-v1/"


def hash_to_group(item: str, p: int = MODP_2048) -> int:
    """A quadratic residue mod ``p`` determined by ``item`` (random-oracle model).

    128 extra bits before the reduction make the result's bias mod p negligible;
    squaring maps Z_p^* onto the subgroup of prime order (p − 1)/2.
    """
    h = hashes.Hash(hashes.SHAKE256((p.bit_length() + 128 + 7) // 8))
    h.update(_HASH_DOMAIN + item.encode("utf-8"))
    x = int.from_bytes(h.finalize(), "big") % p
    if x == 0:  # probability ~2^-2048; keep the element inside the group anyway
        x = 1
    return pow(x, 2, p)


class PsiParty:
    """One party's half of the protocol: its ids and its secret exponent.

    The exponent never leaves the object; only blinded group elements do.
    """

    def __init__(self, ids: Sequence[str], *, p: int = MODP_2048) -> None:
        if len(set(ids)) != len(ids):
            raise ValueError("a party's id list has duplicates; ids must identify records")
        self.ids = list(ids)
        self.p = p
        self._secret = secrets.randbits(EXPONENT_BITS) | 1  # never 0
        self.pows = 0

    def _exp(self, x: int) -> int:
        self.pows += 1
        return pow(x, self._secret, self.p)

    def blind_own(self, ids: Sequence[str] | None = None) -> list[int]:
        """H(x)^a for this party's ids (or a subset), in the order given."""
        return [self._exp(hash_to_group(i, self.p)) for i in (self.ids if ids is None else ids)]

    def blind_theirs(self, values: Sequence[int]) -> list[int]:
        """(their blinded values)^a, in their order; checks each is a group element."""
        out = []
        for v in values:
            if not 1 < v < self.p - 1:
                raise ValueError("a PSI message holds a value outside the group")
            out.append(self._exp(v))
        return out


@dataclass(frozen=True, kw_only=True)
class PsiReport:
    """What an alignment cost and found."""

    intersection_size: int
    set_sizes: list[int]
    bytes_exchanged: int
    messages: int
    exponentiations: int
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return {
            "method": "dh-psi (RFC 3526 MODP-2048, 256-bit exponents)",
            "intersection_size": self.intersection_size,
            "set_sizes": self.set_sizes,
            "bytes_exchanged": self.bytes_exchanged,
            "messages": self.messages,
            "exponentiations": self.exponentiations,
            "seconds": self.seconds,
        }


class _Wire:
    """Counts what crosses between parties (group elements, index lists)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.messages = 0

    def elements(self, values: list[int]) -> list[int]:
        self.bytes += ELEMENT_BYTES * len(values)
        self.messages += 1
        return list(values)

    def indices(self, values: list[int]) -> list[int]:
        self.bytes += 4 * len(values)
        self.messages += 1
        return list(values)


def two_party_psi(
    a: PsiParty, b: PsiParty, wire: _Wire, a_ids: Sequence[str]
) -> list[tuple[int, int]]:
    """Pairs (position in ``a_ids``, position in ``b.ids``) of the ids both hold.

    1. A → B: H(x)^a for x in ``a_ids`` (a subset of A's ids).  2. B → A: (H(x)^a)^b in
    A's order, and H(y)^b in B's order.  3. A computes (H(y)^b)^a and matches the doubly
    blinded values: equal values are the same id (up to a negligible hash collision).
    """
    to_b = wire.elements(a.blind_own(a_ids))
    double_a = wire.elements(b.blind_theirs(to_b))
    single_b = wire.elements(b.blind_own())
    where_b = {v: j for j, v in enumerate(a.blind_theirs(single_b))}
    return [(i, where_b[v]) for i, v in enumerate(double_a) if v in where_b]


def align(parties: Sequence[PsiParty]) -> tuple[list[str], list[list[int]], PsiReport]:
    """The ids every party holds, and each party's row positions in a common order.

    ``parties[0]`` leads (in vertical FL, the label party): it runs the two-party
    protocol with each follower on what is left of its own set, then sends each
    follower the positions, in the follower's own list, of the final common ids (4 bytes
    each; step 4). Returns the common ids in the leader's order, each party's positions
    of them, and the report. No party sees another's plain ids.
    """
    if len(parties) < 2:
        raise ValueError("private set intersection needs at least two parties")
    started = time.perf_counter()
    wire = _Wire()
    leader = parties[0]
    remaining = list(range(len(leader.ids)))  # leader's rows still common to all so far
    follower_rows: list[dict[int, int]] = []  # leader row → follower row, per follower
    for follower in parties[1:]:
        pairs = two_party_psi(leader, follower, wire, [leader.ids[r] for r in remaining])
        follower_rows.append({remaining[i]: j for i, j in pairs})
        remaining = [remaining[i] for i, _ in pairs]
    positions = [remaining]
    for rows in follower_rows:
        positions.append(wire.indices([rows[r] for r in remaining]))
    report = PsiReport(
        intersection_size=len(remaining),
        set_sizes=[len(p.ids) for p in parties],
        bytes_exchanged=wire.bytes,
        messages=wire.messages,
        exponentiations=sum(p.pows for p in parties),
        seconds=time.perf_counter() - started,
    )
    return [leader.ids[r] for r in remaining], positions, report
