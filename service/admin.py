"""A small client of the operator API (``secagg round``, ``secagg enroll --server``, tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from secagg.errors import ConfigurationError
from secagg.keys import IdentityKey
from secagg.service import kit as kf
from secagg.service._gen import admin_pb2, admin_pb2_grpc
from secagg.service.auth import admin_call_metadata, admin_metadata
from secagg.service.config import is_loopback
from secagg.service.coordinator import JobSpec, RoundSpec
from secagg.service.errors import from_rpc_error
from secagg.service.keyfile import read_identity
from secagg.service.kit import load_kit
from secagg.service.serde import job_spec_to_proto, round_spec_to_proto
from secagg.service.servicer import ADMIN_SERVICE
from secagg.service.tls import ClientTls, tls_failure

__all__ = ["AdminClient"]


class AdminClient:
    """Calls the ``Admin`` service as an operator.

    ``operator=(name, key)`` signs every call with the operator's Ed25519 key
    (:func:`secagg.service.auth.admin_call_metadata`); without it, ``token`` is the
    DEPRECATED shared admin token. ``tls`` is required: credentials would travel readable
    without it. A loopback target may go without (tests, simulations on one host); any
    other needs the INSECURE ``insecure_no_tls=True``.
    """

    def __init__(
        self,
        target: str,
        token: str = "",
        *,
        tls: ClientTls | None = None,
        insecure_no_tls: bool = False,
        operator: tuple[str, IdentityKey] | None = None,
    ) -> None:
        if operator is None and not token:
            raise ConfigurationError("AdminClient needs an operator key or the admin token")
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
        self._operator = operator

    @classmethod
    def from_kit(
        cls, kit_dir: str | Path, *, target: str | None = None, server_name: str | None = None
    ) -> AdminClient:
        """An operator's client from its kit (``secagg provision``): the operator key,
        the CA, the mTLS certificate and the server address (``target`` overrides it)."""
        k = load_kit(kit_dir, "operator")
        tls = ClientTls(
            ca=k.path(kf.CA),
            cert=k.path(kf.CERT),
            key=k.path(kf.KEY),
            server_name=server_name or k.server_name,
        )
        key = read_identity(k.path(kf.OPERATOR_KEY))
        return cls(target or k.server, tls=tls, operator=(k.name, key))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, fn: Callable[..., Any], request: Any, method: str, timeout: float = 60.0
    ) -> Any:
        md = self._md
        if self._operator is not None:
            name, key = self._operator
            md = admin_call_metadata(name, key, f"/{ADMIN_SERVICE}/{method}")
        try:
            return fn(request, metadata=md, timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as err:
            raise (tls_failure(err, self._tls) or from_rpc_error(err)) from None

    def enroll(
        self, name: str, identity_key: bytes, signed_entry: bytes = b""
    ) -> admin_pb2.Participant:
        req = admin_pb2.EnrollRequest(
            name=name, identity_key=identity_key, signed_entry=signed_entry
        )
        result: admin_pb2.Participant = self._call(self._stub.Enroll, req, "Enroll")
        return result

    def set_signed_entry(self, name: str, signed_entry: bytes) -> admin_pb2.Participant:
        req = admin_pb2.SetSignedEntryRequest(name=name, signed_entry=signed_entry)
        result: admin_pb2.Participant = self._call(self._stub.SetSignedEntry, req, "SetSignedEntry")
        return result

    def revoke(self, name: str) -> admin_pb2.Participant:
        result: admin_pb2.Participant = self._call(
            self._stub.Revoke, admin_pb2.RevokeRequest(name=name), "Revoke"
        )
        return result

    def rotate(
        self, name: str, identity_key: bytes, signed_entry: bytes = b""
    ) -> admin_pb2.Participant:
        """Give ``name`` a new identity key (and entry), keeping its name."""
        req = admin_pb2.RotateKeyRequest(
            name=name, identity_key=identity_key, signed_entry=signed_entry
        )
        result: admin_pb2.Participant = self._call(self._stub.RotateKey, req, "RotateKey")
        return result

    def participants(self) -> list[admin_pb2.Participant]:
        resp = self._call(
            self._stub.ListParticipants, admin_pb2.ListParticipantsRequest(), "ListParticipants"
        )
        return list(resp.participants)

    def create_round(self, spec: RoundSpec) -> admin_pb2.RoundStatus:
        result: admin_pb2.RoundStatus = self._call(
            self._stub.CreateRound, round_spec_to_proto(spec), "CreateRound"
        )
        return result

    def status(self, round_id: bytes) -> admin_pb2.RoundStatus:
        req = admin_pb2.RoundStatusRequest(round_id=round_id)
        result: admin_pb2.RoundStatus = self._call(self._stub.GetRoundStatus, req, "GetRoundStatus")
        return result

    def abort(self, round_id: bytes, reason: str = "") -> admin_pb2.RoundStatus:
        req = admin_pb2.AbortRoundRequest(round_id=round_id, reason=reason)
        result: admin_pb2.RoundStatus = self._call(self._stub.AbortRound, req, "AbortRound")
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

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(self, spec: JobSpec) -> admin_pb2.JobStatus:
        """Create a job: the server opens its rounds one after another (docs/service.md)."""
        result: admin_pb2.JobStatus = self._call(
            self._stub.CreateJob, job_spec_to_proto(spec), "CreateJob"
        )
        return result

    def job(self, name: str) -> admin_pb2.JobStatus:
        result: admin_pb2.JobStatus = self._call(
            self._stub.GetJob, admin_pb2.JobRequest(name=name), "GetJob"
        )
        return result

    def jobs(self) -> list[admin_pb2.JobStatus]:
        resp = self._call(self._stub.ListJobs, admin_pb2.ListJobsRequest(), "ListJobs")
        return list(resp.jobs)

    def abort_job(self, name: str, reason: str = "") -> admin_pb2.JobStatus:
        """Abort job ``name`` and its running round; a job that ended is left as it is."""
        req = admin_pb2.AbortJobRequest(name=name, reason=reason)
        result: admin_pb2.JobStatus = self._call(self._stub.AbortJob, req, "AbortJob")
        return result

    def pause_job(self, name: str) -> admin_pb2.JobStatus:
        """Open no further round of ``name`` until :meth:`resume_job`."""
        req = admin_pb2.JobRequest(name=name)
        result: admin_pb2.JobStatus = self._call(self._stub.PauseJob, req, "PauseJob")
        return result

    def resume_job(self, name: str) -> admin_pb2.JobStatus:
        req = admin_pb2.JobRequest(name=name)
        result: admin_pb2.JobStatus = self._call(self._stub.ResumeJob, req, "ResumeJob")
        return result

    def rounds(self, job: str | None = None) -> list[admin_pb2.RoundStatus]:
        """Every round the store knows (or those of ``job``), oldest first; entries carry
        no directory or params (:meth:`status` has them)."""
        req = admin_pb2.ListRoundsRequest(job=job or "")
        resp = self._call(self._stub.ListRounds, req, "ListRounds")
        return list(resp.rounds)

    def wait_job(self, name: str, timeout: float = 600.0, poll: float = 0.1) -> admin_pb2.JobStatus:
        """Poll until the job is no longer running or paused (or ``timeout`` passes)."""
        end = time.monotonic() + timeout
        while True:
            st = self.job(name)
            if st.status not in ("running", "paused") or time.monotonic() > end:
                return st
            time.sleep(poll)
