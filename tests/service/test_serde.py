"""Chunking, reassembly and the size bounds checked before allocation."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from secagg.errors import MalformedMessage
from secagg.messages import AggregateResult, MaskedInput, ShareKeys
from secagg.params import make_params
from secagg.service._gen import common_pb2
from secagg.service.errors import TooLarge
from secagg.service.serde import (
    Assembler,
    chunk_message,
    max_client_message_bytes,
    max_server_message_bytes,
)


def test_chunks_reassemble_exactly() -> None:
    data = secrets.token_bytes(10_000)
    asm = Assembler(max_chunk=1024, max_message=10_000)
    chunks = list(chunk_message(7, data, 1024))
    assert len(chunks) == 10 and all(len(c.data) <= 1024 for c in chunks)
    got = [asm.add(c) for c in chunks]
    assert got[:-1] == [None] * 9
    last = got[-1]
    assert last is not None and last[0] == 7 and bytes(last[1]) == data
    assert not asm.busy


def test_oversized_chunk_and_message_refused_before_allocation() -> None:
    asm = Assembler(max_chunk=1024, max_message=4096)
    with pytest.raises(TooLarge):
        asm.add(common_pb2.Chunk(seq=0, total=2000, offset=0, data=bytes(2000)))
    with pytest.raises(TooLarge):  # would allocate 1 TiB if the bound were not checked first
        asm.add(common_pb2.Chunk(seq=0, total=1 << 40, offset=0, data=b"x"))


@pytest.mark.parametrize(
    "chunks",
    [
        [common_pb2.Chunk(seq=0, total=10, offset=5, data=b"abcde")],  # does not start at 0
        [
            common_pb2.Chunk(seq=0, total=10, offset=0, data=b"abcde"),
            common_pb2.Chunk(seq=0, total=10, offset=3, data=b"abcde"),  # overlap
        ],
        [
            common_pb2.Chunk(seq=0, total=10, offset=0, data=b"abcde"),
            common_pb2.Chunk(seq=1, total=10, offset=5, data=b"abcde"),  # another message
        ],
        [
            common_pb2.Chunk(seq=0, total=10, offset=0, data=b"abcde"),
            common_pb2.Chunk(seq=0, total=10, offset=5, data=b"abcdef"),  # overrun
        ],
        [common_pb2.Chunk(seq=0, total=0, offset=0, data=b"")],  # empty
    ],
)
def test_inconsistent_chunks_are_malformed(chunks: list[common_pb2.Chunk]) -> None:
    asm = Assembler(max_chunk=1024, max_message=4096)
    with pytest.raises(MalformedMessage):
        for c in chunks:
            asm.add(c)


def test_bounds_cover_the_largest_honest_messages() -> None:
    p = make_params(20, 100_000, max_weight=100)
    rid = p.round_id
    masked = MaskedInput(rid, 1, bytes(32), np.zeros(p.words, dtype=np.uint64)).encode()
    bundles = tuple((i, bytes(82)) for i in range(p.degree))
    commits = tuple((i, bytes(128)) for i in range(p.degree + 1))
    shares = ShareKeys(rid, 1, bytes(32), bundles, commits).encode()
    assert len(masked) == max_client_message_bytes(p)
    assert len(shares) <= max_client_message_bytes(p)
    words = np.zeros(p.words, dtype=np.uint64)
    result = AggregateResult(rid, 0, bytes(32), tuple(range(1, 21)), words).encode()
    assert len(result) == max_server_message_bytes(p)
