"""The byte encoding: round trips, and every malformed input raises MalformedMessage."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from secagg.errors import MalformedMessage
from secagg.messages import (
    SHARE_CIPHERTEXT_BYTES,
    SHARE_COMMIT_BYTES,
    Abort,
    AdvertiseKeys,
    AggregateResult,
    ConsistencyRequest,
    ConsistencySignature,
    MaskedInput,
    Message,
    NonceReveal,
    NonceReveals,
    Roster,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    decode_message,
)
from secagg.params import RoundParams, make_params

RID = secrets.token_bytes(16)
SID = secrets.token_bytes(32)


def _adv(cid: int) -> AdvertiseKeys:
    return AdvertiseKeys(
        RID,
        cid,
        secrets.token_bytes(32),
        secrets.token_bytes(32),
        secrets.token_bytes(32),
        secrets.token_bytes(64),
        secrets.token_bytes(32),
    )


def samples() -> list[Message]:
    ct = secrets.token_bytes(SHARE_CIPHERTEXT_BYTES)
    cm = secrets.token_bytes(SHARE_COMMIT_BYTES)
    return [
        _adv(7),
        ShareKeys(RID, 7, SID, ((1, ct), (2, ct))),
        ShareKeys(RID, 7, SID, ((1, ct), (2, ct)), ((1, cm), (2, cm), (7, cm))),
        MaskedInput(RID, 7, SID, np.arange(5, dtype=np.uint64) * np.uint64(2**61)),
        ConsistencySignature(RID, 7, SID, secrets.token_bytes(64)),
        UnmaskShares(RID, 7, SID, ((1, secrets.token_bytes(33)),), ((3, bytes(33)),)),
        NonceReveal(RID, 7, SID, secrets.token_bytes(32)),
        Roster(RID, 0, (_adv(1), _adv(2))),
        NonceReveals(RID, 0, SID, ((1, secrets.token_bytes(32)), (2, bytes(32)))),
        ShareDelivery(RID, 0, SID, ((4, ct),)),
        ShareDelivery(RID, 0, SID, ((4, ct),), ((4, cm),)),
        ConsistencyRequest(RID, 0, SID, (1, 2, 3)),
        UnmaskRequest(RID, 0, SID, (1, 2), (3,), ((1, secrets.token_bytes(64)),)),
        AggregateResult(RID, 0, SID, (1, 2), np.array([1, 2**64 - 1], dtype=np.uint64)),
        Abort(RID, 0, "share_keys", "2 of 10 clients shared their keys; the threshold is 6"),
    ]


def _same(a: Message, b: Message) -> bool:
    return a.encode() == b.encode() and type(a) is type(b)


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_roundtrip(msg: Message) -> None:
    assert _same(decode_message(msg.encode()), msg)


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_every_truncation_and_extension_is_refused(msg: Message) -> None:
    data = msg.encode()
    for cut in range(len(data)):
        with pytest.raises(MalformedMessage):
            decode_message(data[:cut])
    with pytest.raises(MalformedMessage):
        decode_message(data + b"\x00")


def test_header_checks() -> None:
    data = bytearray(_adv(3).encode())
    bad_magic = bytes(b"XXXX" + data[4:])
    bad_version = bytes(data[:4] + b"\x09" + data[5:])
    unknown_type = bytes(data[:5] + b"\x63" + data[6:])
    with pytest.raises(MalformedMessage, match="magic"):
        decode_message(bad_magic)
    with pytest.raises(MalformedMessage, match="version"):
        decode_message(bad_version)
    with pytest.raises(MalformedMessage, match="unknown message type"):
        decode_message(unknown_type)
    # A client message claiming to come from the server (sender 0), and the reverse.
    with pytest.raises(MalformedMessage, match="direction"):
        decode_message(_adv(0).encode())
    with pytest.raises(MalformedMessage, match="direction"):
        decode_message(Roster(RID, 5, ()).encode())


def test_reveal_nonces_wire_layout() -> None:
    """Byte layout of the reveal_nonces messages and of the commitment in AdvertiseKeys
    (docs/protocol.md): written out by hand, not produced by the codec under test."""
    nonce = bytes(range(32))
    header = b"SAGG\x02" + b"\x07" + RID + (7).to_bytes(4, "big")
    assert NonceReveal(RID, 7, SID, nonce).encode() == header + SID + nonce
    header = b"SAGG\x02" + b"\x17" + RID + bytes(4)
    pairs = (2).to_bytes(4, "big") + (1).to_bytes(4, "big") + nonce + (9).to_bytes(4, "big")
    reveals = NonceReveals(RID, 0, SID, ((1, nonce), (9, bytes(32))))
    assert reveals.encode() == header + SID + pairs + bytes(32)
    adv = AdvertiseKeys(RID, 3, b"e" * 32, b"m" * 32, b"s" * 32, b"g" * 64, b"n" * 32)
    assert adv.encode()[26:] == b"e" * 32 + b"m" * 32 + b"s" * 32 + b"n" * 32 + b"g" * 64
    assert adv.signed_payload(b"d" * 32).endswith(b"s" * 32 + b"n" * 32)
    # A reveal list longer than the message is refused before anything is allocated.
    forged = reveals.encode()[: len(header) + 32] + b"\xff\xff\xff\xff"
    with pytest.raises(MalformedMessage, match="does not fit"):
        decode_message(forged)


def test_length_prefix_bound_checked_before_allocation() -> None:
    msg = ConsistencyRequest(RID, 0, SID, (1, 2)).encode()
    # Announce 2^32-1 ids in a short message.
    forged = msg[: 4 + 2 + 16 + 4 + 32] + b"\xff\xff\xff\xff"
    with pytest.raises(MalformedMessage, match="exceeds its bound"):
        decode_message(forged)


@given(st.binary(max_size=400))
def test_fuzz_only_malformed_escapes(data: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        decode_message(data)


@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=8))
def test_fuzz_mutations_of_valid_messages(pos: int, junk: bytes) -> None:
    for msg in samples():
        data = bytearray(msg.encode())
        i = pos % len(data)
        data[i : i + len(junk)] = junk
        with contextlib.suppress(MalformedMessage):
            decode_message(bytes(data))


def test_params_roundtrip_and_digest() -> None:
    p = make_params(10, 1000, bits=12, clip=2.0, max_weight=100)
    q = RoundParams.decode(p.encode())
    assert q == p and q.digest() == p.digest()
    other = make_params(10, 1000, bits=12, clip=2.0, max_weight=100, round_id=p.round_id)
    assert other.digest() == p.digest()
    changed = make_params(10, 1000, bits=13, clip=2.0, max_weight=100, round_id=p.round_id)
    assert changed.digest() != p.digest()
    with pytest.raises(MalformedMessage):
        RoundParams.decode(p.encode()[:-1])
    fp = bytes(range(32))
    laid = dataclasses.replace(p, layout=fp)
    assert RoundParams.decode(laid.encode()) == laid and laid.digest() != p.digest()
    with pytest.raises(MalformedMessage):
        RoundParams.decode(laid.encode()[:-1])
    with pytest.raises(MalformedMessage):  # a layout length other than 0 or 32
        RoundParams.decode(p.encode()[:-1] + b"\x05" + bytes(5))
