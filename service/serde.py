"""Conversion between the core's objects and protobuf frames; chunking with bounds.

Protocol messages stay the core's own bytes (:mod:`secagg.messages`): here they are only
cut into :class:`Chunk` frames and put back together. The assembler checks every size
against the round's bounds *before* it allocates the message buffer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from secagg.errors import ConfigurationError, MalformedMessage
from secagg.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from secagg.messages import (
    MAX_TEXT,
    NONCE_BYTES,
    SESSION_ID_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    SHARE_COMMIT_BYTES,
)
from secagg.params import ROUND_ID_BYTES, Mode, RoundParams
from secagg.policy import MAX_BLAME_CHECKS
from secagg.quantize import FEDAVG_MAX_WEIGHT
from secagg.server import StageTimeouts
from secagg.service._gen import admin_pb2, aggregation_pb2, common_pb2
from secagg.service.errors import TooLarge
from secagg.service.store import JobRecord, Member, ParticipantRecord, RoundRecord
from secagg.shamir import SHARE_BYTES

if TYPE_CHECKING:
    from secagg.service.coordinator import JobSpec, RoundSpec

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Assembler",
    "JoinedRound",
    "ack_frame",
    "chunk_message",
    "deadlines_from_proto",
    "deadlines_to_proto",
    "max_client_message_bytes",
    "max_server_message_bytes",
    "round_info_from_proto",
    "server_frames",
]

DEFAULT_CHUNK_BYTES = 1 << 20
"""1 MiB chunks: well under gRPC's 4 MiB default, large enough to amortise framing."""

HEADER_BYTES = 4 + 1 + 1 + ROUND_ID_BYTES + 4
"""magic, version, type, round id, sender (secagg.messages)."""


def max_client_message_bytes(params: RoundParams) -> int:
    """Largest message an honest client of this round can send (bounds what we allocate)."""
    n, deg = params.n_clients, params.degree
    pair_list = 4 + (deg + 1) * (4 + SHARE_BYTES)
    k = min(deg, n - 1)
    dp_seeds = _dp_seeds(params)
    sizes = (
        4 * PUBLIC_KEY_BYTES + SIGNATURE_BYTES,  # AdvertiseKeys (keys, two commitments)
        SESSION_ID_BYTES + NONCE_BYTES,  # NonceReveal
        SESSION_ID_BYTES  # ShareKeys: bundles, then one signed commitment per holder
        + 4
        + min(deg, n - 1) * (4 + SHARE_CIPHERTEXT_BYTES)
        + 4
        + min(deg + 1, n) * (4 + SHARE_COMMIT_BYTES)
        + _dp_share_section(k, dp_seeds),
        SESSION_ID_BYTES + 8 + 8 * params.words,  # MaskedInput
        SESSION_ID_BYTES + SIGNATURE_BYTES,  # ConsistencySignature
        SESSION_ID_BYTES + 2 * pair_list + _dp_unmask_section(k, dp_seeds),  # UnmaskShares
        _encrypted_bytes(params, seeded=True) + SIGNATURE_BYTES,  # EncryptedInput
        SESSION_ID_BYTES + 1,  # ResultVerdict
        # BlameVerdict: checked ids, (id, reason) pairs, signature
        SESSION_ID_BYTES + 4 + 4 * n + 4 + n * (8 + MAX_TEXT) + SIGNATURE_BYTES,
    )
    return HEADER_BYTES + max(sizes)


def _dp_seeds(params: RoundParams) -> int:
    """``L``: removable DP noise seeds each client shares (0 without DP; docs/dp.md)."""
    return 0 if params.dp is None else params.dp.plan.components - 1


def _dp_share_section(k: int, seeds: int) -> int:
    """Trailing DP part of ShareKeys / ShareDelivery with ``k`` share ciphertexts:
    ``1 + 4 + k (4 + 33 L + 16) + 4 + (k + 1)(4 + 32 L)``, plus the precompute salts of
    noise drawn before the round, ``4 + (k + 1)(4 + 32)`` (at most one per dealer; a
    ShareKeys carries one, 32 bytes), 0 without DP."""
    if seeds == 0:
        return 0
    salts = 4 + (k + 1) * (4 + 32)
    return 1 + 4 + k * (4 + SHARE_BYTES * seeds + 16) + 4 + (k + 1) * (4 + 32 * seeds) + salts


def _dp_unmask_section(k: int, seeds: int) -> int:
    """DP part of UnmaskShares: ``4 + (k + 1) L 38`` (0 without DP)."""
    return 0 if seeds == 0 else 4 + (k + 1) * seeds * 38


def _encrypted_bytes(params: RoundParams, *, seeded: bool) -> int:
    """Session id plus the ciphertext list of a ckks/hybrid vector (0 in masked rounds)."""
    if params.mode is Mode.MASKED:
        return 0
    he = params.he
    return (
        SESSION_ID_BYTES + 4 + he.n_ciphertexts * (4 + he.ciphertext_bytes_range(seeded=seeded)[1])
    )


def _upload_bytes(params: RoundParams) -> int:
    """One encoded EncryptedInput as a blame request forwards it (0 unless hybrid)."""
    if params.mode is not Mode.HYBRID:
        return 0
    return HEADER_BYTES + _encrypted_bytes(params, seeded=True) + SIGNATURE_BYTES


def max_server_message_bytes(params: RoundParams) -> int:
    """Largest message the server of this round sends (bounds the client's buffer)."""
    n = params.n_clients
    ids = 4 + 4 * n
    sizes = (
        4 + n * (4 + 4 * PUBLIC_KEY_BYTES + SIGNATURE_BYTES),  # Roster
        SESSION_ID_BYTES + 4 + n * (4 + NONCE_BYTES),  # NonceReveals
        SESSION_ID_BYTES  # ShareDelivery: bundles and their signed commitments
        + 4
        + n * (4 + SHARE_CIPHERTEXT_BYTES)
        + 4
        + n * (4 + SHARE_COMMIT_BYTES)
        + _dp_share_section(n, _dp_seeds(params)),
        SESSION_ID_BYTES + ids,  # ConsistencyRequest
        SESSION_ID_BYTES + 2 * ids + 4 + n * (4 + SIGNATURE_BYTES),  # UnmaskRequest
        SESSION_ID_BYTES + ids + 8 + 8 * params.words,  # AggregateResult (packed words)
        ids + _encrypted_bytes(params, seeded=False),  # EncryptedResult
        8 + 2 * 1024,  # Abort
        # BlameRequest: at most the default policy's checks, each a whole EncryptedInput
        SESSION_ID_BYTES + 4 + MAX_BLAME_CHECKS * (4 + _upload_bytes(params)),
    )
    return HEADER_BYTES + max(sizes)


def chunk_message(seq: int, data: bytes, chunk_bytes: int) -> Iterator[common_pb2.Chunk]:
    """Cut one encoded message into chunks of at most ``chunk_bytes``."""
    total = len(data)
    view = memoryview(data)
    for offset in range(0, total, chunk_bytes):
        piece = bytes(view[offset : offset + chunk_bytes])
        yield common_pb2.Chunk(seq=seq, total=total, offset=offset, data=piece)


def server_frames(seq: int, data: bytes, chunk_bytes: int) -> list[bytes]:
    """Serialized ``ServerFrame`` chunks of one server message (built once, sent to many)."""
    return [
        aggregation_pb2.ServerFrame(chunk=c).SerializeToString()
        for c in chunk_message(seq, data, chunk_bytes)
    ]


def ack_frame(seq: int, duplicate: bool) -> bytes:
    """A serialized ``ServerFrame`` acknowledging client message ``seq``."""
    ack = aggregation_pb2.Ack(seq=seq, duplicate=duplicate)
    return aggregation_pb2.ServerFrame(ack=ack).SerializeToString()


class Assembler:
    """Puts chunks back into messages, refusing any size over its bound before allocating.

    Parameters
    ----------
    max_chunk:
        Largest ``Chunk.data`` accepted.
    max_message:
        Largest ``Chunk.total`` accepted.
    """

    def __init__(self, max_chunk: int, max_message: int) -> None:
        self.max_chunk = max_chunk
        self.max_message = max_message
        self._buf: bytearray | None = None
        self._seq = 0
        self._total = 0
        self._filled = 0

    @property
    def busy(self) -> bool:
        """Whether a message is partly received."""
        return self._buf is not None

    def add(self, chunk: common_pb2.Chunk) -> tuple[int, memoryview] | None:
        """Take one chunk; return ``(seq, message)`` once a message is complete.

        Raises
        ------
        TooLarge
            A chunk or announced message over its bound.
        MalformedMessage
            Chunks out of order, overlapping, or inconsistent in their totals.
        """
        data = chunk.data
        if len(data) > self.max_chunk:
            raise TooLarge(f"chunk of {len(data)} bytes exceeds the limit of {self.max_chunk}")
        if self._buf is None:
            if chunk.offset != 0:
                raise MalformedMessage("first chunk of a message must have offset 0")
            if chunk.total > self.max_message:
                raise TooLarge(
                    f"message of {chunk.total} bytes exceeds this round's limit of "
                    f"{self.max_message}"
                )
            if chunk.total == 0:
                raise MalformedMessage("empty message")
            # Grown as chunks arrive, never sized from the announced total: a client that
            # announces a large message and stalls holds only what it actually sent.
            self._buf = bytearray()
            self._seq = chunk.seq
            self._total = chunk.total
            self._filled = 0
        elif chunk.seq != self._seq or chunk.offset != self._filled or chunk.total != self._total:
            raise MalformedMessage("chunk out of order or inconsistent with its message")
        end = self._filled + len(data)
        if end > self._total or not data:
            raise MalformedMessage("chunk overruns its message or is empty")
        self._buf += data
        self._filled = end
        if end < self._total:
            return None
        done, self._buf = self._buf, None
        return self._seq, memoryview(done)


_STAGES = tuple(f.name for f in fields(StageTimeouts))


def deadlines_to_proto(t: StageTimeouts) -> common_pb2.StageDeadlines:
    return common_pb2.StageDeadlines(**{s: float(getattr(t, s)) for s in _STAGES})


def deadlines_from_proto(
    d: common_pb2.StageDeadlines | None, default: StageTimeouts
) -> StageTimeouts:
    """Stage deadlines with zero (unset) fields taken from ``default``."""
    values = {}
    for s in _STAGES:
        v = float(getattr(d, s)) if d is not None else 0.0
        if v < 0 or v != v:
            raise MalformedMessage(f"deadline {s} must be positive")
        values[s] = v if v > 0 else float(getattr(default, s))
    return StageTimeouts(**values)


def deadlines_dict(t: StageTimeouts) -> dict[str, float]:
    return {s: float(getattr(t, s)) for s in _STAGES}


@dataclass(frozen=True)
class JoinedRound:
    """What a participant learns from ``GetRound``."""

    round_id: bytes
    job: str
    params: RoundParams
    directory: Mapping[int, bytes]
    names: Mapping[int, str]
    client_id: int
    deadlines: StageTimeouts
    insecure_plaintext: bool
    max_chunk_bytes: int
    max_message_bytes: int
    status: str
    signed_entries: Mapping[int, bytes] = field(default_factory=dict)
    """Client id -> the authority-signed entry the server served (empty if none)."""
    groups: int = 0
    """Sharded round: its number of groups (``> 1``); 0 for an ordinary round."""


def round_info_from_proto(info: aggregation_pb2.RoundInfo) -> JoinedRound:
    """Decode and sanity-check a ``RoundInfo`` (raises ``MalformedMessage``)."""
    params = RoundParams.decode(info.params)
    if params.round_id != info.round_id:
        raise MalformedMessage("round info names another round than its parameters")
    directory: dict[int, bytes] = {}
    names: dict[int, str] = {}
    entries: dict[int, bytes] = {}
    for e in info.directory:
        if e.client_id in directory or len(e.identity_key) != PUBLIC_KEY_BYTES:
            raise MalformedMessage("directory repeats a client or holds a malformed key")
        directory[e.client_id] = bytes(e.identity_key)
        names[e.client_id] = e.name
        if e.signed_entry:
            entries[e.client_id] = bytes(e.signed_entry)
    if info.client_id not in directory:
        raise MalformedMessage("the directory does not list the caller")
    return JoinedRound(
        round_id=bytes(info.round_id),
        job=info.job,
        params=params,
        directory=directory,
        names=names,
        client_id=info.client_id,
        deadlines=deadlines_from_proto(info.deadlines, StageTimeouts()),
        insecure_plaintext=info.insecure_plaintext,
        max_chunk_bytes=info.max_chunk_bytes or DEFAULT_CHUNK_BYTES,
        max_message_bytes=info.max_message_bytes,
        status=info.status,
        signed_entries=entries,
        groups=info.groups,
    )


def directory_to_proto(members: Sequence[Member]) -> list[common_pb2.DirectoryEntry]:
    return [
        common_pb2.DirectoryEntry(
            client_id=m.client_id,
            name=m.name,
            identity_key=m.public_key,
            signed_entry=m.signed_entry,
        )
        for m in members
    ]


def round_info_to_proto(
    *,
    round_id: bytes,
    job: str,
    params: RoundParams,
    members: Sequence[Member],
    client_id: int,
    deadlines: StageTimeouts,
    plaintext: bool,
    max_chunk_bytes: int,
    max_message_bytes: int,
    status: str,
    groups: int = 0,
) -> aggregation_pb2.RoundInfo:
    return aggregation_pb2.RoundInfo(
        round_id=round_id,
        job=job,
        params=params.encode(),
        directory=directory_to_proto(members),
        client_id=client_id,
        deadlines=deadlines_to_proto(deadlines),
        insecure_plaintext=plaintext,
        max_chunk_bytes=max_chunk_bytes,
        max_message_bytes=max_message_bytes,
        status=status,
        groups=groups,
    )


def round_status_to_proto(
    *,
    round_id: bytes,
    job: str,
    stage: str,
    members: Sequence[Member],
    outcome: Mapping[str, Any],
    params: bytes,
    plaintext: bool,
) -> admin_pb2.RoundStatus:
    """``outcome`` is what the audit log records (:meth:`RoundRunner.outcome`)."""
    dropouts = [
        common_pb2.Dropout(
            client_id=int(d["client_id"]), name=d["name"], stage=d["stage"], reason=d["reason"]
        )
        for d in outcome.get("dropouts", [])
    ]
    return admin_pb2.RoundStatus(
        round_id=round_id,
        job=job,
        status=str(outcome.get("status", "running")),
        stage=stage,
        directory=directory_to_proto(members),
        dropouts=dropouts,
        contributors=[int(c) for c in outcome.get("contributors", [])],
        abort_stage=str(outcome.get("stage", "")) if outcome.get("status") == "aborted" else "",
        abort_reason=str(outcome.get("reason", "")),
        aggregate_sha256=str(outcome.get("aggregate_sha256", "")),
        stage_seconds={str(k): float(v) for k, v in outcome.get("stage_seconds", {}).items()},
        params=params,
        insecure_plaintext=plaintext,
    )


def participant_to_proto(p: ParticipantRecord) -> admin_pb2.Participant:
    return admin_pb2.Participant(
        name=p.name,
        identity_key=p.public_key,
        enrolled_at=p.enrolled_at,
        revoked_at=p.revoked_at or 0.0,
    )


def _choice(value: str, default: str = "auto") -> str:
    return value.strip() or default


def _dp_doc(text: str, name: str) -> dict[str, Any] | None:
    """A ``dp_json`` field: empty, or a JSON object (one-line error otherwise)."""
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"{name} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigurationError(f"{name} must be a JSON object")
    return doc


def round_spec_from_proto(
    req: admin_pb2.CreateRoundRequest, default_deadlines: StageTimeouts
) -> RoundSpec:
    from secagg.service.coordinator import RoundSpec
    from secagg.service.dpspec import DPSpec

    clip = req.clip or 8.0
    dp_doc = _dp_doc(req.dp_json, "dp_json")
    return RoundSpec(
        job=req.job,
        participants=list(req.participants),
        dim=req.dim,
        mode=_choice(req.mode, "masked"),
        bits=req.bits or 16,
        clip=clip,
        max_weight=req.max_weight or 1,
        neighbors=_choice(req.neighbors),
        threshold=_choice(req.threshold),
        deadlines=deadlines_from_proto(
            req.deadlines if req.HasField("deadlines") else None, default_deadlines
        ),
        tolerate_dropout=req.tolerate_dropout if req.tolerate_dropout > 0 else None,
        tolerate_corrupt=req.tolerate_corrupt if req.tolerate_corrupt > 0 else None,
        he_context=bytes(req.he_context) or None,
        publish_after=req.publish_after or None,
        layout=bytes(req.layout),
        dp=DPSpec.from_json(dp_doc, clip=clip) if dp_doc is not None else None,
        groups=req.groups,
        on_group_abort=req.on_group_abort or "publish",
    )


def round_spec_to_proto(spec: RoundSpec) -> admin_pb2.CreateRoundRequest:
    return admin_pb2.CreateRoundRequest(
        job=spec.job,
        participants=list(spec.participants),
        dim=spec.dim,
        mode=spec.mode,
        bits=spec.bits,
        clip=spec.clip,
        max_weight=spec.max_weight,
        neighbors=spec.neighbors,
        threshold=spec.threshold,
        deadlines=deadlines_to_proto(spec.deadlines),
        tolerate_dropout=spec.tolerate_dropout or 0.0,
        tolerate_corrupt=spec.tolerate_corrupt or 0.0,
        he_context=spec.he_context or b"",
        publish_after=spec.publish_after or 0,
        layout=spec.layout,
        dp_json=json.dumps(spec.dp.to_json()) if spec.dp is not None else "",
        groups=spec.groups,
        on_group_abort=spec.on_group_abort if spec.groups > 1 else "",
    )


def _mode_name(params: bytes, plaintext: bool) -> str:
    if plaintext:
        return "plaintext"
    try:
        return RoundParams.decode(params).mode.name.lower()
    except Exception:  # a stored round the core no longer decodes: say so, do not fail
        return "unknown"


def set_round_place(st: admin_pb2.RoundStatus, rec: RoundRecord) -> None:
    """Fill the fields of ``st`` that only the store knows: job index, mode, times."""
    st.in_job = rec.job_index is not None
    st.job_index = rec.job_index or 0
    st.mode = _mode_name(rec.params, rec.plaintext)
    st.opened_at = rec.created_at
    st.finished_at = rec.ended_at or 0.0


def round_summary_to_proto(
    rec: RoundRecord, stage: str, outcome: Mapping[str, Any]
) -> admin_pb2.RoundStatus:
    """A ``ListRounds`` entry: outcome and place, without directory or params."""
    st = round_status_to_proto(
        round_id=rec.round_id,
        job=rec.job,
        stage=stage,
        members=(),
        outcome=outcome,
        params=b"",
        plaintext=rec.plaintext,
    )
    set_round_place(st, rec)
    return st


def job_spec_from_proto(
    req: admin_pb2.CreateJobRequest, default_deadlines: StageTimeouts
) -> JobSpec:
    """The job an operator asked for (``CreateJob``); zero fields take the defaults."""
    from secagg.service.coordinator import JobSpec

    inner = admin_pb2.CreateRoundRequest()
    inner.CopyFrom(req.round)
    inner.dp_json = ""  # the job's DP is parsed with the job's rounds as its default
    r = round_spec_from_proto(inner, default_deadlines)
    dp = _dp_doc(req.dp_json, "dp_json")
    if dp is None:
        dp = _dp_doc(req.round.dp_json, "round.dp_json")
    if not (req.every == req.every and req.every >= 0):
        raise ConfigurationError(f"every must be >= 0 seconds, got {req.every}")
    return JobSpec(
        name=req.name,
        participants=r.participants,
        dim=r.dim,
        mode=r.mode,
        bits=r.bits,
        clip=r.clip,
        max_weight=req.round.max_weight or FEDAVG_MAX_WEIGHT,
        neighbors=r.neighbors,
        threshold=r.threshold,
        deadlines=r.deadlines,
        tolerate_dropout=r.tolerate_dropout,
        tolerate_corrupt=r.tolerate_corrupt,
        he_context=r.he_context,
        publish_after=r.publish_after,
        layout=r.layout,
        rounds=req.rounds or None,
        every=req.every or None,
        dp=dp,
        groups=r.groups,
        on_group_abort=r.on_group_abort,
    )


def job_spec_to_proto(spec: JobSpec) -> admin_pb2.CreateJobRequest:
    return admin_pb2.CreateJobRequest(
        name=spec.name,
        round=round_spec_to_proto(spec.round_spec()),
        rounds=spec.rounds or 0,
        every=spec.every or 0.0,
        dp_json=json.dumps(spec.dp_spec.to_json()) if spec.dp_spec is not None else "",
    )


def job_status_to_proto(rec: JobRecord, spec: JobSpec, current_round: bytes) -> admin_pb2.JobStatus:
    doc = dict(rec.spec)
    if doc.get("he_context"):
        doc["he_context"] = None
        doc["he_context_sha256"] = hashlib.sha256(spec.he_context or b"").hexdigest()
    return admin_pb2.JobStatus(
        name=rec.name,
        status=rec.status,
        rounds_total=rec.rounds_total or 0,
        rounds_done=rec.rounds_done,
        rounds_completed=rec.rounds_completed,
        rounds_aborted=rec.rounds_aborted,
        next_index=rec.next_index,
        current_round=current_round,
        created_at=rec.created_at,
        created_by=rec.created_by,
        ended_at=rec.ended_at or 0.0,
        reason=rec.reason,
        every=spec.every or 0.0,
        participants=list(spec.participants),
        mode=spec.mode,
        dim=spec.dim,
        spec_json=json.dumps(doc, sort_keys=True),
    )
