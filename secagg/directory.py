"""Authority-signed directory entries: who may take part in a federation (sans-I/O).

A server that serves the directory could invent participants and so control the Shamir
threshold. A federation authority, whose Ed25519 key the aggregation server never holds,
signs one entry per site offline; the server stores and serves the signed entries and each
client verifies every entry of a round's directory against the authority's public key
before it sends anything.

Signed payload (big-endian, every field length-prefixed, so no two entries share bytes)::

    DOMAIN || u16 len || federation (UTF-8) || u16 len || name (UTF-8)
           || identity key (32) || u64 epoch || u64 not_after

Encoded entry: ``VERSION (1 byte) || payload without DOMAIN || Ed25519 signature (64)``.
``not_after`` is a Unix time in seconds (0: no expiry); ``epoch`` lets a federation
refuse entries signed before a re-enrolment (:attr:`Authority.min_epoch`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from secagg.errors import InvalidSignature, MalformedMessage
from secagg.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, IdentityKey, verify_signature

__all__ = ["DOMAIN", "VERSION", "Authority", "SignedEntry", "sign_entry"]

DOMAIN = b"secagg/v1 federation directory entry\x00"
"""Domain separation: an authority signature over an entry verifies for nothing else."""
VERSION = 1
MAX_FIELD = 255
"""Longest federation or site name, in UTF-8 bytes."""


def _field(text: str) -> bytes:
    raw = text.encode()
    if not raw or len(raw) > MAX_FIELD:
        raise MalformedMessage(f"directory names are 1..{MAX_FIELD} UTF-8 bytes")
    return struct.pack(">H", len(raw)) + raw


@dataclass(frozen=True)
class SignedEntry:
    """One site's entry in a federation's directory and the authority's signature of it."""

    federation: str
    name: str
    identity_key: bytes
    epoch: int
    not_after: int
    signature: bytes

    def body(self) -> bytes:
        """The signed fields (without the domain prefix)."""
        if len(self.identity_key) != PUBLIC_KEY_BYTES:
            raise MalformedMessage("identity keys are 32-byte Ed25519 public keys")
        if not (0 <= self.epoch < 1 << 64 and 0 <= self.not_after < 1 << 64):
            raise MalformedMessage("epoch and not_after are unsigned 64-bit integers")
        return (
            _field(self.federation)
            + _field(self.name)
            + self.identity_key
            + struct.pack(">QQ", self.epoch, self.not_after)
        )

    def signed_payload(self) -> bytes:
        return DOMAIN + self.body()

    def encode(self) -> bytes:
        return bytes([VERSION]) + self.body() + self.signature

    @classmethod
    def decode(cls, data: bytes) -> SignedEntry:
        """Parse an encoded entry (strict: no trailing bytes). Raises ``MalformedMessage``."""
        data = bytes(data)
        try:
            if data[0] != VERSION:
                raise MalformedMessage(f"directory entry version {data[0]} is not {VERSION}")
            pos = 1
            texts = []
            for _ in range(2):
                (n,) = struct.unpack_from(">H", data, pos)
                raw = data[pos + 2 : pos + 2 + n]
                if len(raw) != n:
                    raise MalformedMessage("directory entry is truncated")
                texts.append(raw.decode())
                pos += 2 + n
            key = data[pos : pos + PUBLIC_KEY_BYTES]
            epoch, not_after = struct.unpack_from(">QQ", data, pos + PUBLIC_KEY_BYTES)
            sig = data[pos + PUBLIC_KEY_BYTES + 16 :]
        except (IndexError, struct.error, UnicodeDecodeError) as exc:
            raise MalformedMessage(f"malformed directory entry ({exc})") from None
        if len(sig) != SIGNATURE_BYTES or len(key) != PUBLIC_KEY_BYTES:
            raise MalformedMessage("directory entry has a wrong length")
        entry = cls(texts[0], texts[1], key, epoch, not_after, sig)
        if entry.encode() != data:
            raise MalformedMessage("directory entry is not in canonical form")
        return entry


def sign_entry(
    authority: IdentityKey,
    federation: str,
    name: str,
    identity_key: bytes,
    *,
    epoch: int = 0,
    not_after: int = 0,
) -> SignedEntry:
    """The authority's signed entry for site ``name`` with ``identity_key`` (offline step)."""
    unsigned = SignedEntry(federation, name, bytes(identity_key), epoch, not_after, b"")
    return SignedEntry(
        federation,
        name,
        bytes(identity_key),
        epoch,
        not_after,
        authority.sign(unsigned.signed_payload()),
    )


@dataclass(frozen=True)
class Authority:
    """A federation authority's public half, as a site receives it in its enrolment kit."""

    federation: str
    public_key: bytes
    min_epoch: int = 0

    def verify(self, entry: SignedEntry, *, name: str, identity_key: bytes, now: float) -> None:
        """Check that ``entry`` vouches for ``name`` holding ``identity_key`` at ``now``.

        Raises
        ------
        InvalidSignature
            The signature does not verify under this authority's key, or the entry is for
            another federation, site or key, expired, or of an older epoch.
        """
        self.check_fields(entry, name=name, identity_key=identity_key, now=now)
        try:
            verify_signature(self.public_key, entry.signed_payload(), entry.signature)
        except InvalidSignature:
            raise InvalidSignature(
                f"entry {name!r} is not signed by the federation authority"
            ) from None

    def check_fields(
        self, entry: SignedEntry, *, name: str, identity_key: bytes, now: float
    ) -> None:
        """:meth:`verify` without the signature: federation, site, key, expiry, epoch.

        For a caller that already verified this exact entry's signature under this key
        (:func:`secagg.service.trust.check_directory` caches them across rounds).
        """
        if entry.federation != self.federation:
            raise InvalidSignature(
                f"entry {name!r} is signed for federation {entry.federation!r}, "
                f"not {self.federation!r}"
            )
        if entry.name != name or entry.identity_key != bytes(identity_key):
            raise InvalidSignature(f"entry {name!r} vouches for another site or key")
        if entry.not_after and now > entry.not_after:
            raise InvalidSignature(f"entry {name!r} expired at {entry.not_after}")
        if entry.epoch < self.min_epoch:
            raise InvalidSignature(
                f"entry {name!r} is of epoch {entry.epoch}, older than {self.min_epoch}"
            )
