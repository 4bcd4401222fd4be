"""Authority-signed directory entries (secagg.directory): known answer and negatives.

The known answer is built twice: by :func:`sign_entry` and by hand from the layout in the
module docstring, and its signature is checked with pycryptodome's Ed25519 directly over
``DOMAIN || body`` (RFC 8032 signatures are deterministic, so the bytes are pinned too).
"""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from Crypto.Signature import eddsa
from hypothesis import given
from hypothesis import strategies as st

from secagg.directory import DOMAIN, Authority, SignedEntry, sign_entry
from secagg.errors import InvalidSignature, MalformedMessage
from secagg.keys import IdentityKey

AUTHORITY = IdentityKey(bytes(range(32)))
SITE = IdentityKey(bytes(range(32, 64)))
KAT_HEX = (
    "0100056665642d410006736974652d3129acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794"
    "bc9322966dd700000000000000030000000077359400327e7f51c6176eb7237e51db5cd9a3f1f14684b8"
    "f80b6bafae7553be8728b1f1719931ad2dbe1e1b1333b04a3f06fe5cc8d568cc97e08e281b9e65533642"
    "7f0b"
)
NOW = 1_900_000_000.0


def _kat() -> SignedEntry:
    return sign_entry(AUTHORITY, "fed-A", "site-1", SITE.public, epoch=3, not_after=2_000_000_000)


def test_known_answer_layout_and_signature() -> None:
    e = _kat()
    body = (
        struct.pack(">H", 5)
        + b"fed-A"
        + struct.pack(">H", 6)
        + b"site-1"
        + SITE.public
        + struct.pack(">QQ", 3, 2_000_000_000)
    )
    assert e.body() == body
    assert e.encode() == b"\x01" + body + e.signature
    assert e.encode().hex() == KAT_HEX
    eddsa.new(eddsa.import_public_key(AUTHORITY.public), "rfc8032").verify(
        DOMAIN + body, e.signature
    )  # raises if wrong
    assert SignedEntry.decode(bytes.fromhex(KAT_HEX)) == e
    Authority("fed-A", AUTHORITY.public).verify(e, name="site-1", identity_key=SITE.public, now=NOW)


def test_signature_is_domain_separated() -> None:
    """The authority's signature over the bare body (no domain) must not verify."""
    e = _kat()
    forged = replace(e, signature=AUTHORITY.sign(e.body()))
    with pytest.raises(InvalidSignature, match="not signed by the federation authority"):
        Authority("fed-A", AUTHORITY.public).verify(
            forged, name="site-1", identity_key=SITE.public, now=NOW
        )


@pytest.mark.parametrize(
    ("authority", "name", "key", "now", "match"),
    [
        (Authority("fed-B", AUTHORITY.public), "site-1", SITE.public, NOW, "federation"),
        (Authority("fed-A", AUTHORITY.public), "site-2", SITE.public, NOW, "another site"),
        (Authority("fed-A", AUTHORITY.public), "site-1", IdentityKey().public, NOW, "another"),
        (Authority("fed-A", AUTHORITY.public), "site-1", SITE.public, 2_000_000_001.0, "expired"),
        (Authority("fed-A", AUTHORITY.public, min_epoch=4), "site-1", SITE.public, NOW, "epoch"),
        (Authority("fed-A", IdentityKey().public), "site-1", SITE.public, NOW, "not signed"),
        (Authority("fed-A", bytes(32)), "site-1", SITE.public, NOW, "not signed"),  # small order
    ],
)
def test_verify_refuses(
    authority: Authority, name: str, key: bytes, now: float, match: str
) -> None:
    with pytest.raises(InvalidSignature, match=match):
        authority.verify(_kat(), name=name, identity_key=key, now=now)


def test_tampered_fields_do_not_verify() -> None:
    e = _kat()
    auth = Authority("fed-A", AUTHORITY.public)
    for tampered in (replace(e, epoch=4), replace(e, not_after=0)):
        with pytest.raises(InvalidSignature, match="not signed"):
            auth.verify(tampered, name="site-1", identity_key=SITE.public, now=NOW)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x02" + bytes.fromhex(KAT_HEX)[1:],  # unknown version
        bytes.fromhex(KAT_HEX)[:-1],  # truncated signature
        bytes.fromhex(KAT_HEX) + b"\x00",  # trailing byte
        bytes.fromhex(KAT_HEX)[:20],  # truncated key
        b"\x01\x00\x05fed-A\xff\xff",  # name length past the end
        b"\x01\x00\x02\xff\xfe" + bytes.fromhex(KAT_HEX)[8:],  # not UTF-8
    ],
)
def test_decode_refuses_malformed(blob: bytes) -> None:
    with pytest.raises(MalformedMessage):
        SignedEntry.decode(blob)


def test_empty_or_long_names_refused() -> None:
    with pytest.raises(MalformedMessage):
        sign_entry(AUTHORITY, "", "site", SITE.public)
    with pytest.raises(MalformedMessage):
        sign_entry(AUTHORITY, "f", "x" * 256, SITE.public)


@given(
    federation=st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 255),
    name=st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 255),
    epoch=st.integers(0, 2**64 - 1),
    not_after=st.integers(0, 2**64 - 1),
)
def test_round_trip(federation: str, name: str, epoch: int, not_after: int) -> None:
    e = sign_entry(AUTHORITY, federation, name, SITE.public, epoch=epoch, not_after=not_after)
    assert SignedEntry.decode(e.encode()) == e
