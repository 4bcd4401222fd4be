"""The service refuses, it does not fault (issue 11, item 8), over real gRPC on loopback.

Each test is an attack any enrolled participant (or anyone reaching the port) can mount;
each failed on the code before the fix, as its docstring says.
"""

from __future__ import annotations

import logging
import queue
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from secagg.server import StageTimeouts
from secagg.service._gen import common_pb2
from secagg.service.auth import call_metadata
from secagg.service.serde import Assembler
from secagg.service.servicer import GET_ROUND, SESSION

from .helpers import TOKEN, Deployment, RawSession

FAST = StageTimeouts.uniform(5.0)
GARBAGE = b"\xff\xff\xff\xff\x0f"  # a truncated varint: not a valid protobuf message


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[_Records]:
    """Every log record of the process (grpc's own logger and ours, which does not propagate)."""
    h = _Records()
    loggers = [logging.getLogger(), logging.getLogger("secagg")]
    for lg in loggers:
        lg.addHandler(h)
    try:
        yield h
    finally:
        for lg in loggers:
            lg.removeHandler(h)


def _raw_unary(d: Deployment, method: str, payload: bytes, metadata: Any) -> grpc.RpcError:
    with grpc.insecure_channel(d.target) as ch:
        call = ch.unary_unary(method)
        with pytest.raises(grpc.RpcError) as err:
            call(payload, metadata=metadata, timeout=10)
    return err.value


def test_invalid_protobuf_is_invalid_argument_without_traceback(
    deployment: Deployment, records: _Records
) -> None:
    """Attack: bytes that are not protobuf, sent to every kind of method.

    Before the fix gRPC's deserializer raised: the caller got ``INTERNAL``/``UNKNOWN`` and
    the server logged an error-level traceback per call. Now: ``INVALID_ARGUMENT``, one
    warning line, no error record.
    """
    names = deployment.enroll(3)
    rid = deployment.create(names, 10, FAST)
    ident = deployment.identities[names[0]]
    err = _raw_unary(deployment, GET_ROUND, GARBAGE, call_metadata(ident, GET_ROUND, rid))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    admin_md = (("authorization", f"Bearer {TOKEN}"),)
    err = _raw_unary(deployment, "/secagg.v1.Admin/Enroll", GARBAGE, admin_md)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = _raw_unary(deployment, "/grpc.health.v1.Health/Check", GARBAGE, ())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    with grpc.insecure_channel(deployment.target) as ch:
        call = ch.stream_stream(SESSION)(
            iter([GARBAGE]), metadata=call_metadata(ident, SESSION, rid), timeout=10
        )
        with pytest.raises(grpc.RpcError) as serr:
            next(call)
    assert serr.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf" in (serr.value.details() or "")
    errors = [r for r in records.records if r.levelno >= logging.ERROR]
    assert errors == []
    warnings = [r for r in records.records if r.getMessage() == "invalid frame"]
    assert len(warnings) == 4
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in warnings)


def test_invalid_frame_after_hello_is_invalid_argument(deployment: Deployment) -> None:
    """Attack: a valid ``Hello``, then garbage. Before the fix: ``UNKNOWN``/``INTERNAL``."""
    names = deployment.enroll(3)
    rid = deployment.create(names, 10, FAST)
    ident = deployment.identities[names[0]]
    hello = b"\x0a\x00"  # ClientFrame{hello: {}}
    with grpc.insecure_channel(deployment.target) as ch:
        call = ch.stream_stream(SESSION)(
            iter([hello, GARBAGE]), metadata=call_metadata(ident, SESSION, rid), timeout=10
        )
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_without_hello_is_closed(tmp_path: Path) -> None:
    """Attack: open a ``Session`` stream and never send ``Hello``.

    Before the fix the server held the stream until the call's own deadline (here 30 s,
    or forever without one); now it closes it after ``hello_timeout`` with
    ``DEADLINE_EXCEEDED``.
    """
    d = Deployment(tmp_path / "s.db", config={"hello_timeout": 0.3}).start()
    try:
        names = d.enroll(3)
        rid = d.create(names, 10, FAST)
        ident = d.identities[names[0]]
        with grpc.insecure_channel(d.target) as ch:
            q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()  # stays empty
            call = ch.stream_stream(SESSION)(
                iter(q.get, None), metadata=call_metadata(ident, SESSION, rid), timeout=60
            )
            with pytest.raises(grpc.RpcError) as err:
                next(call)
            q.put(None)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no Hello within 0.3 s" in (err.value.details() or "")
    finally:
        d.stop()


def test_one_participant_cannot_hold_many_streams(deployment: Deployment) -> None:
    """Attack: one key opens 30 half-open streams (Hello plus a first chunk announcing a
    large message). Before the fix all 30 were held, each with a buffer of the announced
    size; now the third and later are refused with ``RESOURCE_EXHAUSTED``.
    """
    names = deployment.enroll(3)
    rid = deployment.create(names, 10, FAST)
    held = [RawSession(deployment, names[0], rid) for _ in range(2)]
    for raw in held:
        raw.send_chunk(seq=0, total=100, offset=0, data=b"x")
    refused = 0
    for _ in range(28):
        raw = RawSession(deployment, names[0], rid)
        with pytest.raises(grpc.RpcError) as err:
            raw.next_frame()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "open streams" in (err.value.details() or "")
        refused += 1
        raw.close()
    assert refused == 28
    other = RawSession(deployment, names[1], rid)  # other participants are not affected
    other.send_chunk(seq=0, total=100, offset=0, data=b"x")
    for raw in held:
        raw.close()
    # A closed stream frees its seat: the participant can open a new one.
    again = RawSession(deployment, names[0], rid)
    again.send_message(0, b"SAGG" + bytes(40))
    with pytest.raises(grpc.RpcError) as err:
        again.next_frame()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # reached the round
    again.close()
    other.close()


def test_announced_total_is_not_preallocated() -> None:
    """Attack: announce a message of the round's largest size and send one byte.

    Before the fix the assembler allocated ``total`` bytes on the first chunk (30 such
    streams took the server from 80 to 387 MiB); now it holds what arrived.
    """
    asm = Assembler(1 << 20, 64 << 20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert asm.add(common_pb2.Chunk(seq=0, total=64 << 20, offset=0, data=b"x")) is None
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 1 << 20
    assert asm.busy
