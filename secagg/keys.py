"""Key material and the primitives the protocol uses, all from pycryptodome.

* X25519 key agreement (RFC 7748) for share encryption and pairwise masks;
* Ed25519 signatures (RFC 8032, pure EdDSA) for long-term identities;
* AES-256-GCM (NIST SP 800-38D) to encrypt Shamir shares between clients;
* HKDF-SHA256 (RFC 5869) for every derived key (see :func:`secagg.prg.derive_key`).

Private keys are generated from :mod:`secrets` (the OS CSPRNG) and never appear in ``repr``.
"""

from __future__ import annotations

import functools
import hmac
import secrets

from Crypto.Cipher import AES
from Crypto.Protocol.DH import import_x25519_private_key, import_x25519_public_key, key_agreement
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from secagg.errors import (
    ConfigurationError,
    DecryptionError,
    InvalidPublicKey,
    InvalidSignature,
)

__all__ = [
    "AEAD_NONCE",
    "AEAD_TAG_BYTES",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "AgreementKey",
    "IdentityKey",
    "aead_decrypt",
    "aead_encrypt",
    "check_agreement_key",
    "check_identity_key",
    "constant_time_equal",
    "random_seed",
    "verify_signature",
    "x25519_public",
]

PUBLIC_KEY_BYTES = 32
"""X25519 (RFC 7748 section 5) and Ed25519 (RFC 8032 section 5.1.5) public keys are 32 bytes."""

SIGNATURE_BYTES = 64
"""Ed25519 signatures are 64 bytes (RFC 8032 section 5.1.6)."""

AEAD_TAG_BYTES = 16
"""AES-GCM authentication tag length, the full 128 bits (SP 800-38D section 5.2.1.2)."""

AEAD_NONCE = bytes(12)
"""Every AES-GCM key is derived for one message only, so a fixed 96-bit nonce is safe."""

SEED_BYTES = 32
"""All seeds are 256-bit."""


_P25519 = 2**255 - 19
"""The field prime of Curve25519 (RFC 7748 section 4.1)."""

_SMALL_ORDER_U = frozenset(
    {
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P25519 - 1,
    }
)
"""Canonical u-coordinates of the points of order 1, 2, 4 and 8 on Curve25519 (the twist's
small-order points are the same u values): X25519 with any clamped scalar, a multiple of 8,
maps them to the all-zero output that RFC 7748 section 6.1 tells parties to check for. The
list is libsodium's blocklist less its non-canonical encodings (``p``, ``p + 1`` and the
high-bit variants), which :func:`check_agreement_key` refuses as non-canonical anyway."""


def check_agreement_key(public: bytes, *, client_id: int | None = None) -> None:
    """Refuse an X25519 public key that could not serve in an honest key agreement.

    Refused: a length other than 32; a set top bit or a u-coordinate ``>= 2^255 - 19``
    (non-canonical: RFC 7748 section 5 masks the bit and reduces, so two encodings would
    name one key, and pycryptodome never exports either); the five small-order
    u-coordinates, whose shared secret is all zero for every private key (RFC 7748
    section 6.1). An honest client's key never fails; a peer's key that does is its
    sender's fault, never a crash.

    Raises
    ------
    InvalidPublicKey
        Naming ``client_id`` and which rule the key breaks.
    """
    if len(public) != PUBLIC_KEY_BYTES:
        raise InvalidPublicKey(
            f"X25519 public keys are 32 bytes, got {len(public)}", client_id=client_id
        )
    u = int.from_bytes(public, "little")
    if u >> 255 or u >= _P25519:
        raise InvalidPublicKey("non-canonical X25519 public key", client_id=client_id)
    if u in _SMALL_ORDER_U:
        raise InvalidPublicKey("X25519 public key of small order", client_id=client_id)
    try:
        import_x25519_public_key(bytes(public))
    except ValueError:
        raise InvalidPublicKey("invalid X25519 public key", client_id=client_id) from None


def random_seed() -> bytes:
    """A fresh 256-bit seed from the OS CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare two byte strings in time independent of where they differ."""
    return hmac.compare_digest(a, b)


class AgreementKey:
    """An X25519 key pair (RFC 7748). ``repr`` shows the public key only."""

    __slots__ = ("_key", "public")

    def __init__(self, private: bytes | None = None) -> None:
        seed = random_seed() if private is None else private
        if len(seed) != SEED_BYTES:
            raise ConfigurationError("X25519 private keys are 32 bytes")
        self._key = import_x25519_private_key(seed)
        self.public: bytes = self._key.public_key().export_key(format="raw")

    @property
    def private_bytes(self) -> bytes:
        """The 32-byte private scalar encoding; handle with care (it gets Shamir-shared)."""
        seed = self._key.seed
        assert isinstance(seed, bytes)
        return seed

    def agree(self, peer_public: bytes) -> bytes:
        """Raw X25519 shared secret with ``peer_public`` (32 bytes).

        Raises
        ------
        InvalidPublicKey
            If the peer key fails :func:`check_agreement_key`, or the shared secret is all
            zero anyway (RFC 7748 section 6.1).
        """
        check_agreement_key(peer_public)
        try:
            peer = import_x25519_public_key(bytes(peer_public))
            shared = key_agreement(static_priv=self._key, static_pub=peer, kdf=lambda z: z)
        except ValueError as exc:
            raise InvalidPublicKey("invalid X25519 public key") from exc
        assert isinstance(shared, bytes)
        if not any(shared):
            raise InvalidPublicKey("X25519 shared secret is all zero (small-order peer key)")
        return shared

    def __repr__(self) -> str:
        return f"AgreementKey(public={self.public.hex()})"


def x25519_public(private: bytes) -> bytes:
    """Public key of a 32-byte X25519 private key (checks a reconstructed key)."""
    return AgreementKey(private).public


class IdentityKey:
    """A long-term Ed25519 signing key (RFC 8032). ``repr`` shows the public key only."""

    __slots__ = ("_key", "public")

    def __init__(self, private: bytes | None = None) -> None:
        seed = random_seed() if private is None else private
        if len(seed) != SEED_BYTES:
            raise ConfigurationError("Ed25519 private keys are 32 bytes")
        self._key = eddsa.import_private_key(seed)
        self.public: bytes = self._key.public_key().export_key(format="raw")

    @property
    def private_bytes(self) -> bytes:
        """The 32-byte Ed25519 seed (for writing the key file)."""
        seed = self._key.seed
        assert isinstance(seed, bytes)
        return seed

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of ``data``."""
        sig = eddsa.new(self._key, "rfc8032").sign(data)
        assert isinstance(sig, bytes)
        return sig

    def __repr__(self) -> str:
        return f"IdentityKey(public={self.public.hex()})"


@functools.lru_cache(maxsize=1 << 16)
def _import_identity_key(public: bytes) -> ECC.EccKey | str:
    """Decoded key, or why it is refused (cached: directories are verified many times)."""
    if len(public) != PUBLIC_KEY_BYTES:
        return "Ed25519 public keys are 32 bytes"
    try:
        key: ECC.EccKey = eddsa.import_public_key(public)
    except ValueError:
        return "malformed Ed25519 public key"
    if (key.pointQ * 8).is_point_at_infinity():
        return "Ed25519 public key of small order"
    return key


def _decode_identity_key(public: bytes, client_id: int | None) -> ECC.EccKey:
    """Decode an Ed25519 public key, refusing small-order points (RFC 8032 allows them,
    but under such a key one forged signature verifies for every message)."""
    key = _import_identity_key(bytes(public))
    if isinstance(key, str):
        raise InvalidSignature(key, client_id=client_id)
    return key


def check_identity_key(public: bytes) -> None:
    """Refuse an identity key that is malformed or of small order (enrolment check).

    Raises
    ------
    InvalidSignature
        If the key cannot serve as an identity.
    """
    _decode_identity_key(public, None)


def verify_signature(
    public: bytes, data: bytes, signature: bytes, *, client_id: int | None = None
) -> None:
    """Verify an Ed25519 signature (RFC 8032, pure EdDSA).

    Raises
    ------
    InvalidSignature
        If the key or signature is malformed, the key has small order, or the signature
        does not verify.
    """
    key = _decode_identity_key(public, client_id)
    if len(signature) != SIGNATURE_BYTES:
        raise InvalidSignature("Ed25519 signatures are 64 bytes", client_id=client_id)
    try:
        eddsa.new(key, "rfc8032").verify(data, signature)
    except ValueError as exc:
        raise InvalidSignature("signature does not verify", client_id=client_id) from exc


def aead_encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM encryption; returns ``ciphertext || tag``. ``key`` must be single-use."""
    if len(key) != 32:
        raise ConfigurationError("AES-256 keys are 32 bytes")
    cipher = AES.new(key, AES.MODE_GCM, nonce=AEAD_NONCE, mac_len=AEAD_TAG_BYTES)
    cipher.update(associated_data)
    ct, tag = cipher.encrypt_and_digest(plaintext)
    return bytes(ct) + bytes(tag)


def aead_decrypt(
    key: bytes, data: bytes, associated_data: bytes, *, client_id: int | None = None
) -> bytes:
    """Inverse of :func:`aead_encrypt`.

    Raises
    ------
    DecryptionError
        If the data is truncated or fails authentication (one error for every failure).
    """
    if len(key) != 32:
        raise ConfigurationError("AES-256 keys are 32 bytes")
    if len(data) < AEAD_TAG_BYTES:
        raise DecryptionError("ciphertext too short", client_id=client_id)
    cipher = AES.new(key, AES.MODE_GCM, nonce=AEAD_NONCE, mac_len=AEAD_TAG_BYTES)
    cipher.update(associated_data)
    try:
        pt = cipher.decrypt_and_verify(data[:-AEAD_TAG_BYTES], data[-AEAD_TAG_BYTES:])
    except ValueError as exc:
        raise DecryptionError(
            "share ciphertext failed authentication", client_id=client_id
        ) from exc
    return bytes(pt)
