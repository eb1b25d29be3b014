"""Key agreement (X25519), key derivation (HKDF-SHA256) and share encryption (AES-256-GCM).

Bonawitz et al. 2017 (Fig. 4, rounds 0-1) use Diffie-Hellman key agreement twice per
pair of clients: once for the key that encrypts secret shares (the "c" key pair) and
once for the seed of the pairwise mask (the "s" key pair). Every derived key goes
through HKDF-SHA256 with the round id as salt and a purpose label as info, so keys for
different purposes or rounds are independent even if an X25519 output repeated.

Shares travel through the server sealed with AES-256-GCM under a random 96-bit nonce;
the associated data binds (round id, sender, receiver), so a share replayed from
another round, or redirected to another receiver, fails authentication.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedloom.privacy.secagg import shamir
from fedloom.privacy.secagg.errors import ProtocolViolationError, ShareAuthenticationError
from fedloom.privacy.secagg.randomness import Entropy, random_below

PUBLIC_KEY_BYTES = 32
ROUND_ID_BYTES = 16
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

_LABEL = b"fedloom/secagg/v1/"
SHARE_ENCRYPTION = b"share-encryption"
PAIRWISE_MASK = b"pairwise-mask"
SELF_MASK = b"self-mask"


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair whose private key is a field element, so it can be Shamir-shared."""

    secret: int
    private: X25519PrivateKey
    public: bytes


def keypair_from_secret(secret: int) -> KeyPair:
    """The key pair whose private key is ``secret`` as 32 little-endian bytes."""
    private = X25519PrivateKey.from_private_bytes(secret.to_bytes(KEY_BYTES, "little"))
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return KeyPair(secret=secret, private=private, public=public)


def generate_keypair(entropy: Entropy) -> KeyPair:
    """A fresh key pair; the private key is uniform in GF(2^255 - 19)."""
    return keypair_from_secret(random_below(shamir.PRIME, entropy))


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret with a peer; refuses malformed or low-order public keys."""
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise ProtocolViolationError(f"an X25519 public key is 32 bytes, got {len(peer_public)}")
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # all-zero output: a low-order point
        raise ProtocolViolationError(f"unusable X25519 public key: {exc}") from exc


def derive_key(secret: bytes, round_id: bytes, purpose: bytes) -> bytes:
    """A 256-bit key for one purpose in one round: HKDF-SHA256(secret, salt=round id)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=round_id, info=_LABEL + purpose)
    return hkdf.derive(secret)


def self_mask_seed(b: int, round_id: bytes) -> bytes:
    """The PRG seed of the self mask PRG(b_u)."""
    return derive_key(shamir.encode_share(b), round_id, SELF_MASK)


def pairwise_mask_seed(private: X25519PrivateKey, peer_public: bytes, round_id: bytes) -> bytes:
    """The PRG seed s_uv shared by u and v (symmetric: both ends derive the same seed)."""
    return derive_key(agree(private, peer_public), round_id, PAIRWISE_MASK)


def share_key(private: X25519PrivateKey, peer_public: bytes, round_id: bytes) -> bytes:
    """The AES-256-GCM key for shares exchanged between two clients in one round."""
    return derive_key(agree(private, peer_public), round_id, SHARE_ENCRYPTION)


def share_associated_data(round_id: bytes, sender: int, receiver: int) -> bytes:
    """What a share ciphertext is bound to: protocol version, round, sender, receiver."""
    return _LABEL + b"share" + round_id + struct.pack(">QQ", sender, receiver)


def seal(key: bytes, plaintext: bytes, associated_data: bytes, entropy: Entropy) -> bytes:
    """``nonce || AES-GCM ciphertext || tag``."""
    nonce = entropy(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    """The plaintext of :func:`seal`; raises :class:`ShareAuthenticationError` otherwise."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ShareAuthenticationError("ciphertext is too short to authenticate")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise ShareAuthenticationError("ciphertext failed authentication") from exc
