"""The one table from errors to gRPC status codes, and back on the client side."""

from __future__ import annotations

import grpc
import pytest

from secagg.errors import (
    DuplicateMessage,
    InvalidSignature,
    LateMessage,
    MalformedMessage,
    ProtocolViolation,
    RoundAborted,
    UnexpectedMessage,
    UnknownClient,
    WrongSession,
)
from secagg.service.errors import (
    Dropped,
    NotFound,
    PermissionDenied,
    Refused,
    TooLarge,
    Unauthenticated,
    from_rpc_error,
    status_for,
)

C = grpc.StatusCode


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (DuplicateMessage("again"), C.ALREADY_EXISTS),
        (MalformedMessage("bad"), C.INVALID_ARGUMENT),
        (InvalidSignature("sig"), C.INVALID_ARGUMENT),
        (ProtocolViolation("p"), C.INVALID_ARGUMENT),
        (UnknownClient("who"), C.PERMISSION_DENIED),
        (WrongSession("other round"), C.FAILED_PRECONDITION),
        (LateMessage("late"), C.FAILED_PRECONDITION),
        (UnexpectedMessage("not now"), C.FAILED_PRECONDITION),
        (RoundAborted("share_keys", "too few"), C.ABORTED),
        (Unauthenticated("no"), C.UNAUTHENTICATED),
        (PermissionDenied("no"), C.PERMISSION_DENIED),
        (NotFound("none"), C.NOT_FOUND),
        (TooLarge("big"), C.RESOURCE_EXHAUSTED),
        (Dropped("gone"), C.FAILED_PRECONDITION),
        (KeyError("internal detail"), C.INTERNAL),
    ],
)
def test_status_table(exc: Exception, code: grpc.StatusCode) -> None:
    got, message = status_for(exc)
    assert got == code
    assert message
    if isinstance(exc, KeyError):
        assert "internal detail" not in message


def test_violation_message_names_stage_and_outcome() -> None:
    exc = ProtocolViolation("two different inputs", client_id=3, stage="masked_input")
    _, message = status_for(exc)
    assert "masked_input" in message and "dropped" in message


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_client_side_mapping() -> None:
    assert isinstance(from_rpc_error(_FakeRpcError(C.UNAUTHENTICATED, "x")), Unauthenticated)
    assert isinstance(from_rpc_error(_FakeRpcError(C.FAILED_PRECONDITION, "x")), Refused)
    assert isinstance(from_rpc_error(_FakeRpcError(C.ABORTED, "x")), RoundAborted)
