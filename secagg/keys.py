"""Key material and the primitives the protocol uses.

* X25519 key agreement (RFC 7748) for share encryption and pairwise masks;
* Ed25519 signatures (RFC 8032, pure EdDSA) for long-term identities;
* AES-256-GCM (NIST SP 800-38D) to encrypt Shamir shares between clients;
* HKDF-SHA256 (RFC 5869) for every derived key (see :func:`secagg.prg.derive_key`).

The hot path (X25519 agreement, Ed25519 signing and verification, AES-GCM) runs in OpenSSL
through ``cryptography``: 3-30x faster than pycryptodome's, which matters at O(k) operations
per client and O(n k) per round. pycryptodome still decodes Ed25519 public keys (refusing
malformed and non-canonical encodings once per key), runs ChaCha20 (:mod:`secagg.prg`) and
serves as the independent implementation every hot-path primitive is cross-checked against
in ``tests/test_primitives.py``. The refusals are ours and do not depend on either library:
non-canonical and small-order X25519 keys (:func:`check_agreement_key`), small-order Ed25519
keys, non-canonical ``S`` (both libraries refuse ``S >= L``).

Private keys are generated from :mod:`secrets` (the OS CSPRNG) and never appear in ``repr``.
"""

from __future__ import annotations

import functools
import hmac
import secrets

from Crypto.Signature import eddsa
from cryptography.exceptions import InvalidSignature as _OpenSSLInvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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


_ED25519_SMALL_ORDER_Y = frozenset(
    {
        0,
        1,
        2707385501144840649318225287225658788936804267575313519463743609750303402022,
        55188659117513257062467267217118295137698188065244968500265048394206261417927,
        _P25519 - 1,
    }
)
"""y-coordinates of the eight points of order 1, 2, 4 and 8 on edwards25519 (libsodium's
``has_small_order`` blocklist, canonical encodings; a y fixes a point up to the sign of x,
and both signs of these y are small-order). ``tests/test_primitives.py`` checks that these
are exactly the y values ``P`` with ``8 P = 0``, against pycryptodome's point arithmetic."""


def check_agreement_key(public: bytes, *, client_id: int | None = None) -> None:
    """Refuse an X25519 public key that could not serve in an honest key agreement.

    Refused: a length other than 32; a set top bit or a u-coordinate ``>= 2^255 - 19``
    (non-canonical: RFC 7748 section 5 masks the bit and reduces, so two encodings would
    name one key, and neither library ever exports either); the five small-order
    u-coordinates, whose shared secret is all zero for every private key (RFC 7748
    section 6.1). An honest client's key never fails; a peer's key that does is its
    sender's fault, never a crash. Pure integer checks: every 32-byte canonical
    u-coordinate is a point of the curve or its twist, which X25519 accepts.

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


def random_seed() -> bytes:
    """A fresh 256-bit seed from the OS CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare two byte strings in time independent of where they differ."""
    return hmac.compare_digest(a, b)


class AgreementKey:
    """An X25519 key pair (RFC 7748; OpenSSL). ``repr`` shows the public key only."""

    __slots__ = ("_key", "_seed", "public")

    def __init__(self, private: bytes | None = None) -> None:
        seed = random_seed() if private is None else bytes(private)
        if len(seed) != SEED_BYTES:
            raise ConfigurationError("X25519 private keys are 32 bytes")
        self._seed = seed
        self._key = X25519PrivateKey.from_private_bytes(seed)
        self.public: bytes = self._key.public_key().public_bytes_raw()

    @property
    def private_bytes(self) -> bytes:
        """The 32-byte private scalar encoding (unclamped, as given or drawn); handle with
        care (it gets Shamir-shared)."""
        return self._seed

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
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
        except ValueError as exc:  # OpenSSL refuses an all-zero result itself
            raise InvalidPublicKey(
                "X25519 shared secret is all zero (small-order peer key)"
            ) from exc
        if not any(shared):
            raise InvalidPublicKey("X25519 shared secret is all zero (small-order peer key)")
        return shared

    def __repr__(self) -> str:
        return f"AgreementKey(public={self.public.hex()})"


def x25519_public(private: bytes) -> bytes:
    """Public key of a 32-byte X25519 private key (checks a reconstructed key)."""
    return AgreementKey(private).public


class IdentityKey:
    """A long-term Ed25519 signing key (RFC 8032; OpenSSL). ``repr`` shows the public key
    only."""

    __slots__ = ("_key", "_seed", "public")

    def __init__(self, private: bytes | None = None) -> None:
        seed = random_seed() if private is None else bytes(private)
        if len(seed) != SEED_BYTES:
            raise ConfigurationError("Ed25519 private keys are 32 bytes")
        self._seed = seed
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public: bytes = self._key.public_key().public_bytes_raw()

    @property
    def private_bytes(self) -> bytes:
        """The 32-byte Ed25519 seed (for writing the key file)."""
        return self._seed

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of ``data`` (deterministic, RFC 8032 section 5.1.6)."""
        return self._key.sign(bytes(data))

    def __repr__(self) -> str:
        return f"IdentityKey(public={self.public.hex()})"


@functools.lru_cache(maxsize=1 << 16)
def _import_identity_key(public: bytes) -> Ed25519PublicKey | str:
    """Decoded key, or why it is refused (cached: directories are verified many times).

    pycryptodome decodes the point (refusing encodings that are off the curve or
    non-canonical, RFC 8032 section 5.1.3); the small-order test is a lookup of the
    y-coordinate; OpenSSL then holds the key for verification.
    """
    if len(public) != PUBLIC_KEY_BYTES:
        return "Ed25519 public keys are 32 bytes"
    try:
        eddsa.import_public_key(public)
    except ValueError:
        return "malformed Ed25519 public key"
    if int.from_bytes(public, "little") & ((1 << 255) - 1) in _ED25519_SMALL_ORDER_Y:
        return "Ed25519 public key of small order"
    try:
        return Ed25519PublicKey.from_public_bytes(public)
    except ValueError:
        return "malformed Ed25519 public key"


def _decode_identity_key(public: bytes, client_id: int | None) -> Ed25519PublicKey:
    """Decode an Ed25519 public key, refusing small-order points (RFC 8032 allows them,
    but under such a key one forged signature verifies for every message)."""
    try:
        key = _import_identity_key(bytes(public))
    except TypeError:
        raise InvalidSignature("an Ed25519 public key must be bytes", client_id=client_id) from None
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
    """Verify an Ed25519 signature (RFC 8032, pure EdDSA; OpenSSL).

    OpenSSL checks the cofactorless equation ``[S]B = R + [k]A`` and refuses ``S >= L``;
    pycryptodome (the cross-check in the tests) checks the cofactored one. Every signature
    OpenSSL accepts, pycryptodome accepts too; honest signatures pass both.

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
        key.verify(bytes(signature), bytes(data))
    except _OpenSSLInvalidSignature:
        raise InvalidSignature("signature does not verify", client_id=client_id) from None


def aead_encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM encryption (OpenSSL); returns ``ciphertext || tag``. ``key`` must be
    single-use."""
    if len(key) != 32:
        raise ConfigurationError("AES-256 keys are 32 bytes")
    return AESGCM(bytes(key)).encrypt(AEAD_NONCE, bytes(plaintext), bytes(associated_data))


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
    try:
        return AESGCM(bytes(key)).decrypt(AEAD_NONCE, bytes(data), bytes(associated_data))
    except InvalidTag:
        raise DecryptionError(
            "share ciphertext failed authentication", client_id=client_id
        ) from None
