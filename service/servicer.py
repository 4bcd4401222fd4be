"""Thin gRPC servicers: authenticate, convert, delegate; errors become statuses in one place."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from secagg.errors import SecAggError
from secagg.service import serde
from secagg.service._gen import admin_pb2, admin_pb2_grpc, aggregation_pb2
from secagg.service.auth import AdminVerifier, Caller, CallVerifier
from secagg.service.config import ServerConfig
from secagg.service.coordinator import Coordinator, JobSpec
from secagg.service.errors import NotFound, TooManyStreams, Unauthenticated, status_for
from secagg.service.rounds import RoundRunner
from secagg.service.session import StreamSession
from secagg.service.store import RUNNING, JobRecord, RoundRecord

__all__ = [
    "ADMIN_SERVICE",
    "GET_ROUND",
    "SESSION",
    "WATCH_ROUNDS",
    "AdminServicer",
    "AggregationServicer",
]

log = logging.getLogger("secagg.service.servicer")

_K = TypeVar("_K", bound=Hashable)

SERVICE = aggregation_pb2.DESCRIPTOR.services_by_name["Aggregation"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
GET_ROUND = f"/{SERVICE}/GetRound"
SESSION = f"/{SERVICE}/Session"
WATCH_ROUNDS = f"/{SERVICE}/WatchRounds"
MAX_WATCHES_PER_PARTICIPANT = 4
"""Open ``WatchRounds`` streams one participant may hold on one job (more are refused)."""
ROUND_INFO_CACHE = 64
"""Rounds whose serialized ``RoundInfo`` (directory included) ``GetRound`` keeps."""


async def _fail(context: Any, exc: Exception) -> NoReturn:
    if not isinstance(exc, SecAggError):
        log.exception("unexpected error in a handler", exc_info=exc)
    code, details = status_for(exc)
    await context.abort(code, details)
    raise AssertionError("context.abort returned")  # pragma: no cover


def _frame_bytes(frame: bytes) -> bytes:
    return frame


class AggregationServicer:
    """The participant API.

    ``Session`` yields pre-serialized ``ServerFrame`` bytes (the aggregate is cut and
    serialized once per round, not once per client), so it is registered by :meth:`register`
    with a pass-through serializer instead of the generated ``add_..._to_server``.
    """

    def __init__(self, coordinator: Coordinator, verifier: CallVerifier, config: ServerConfig):
        self._coord = coordinator
        self._verifier = verifier
        self._config = config
        self._open: collections.Counter[tuple[bytes, int]] = collections.Counter()
        self._watching: collections.Counter[tuple[str, str]] = collections.Counter()
        self._info: dict[bytes, tuple[RoundRunner, bytes]] = {}
        """Round id -> (runner, its serialized ``RoundInfo`` without caller and status)."""

    def register(self, server: Any) -> None:
        """Add this servicer's handlers to a ``grpc.aio`` server."""
        handlers = {
            "GetRound": grpc.unary_unary_rpc_method_handler(
                self.GetRound,
                request_deserializer=aggregation_pb2.GetRoundRequest.FromString,
                response_serializer=_frame_bytes,
            ),
            "Session": grpc.stream_stream_rpc_method_handler(
                self.Session,
                request_deserializer=aggregation_pb2.ClientFrame.FromString,
                response_serializer=_frame_bytes,
            ),
            "WatchRounds": grpc.unary_stream_rpc_method_handler(
                self.WatchRounds,
                request_deserializer=aggregation_pb2.WatchRoundsRequest.FromString,
                response_serializer=aggregation_pb2.JobEvent.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def _caller(self, context: Any, method: str) -> Caller:
        tls = self._config.tls
        bind = tls is not None and tls.mutual and tls.bind_names
        cn = None
        if bind:
            names = context.auth_context().get("x509_common_name") or [b""]
            cn = names[0].decode(errors="replace")
        return self._verifier.verify(
            context.invocation_metadata(), method, peer_common_name=cn, require_cert_binding=bind
        )

    def _seat(self, context: Any, method: str) -> tuple[RoundRunner, int]:
        caller = self._caller(context, method)
        runner = self._coord.runner(caller.round_id)
        return runner, runner.member(caller.participant.name).client_id

    async def GetRound(  # noqa: N802
        self, request: aggregation_pb2.GetRoundRequest, context: Any
    ) -> bytes:
        """The serialized ``RoundInfo`` for the caller.

        Everything but the caller's id and the round's status is the same for every
        participant, and the directory grows with the round: it is serialized once per round
        (:meth:`_round_info_base`) and the two per-caller fields are appended (protobuf
        concatenation is a merge), so ``n`` calls cost ``O(n)`` entries, not ``O(n^2)``.
        """
        try:
            runner, cid = self._seat(context, GET_ROUND)
            if request.round_id != runner.round_id:
                raise Unauthenticated("the call is signed for another round")
            own = aggregation_pb2.RoundInfo(client_id=cid, status=runner.status)
            return self._round_info_base(runner) + own.SerializeToString()
        except Exception as exc:
            await _fail(context, exc)

    def _round_info_base(self, runner: RoundRunner) -> bytes:
        hit = self._info.get(runner.round_id)
        if hit is not None and hit[0] is runner:
            return hit[1]
        base = serde.round_info_to_proto(
            round_id=runner.round_id,
            job=runner.job,
            params=runner.params,
            members=runner.members,
            client_id=0,
            deadlines=runner.deadlines,
            plaintext=runner.plaintext,
            max_chunk_bytes=self._config.max_chunk_bytes,
            max_message_bytes=runner.max_message_bytes,
            status="",
            groups=getattr(runner, "groups", 0),  # a sharded front door (service/sharded.py)
        ).SerializeToString()
        if len(self._info) >= ROUND_INFO_CACHE:
            self._info.pop(next(iter(self._info)))
        self._info[runner.round_id] = (runner, base)
        return base

    async def Session(  # noqa: N802
        self, request_iterator: AsyncIterator[aggregation_pb2.ClientFrame], context: Any
    ) -> AsyncIterator[bytes]:
        try:
            runner, cid = self._seat(context, SESSION)
            cap = self._config.max_streams_per_participant
            with _held(
                self._open,
                (runner.round_id, cid),
                cap,
                f"client {cid} already holds {cap} open streams in this round (the limit)",
            ):
                stream = StreamSession(
                    runner, cid, self._config.max_chunk_bytes, self._config.hello_timeout
                )
                async for frame in stream.frames(request_iterator):
                    yield frame
        except Exception as exc:
            await _fail(context, exc)

    async def WatchRounds(  # noqa: N802
        self, request: aggregation_pb2.WatchRoundsRequest, context: Any
    ) -> AsyncIterator[aggregation_pb2.JobEvent]:
        """The rounds of one job as they open, for an authenticated participant of it."""
        try:
            caller = self._caller(context, WATCH_ROUNDS)
            if any(caller.round_id):
                raise Unauthenticated("a WatchRounds call is signed with a zero round id")
            name = caller.participant.name
            with _held(
                self._watching,
                (request.job, name),
                MAX_WATCHES_PER_PARTICIPANT,
                f"participant {name!r} already watches job {request.job!r} on "
                f"{MAX_WATCHES_PER_PARTICIPANT} streams (the limit)",
            ):
                async for ev in self._coord.jobs.watch(request.job, name):
                    yield ev
        except Exception as exc:
            await _fail(context, exc)


@contextlib.contextmanager
def _held(counts: collections.Counter[_K], key: _K, cap: int, refusal: str) -> Iterator[None]:
    """Hold one of ``cap`` seats of ``key`` in ``counts`` for the block (``TooManyStreams``
    with ``refusal`` when all are taken); the seat is given back however the block ends."""
    if counts[key] >= cap:
        raise TooManyStreams(refusal)
    counts[key] += 1
    try:
        yield
    finally:
        counts[key] -= 1
        if counts[key] <= 0:
            del counts[key]


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """The operator API: every call authenticated to an operator name (its audit entries
    name it), by operator key or by the DEPRECATED shared token."""

    def __init__(self, coordinator: Coordinator, config: ServerConfig):
        self._coord = coordinator
        self._store = coordinator.store
        self._config = config
        self._verifier = AdminVerifier(self._store, config.admin_token, skew=config.clock_skew)

    def _check(self, context: Any, method: str) -> str:
        tls = self._config.tls
        bind = tls is not None and tls.mutual and tls.bind_names
        cn = None
        if bind:
            names = context.auth_context().get("x509_common_name") or [b""]
            cn = names[0].decode(errors="replace")
        return self._verifier.verify(
            context.invocation_metadata(),
            f"/{ADMIN_SERVICE}/{method}",
            peer_common_name=cn,
            require_cert_binding=bind,
        )

    async def _participant_change(
        self,
        context: Any,
        method: str,
        change: Callable[..., Any],
        *args: Any,
        signed_entry: bytes = b"",
    ) -> admin_pb2.Participant:
        """One admin RPC that changes a participant: authenticate the operator, run
        ``change(*args, operator=...)`` on the store off the event loop, answer the record
        with the signed entry it now carries."""
        try:
            operator = self._check(context, method)
            rec = await asyncio.to_thread(functools.partial(change, *args, operator=operator))
            out = serde.participant_to_proto(rec)
            out.signed_entry = signed_entry
            return out
        except Exception as exc:
            await _fail(context, exc)

    async def Enroll(self, request: admin_pb2.EnrollRequest, context: Any) -> admin_pb2.Participant:  # noqa: N802
        return await self._participant_change(
            context,
            "Enroll",
            self._store.enroll,
            request.name,
            request.identity_key,
            request.signed_entry,
            signed_entry=request.signed_entry,
        )

    async def SetSignedEntry(  # noqa: N802
        self, request: admin_pb2.SetSignedEntryRequest, context: Any
    ) -> admin_pb2.Participant:
        return await self._participant_change(
            context,
            "SetSignedEntry",
            self._store.set_signed_entry,
            request.name,
            request.signed_entry,
            signed_entry=request.signed_entry,
        )

    async def Revoke(self, request: admin_pb2.RevokeRequest, context: Any) -> admin_pb2.Participant:  # noqa: N802
        return await self._participant_change(context, "Revoke", self._store.revoke, request.name)

    async def RotateKey(  # noqa: N802
        self, request: admin_pb2.RotateKeyRequest, context: Any
    ) -> admin_pb2.Participant:
        return await self._participant_change(
            context,
            "RotateKey",
            self._store.rotate,
            request.name,
            request.identity_key,
            request.signed_entry,
            signed_entry=request.signed_entry,
        )

    async def ListParticipants(  # noqa: N802
        self, request: admin_pb2.ListParticipantsRequest, context: Any
    ) -> admin_pb2.ListParticipantsResponse:
        try:
            self._check(context, "ListParticipants")
            recs = await asyncio.to_thread(self._store.participants)
            return admin_pb2.ListParticipantsResponse(
                participants=[serde.participant_to_proto(r) for r in recs]
            )
        except Exception as exc:
            await _fail(context, exc)

    async def CreateRound(  # noqa: N802
        self, request: admin_pb2.CreateRoundRequest, context: Any
    ) -> admin_pb2.RoundStatus:
        try:
            operator = self._check(context, "CreateRound")
            spec = serde.round_spec_from_proto(request, self._config.deadlines)
            runner = await self._coord.create(spec, operator=operator)
            return await self._status(runner.round_id)
        except Exception as exc:
            await _fail(context, exc)

    async def GetRoundStatus(  # noqa: N802
        self, request: admin_pb2.RoundStatusRequest, context: Any
    ) -> admin_pb2.RoundStatus:
        try:
            self._check(context, "GetRoundStatus")
            return await self._status(request.round_id)
        except Exception as exc:
            await _fail(context, exc)

    async def AbortRound(  # noqa: N802
        self, request: admin_pb2.AbortRoundRequest, context: Any
    ) -> admin_pb2.RoundStatus:
        try:
            operator = self._check(context, "AbortRound")
            runner = self._coord.runner(request.round_id)
            body = {"operator": operator, "reason": request.reason}
            await asyncio.to_thread(
                self._store.append_audit, "round_abort_requested", runner.round_id.hex(), body
            )
            await runner.abort(request.reason or "aborted by the operator")
            return await self._status(request.round_id)
        except Exception as exc:
            await _fail(context, exc)

    async def CreateJob(  # noqa: N802
        self, request: admin_pb2.CreateJobRequest, context: Any
    ) -> admin_pb2.JobStatus:
        try:
            operator = self._check(context, "CreateJob")
            spec = serde.job_spec_from_proto(request, self._config.deadlines)
            rec = await self._coord.jobs.create(spec, operator=operator)
            return self._job_status(rec)
        except Exception as exc:
            await _fail(context, exc)

    async def GetJob(self, request: admin_pb2.JobRequest, context: Any) -> admin_pb2.JobStatus:  # noqa: N802
        try:
            self._check(context, "GetJob")
            rec = await asyncio.to_thread(self._store.job, request.name)
            if rec is None:
                raise NotFound(f"no job {request.name!r}")
            return self._job_status(rec)
        except Exception as exc:
            await _fail(context, exc)

    async def ListJobs(  # noqa: N802
        self, request: admin_pb2.ListJobsRequest, context: Any
    ) -> admin_pb2.ListJobsResponse:
        try:
            self._check(context, "ListJobs")
            recs = await asyncio.to_thread(self._store.jobs)
            return admin_pb2.ListJobsResponse(jobs=[self._job_status(r) for r in recs])
        except Exception as exc:
            await _fail(context, exc)

    async def AbortJob(  # noqa: N802
        self, request: admin_pb2.AbortJobRequest, context: Any
    ) -> admin_pb2.JobStatus:
        try:
            operator = self._check(context, "AbortJob")
            rec = await self._coord.jobs.abort(request.name, request.reason, operator=operator)
            return self._job_status(rec)
        except Exception as exc:
            await _fail(context, exc)

    async def PauseJob(self, request: admin_pb2.JobRequest, context: Any) -> admin_pb2.JobStatus:  # noqa: N802
        try:
            operator = self._check(context, "PauseJob")
            return self._job_status(await self._coord.jobs.pause(request.name, operator=operator))
        except Exception as exc:
            await _fail(context, exc)

    async def ResumeJob(self, request: admin_pb2.JobRequest, context: Any) -> admin_pb2.JobStatus:  # noqa: N802
        try:
            operator = self._check(context, "ResumeJob")
            rec = await self._coord.jobs.resume(request.name, operator=operator)
            return self._job_status(rec)
        except Exception as exc:
            await _fail(context, exc)

    async def ListRounds(  # noqa: N802
        self, request: admin_pb2.ListRoundsRequest, context: Any
    ) -> admin_pb2.ListRoundsResponse:
        try:
            self._check(context, "ListRounds")
            recs = await asyncio.to_thread(self._store.rounds, request.job or None)
            return admin_pb2.ListRoundsResponse(rounds=[self._round_summary(r) for r in recs])
        except Exception as exc:
            await _fail(context, exc)

    def _job_status(self, rec: JobRecord) -> admin_pb2.JobStatus:
        runner = self._coord.jobs.current(rec.name)
        return serde.job_status_to_proto(
            rec, JobSpec.from_json(rec.spec), runner.round_id if runner else b""
        )

    def _round_summary(self, rec: RoundRecord) -> admin_pb2.RoundStatus:
        """A list entry: the stored outcome, or the live stage of a running round."""
        outcome = rec.outcome or {"status": rec.status}
        stage = rec.status if rec.status != RUNNING else "unknown"
        try:
            runner = self._coord.runner(rec.round_id)
        except SecAggError:
            runner = None
        if runner is not None and rec.status == RUNNING:
            stage = runner.core.stage.value
        return serde.round_summary_to_proto(rec, stage, outcome)

    async def _status(self, round_id: bytes) -> admin_pb2.RoundStatus:
        try:
            runner = self._coord.runner(round_id)
        except SecAggError:
            runner = None
        rec = await asyncio.to_thread(self._store.round, round_id)
        if runner is not None:
            stage, outcome = await asyncio.to_thread(runner.snapshot)
            st = serde.round_status_to_proto(
                round_id=runner.round_id,
                job=runner.job,
                stage=stage,
                members=runner.members,
                outcome=outcome,
                params=runner.params.encode(),
                plaintext=runner.plaintext,
            )
        elif rec is None:
            self._coord.runner(round_id)  # raises NotFound with the reason
            raise AssertionError("unreachable")  # pragma: no cover
        else:
            st = serde.round_status_to_proto(
                round_id=rec.round_id,
                job=rec.job,
                stage=rec.status if rec.status != RUNNING else "unknown",
                members=rec.members,
                outcome=rec.outcome or {"status": rec.status},
                params=rec.params,
                plaintext=rec.plaintext,
            )
        if rec is not None:
            serde.set_round_place(st, rec)
        return st
