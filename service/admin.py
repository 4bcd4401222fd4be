"""A small client of the operator API (``secagg round``, ``secagg enroll --server``, tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from secagg.errors import ConfigurationError
from secagg.service._gen import admin_pb2, admin_pb2_grpc
from secagg.service.auth import admin_metadata
from secagg.service.config import is_loopback
from secagg.service.coordinator import RoundSpec
from secagg.service.errors import from_rpc_error
from secagg.service.serde import round_spec_to_proto
from secagg.service.tls import ClientTls, tls_failure

__all__ = ["AdminClient"]


class AdminClient:
    """Calls the ``Admin`` service with the admin token.

    ``tls`` is required: the admin token would travel readable without it. A loopback
    target may go without (tests, simulations on one host); any other needs the INSECURE
    ``insecure_no_tls=True``.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        tls: ClientTls | None = None,
        insecure_no_tls: bool = False,
    ) -> None:
        if tls is None and not insecure_no_tls and not is_loopback(target):
            raise ConfigurationError(
                f"AdminClient({target!r}) needs tls=ClientTls(ca=...) (--ca): the admin token "
                "would travel in the clear; insecure_no_tls=True (--insecure-no-tls) forces it"
            )
        opts = tls.options() if tls else []
        if tls is not None:
            self._channel = grpc.secure_channel(target, tls.credentials(), options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._tls = tls
        self._stub = admin_pb2_grpc.AdminStub(self._channel)
        self._md = admin_metadata(token)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[..., Any], request: Any, timeout: float = 60.0) -> Any:
        try:
            return fn(request, metadata=self._md, timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as err:
            raise (tls_failure(err, self._tls) or from_rpc_error(err)) from None

    def enroll(
        self, name: str, identity_key: bytes, signed_entry: bytes = b""
    ) -> admin_pb2.Participant:
        req = admin_pb2.EnrollRequest(
            name=name, identity_key=identity_key, signed_entry=signed_entry
        )
        result: admin_pb2.Participant = self._call(self._stub.Enroll, req)
        return result

    def set_signed_entry(self, name: str, signed_entry: bytes) -> admin_pb2.Participant:
        req = admin_pb2.SetSignedEntryRequest(name=name, signed_entry=signed_entry)
        result: admin_pb2.Participant = self._call(self._stub.SetSignedEntry, req)
        return result

    def revoke(self, name: str) -> admin_pb2.Participant:
        result: admin_pb2.Participant = self._call(
            self._stub.Revoke, admin_pb2.RevokeRequest(name=name)
        )
        return result

    def participants(self) -> list[admin_pb2.Participant]:
        resp = self._call(self._stub.ListParticipants, admin_pb2.ListParticipantsRequest())
        return list(resp.participants)

    def create_round(self, spec: RoundSpec) -> admin_pb2.RoundStatus:
        result: admin_pb2.RoundStatus = self._call(
            self._stub.CreateRound, round_spec_to_proto(spec)
        )
        return result

    def status(self, round_id: bytes) -> admin_pb2.RoundStatus:
        req = admin_pb2.RoundStatusRequest(round_id=round_id)
        result: admin_pb2.RoundStatus = self._call(self._stub.GetRoundStatus, req)
        return result

    def abort(self, round_id: bytes, reason: str = "") -> admin_pb2.RoundStatus:
        req = admin_pb2.AbortRoundRequest(round_id=round_id, reason=reason)
        result: admin_pb2.RoundStatus = self._call(self._stub.AbortRound, req)
        return result

    def wait(
        self, round_id: bytes, timeout: float = 600.0, poll: float = 0.05
    ) -> admin_pb2.RoundStatus:
        """Poll until the round is no longer running (or ``timeout`` passes)."""
        end = time.monotonic() + timeout
        while True:
            st = self.status(round_id)
            if st.status != "running" or time.monotonic() > end:
                return st
            time.sleep(poll)
