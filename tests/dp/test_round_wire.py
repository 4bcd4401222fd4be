"""The DP sections of the wire: canonical round trips, and hostile bytes raise only
MalformedMessage (like h11's fuzz harness: nothing else may escape the decoder)."""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.dp.policy import DPOffer
from secagg.dp.xnoise import make_plan
from secagg.errors import MalformedMessage
from secagg.messages import (
    EncryptedResult,
    Message,
    ShareDelivery,
    ShareKeys,
    UnmaskShares,
    decode_message,
    dp_share_ciphertext_bytes,
)
from secagg.params import RoundParams, make_params
from secagg.shamir import SHARE_BYTES

RID, SID = b"\x01" * 16, b"\x02" * 32


@functools.cache
def dp_params() -> RoundParams:
    plan = make_plan(40_000, 10, 7)
    offer = DPOffer(60, 1.0, 28.3, 0.6, 12, 10, plan)
    return make_params(10, 60, neighbors="all", threshold=7, dp=offer)


def samples(L: int) -> list[Message]:
    ct = (b"\x03" * dp_share_ciphertext_bytes(L),)
    share = b"\x00" + b"\x04" * (SHARE_BYTES - 1)
    bundles = tuple((v, b"\x05" * 82) for v in (2, 3))
    commits = tuple((v, b"\x06" * 128) for v in (1, 2, 3))
    dp_b = tuple((v, ct[0]) for v in (2, 3))
    dp_c = tuple((v, b"\x07" * 32 * L) for v in (1, 2, 3))
    return [
        ShareKeys(RID, 1, SID, bundles, commits, L, dp_b, dp_c),
        ShareDelivery(RID, 0, SID, bundles, commits, L, dp_b, dp_c),
        UnmaskShares(RID, 1, SID, ((1, share),), (), tuple((1, k, share) for k in range(L))),
        EncryptedResult(RID, 0, SID, (1, 2, 3), (b"ct",), b"\x08" * 8 * L),
    ]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5))
def test_dp_sections_round_trip(L: int) -> None:
    for m in samples(L):
        data = m.encode()
        back = decode_message(data)
        assert back == m and back.encode() == data
    p = dp_params()
    assert RoundParams.decode(p.encode()) == p


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 4), st.integers(0, 10_000), st.binary(max_size=64), st.booleans())
def test_hostile_dp_bytes_raise_only_malformed(
    which: int, at: int, junk: bytes, truncate: bool
) -> None:
    data = samples(2)[which].encode() if which < 4 else dp_params().encode()
    at %= len(data) + 1
    bad = data[:at] + junk if truncate else data[:at] + junk + data[at:]
    try:
        if which < 4:
            decode_message(bad)
        else:
            RoundParams.decode(bad)
    except MalformedMessage:
        pass
