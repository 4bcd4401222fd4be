"""Group rounds of a gRPC sharded round on Ray actors (``secagg serve --engine ray``).

Each :class:`GroupServerHost` actor holds the :class:`~secagg.server.SecAggServer` of its
groups; the front door's :class:`~secagg.service.rounds.RoundRunner` of each group drives a
:class:`RayGroupCore`, a :class:`~secagg.service.rounds.RoundCore` whose every call
(receive, tick, abort, depart, rejoin) is one actor call. Only ``bytes``, ``int``,
``float`` and ``str`` cross the boundary: parameters (``RoundParams.encode``), the
directory, the client's message as it came off the wire, and back the messages the core
emitted (their encoding) and the core's state (stage, deadline, records, result, error)
in our own :mod:`secagg.wire` encoding; nothing of ours is pickled. A dead actor
(``ray.kill``, a crash, a lost node) makes the next call raise Ray's error: the group is
aborted there, its clients get the ``Abort`` message naming the error, and the sharded
round goes on under its ``on_group_abort`` policy (docs/sharding.md, "Over gRPC").

``ckks``/``hybrid``: the actor gets the keyless CKKS context as bytes
(``load_server_context`` refuses one with a key) and runs a
:class:`~secagg.he_round.CkksServer` or a hybrid ``SecAggServer``; a completed group's
result crosses back as its encrypted sum (SEAL serializations) and the key-epoch
fingerprint it was summed under, which the front door checks before adding it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from secagg import errors as core_errors
from secagg.errors import DuplicateMessage, MalformedMessage, ProtocolViolation, RoundAborted
from secagg.messages import Abort, Message, decode_message
from secagg.params import MAX_CLIENTS, Mode, RoundParams
from secagg.rounds.base import ClientRecord, RoundResult, Stage
from secagg.server import StageTimeouts
from secagg.wire import Reader, Writer

__all__ = ["GroupServerHost", "RayGroupCore", "RayHosts"]

_TEXT = 1 << 16
_BLOB = 1 << 31
_OK, _VIOLATION, _DUPLICATE = 0, 1, 2
_NO_RESULT, _SUMS, _CIPHERTEXTS = 0, 1, 2
_MAX_CTS = 1 << 16


def _text(w: Writer, s: str) -> Writer:
    return w.var(s.encode()[:_TEXT])


def _read_text(r: Reader) -> str:
    return r.var(_TEXT).decode(errors="replace")


def _encode_state(core: Any) -> bytes:
    w = Writer()
    _text(w, str(core.stage.value)).u8(int(core.done))
    d = core.deadline
    w.u8(int(d is not None)).f64(0.0 if d is None else float(d))
    recs = core.records
    w.u32(len(recs))
    for cid, rec in sorted(recs.items()):
        w.u32(cid).u8(int(rec.active))
        _text(w, rec.dropped_stage.value if rec.dropped_stage else "")
        _text(w, rec.reason or "")
    res = core.result
    if res is not None and res.sums is not None:
        w.u8(_SUMS).ids(list(res.contributors)).u64(int(res.total_weight or 0))
        w.var(res.sums.astype("<u8").tobytes())
    elif res is not None and res.ciphertexts is not None:
        he = core.ctx.he
        w.u8(_CIPHERTEXTS).ids(list(res.contributors)).var(he.epoch.fingerprint)
        w.u32(len(res.ciphertexts))
        for ct in res.ciphertexts:
            w.var(ct)
    else:
        w.u8(_NO_RESULT)
    err = core.error
    w.u8(int(err is not None))
    if err is not None:
        _text(_text(w, str(err.stage)), err.reason)
    times = core.stage_times
    w.u32(len(times))
    for name, sec in times.items():
        _text(w, name).f64(float(sec))
    return w.getvalue()


@dataclass
class _State:
    stage: Stage
    done: bool
    deadline: float | None
    records: dict[int, ClientRecord]
    result: RoundResult | None
    error: RoundAborted | None
    stage_times: dict[str, float]
    key_epoch: bytes = b""


def _decode_state(r: Reader) -> _State:
    stage, done, has_deadline, deadline = Stage(_read_text(r)), bool(r.u8()), r.u8(), r.f64()
    count = r.u32()
    if count > MAX_CLIENTS:
        raise MalformedMessage("too many records")
    records = {}
    for _ in range(count):
        cid, active = r.u32(), bool(r.u8())
        where, reason = _read_text(r), _read_text(r)
        records[cid] = ClientRecord(active, Stage(where) if where else None, reason or None)
    result = None
    epoch = b""
    kind = r.u8()
    if kind == _SUMS:
        contributors, weight = r.ids(MAX_CLIENTS), r.u64()
        sums = np.frombuffer(r.var(_BLOB), dtype="<u8").astype(np.uint64)
        result = RoundResult(contributors, sums, weight)
    elif kind == _CIPHERTEXTS:
        contributors, epoch, n = r.ids(MAX_CLIENTS), r.var(64), r.u32()
        if n > _MAX_CTS:
            raise MalformedMessage(f"{n} ciphertexts in a group result")
        result = RoundResult(contributors, ciphertexts=tuple(r.var(_BLOB) for _ in range(n)))
    elif kind != _NO_RESULT:
        raise MalformedMessage("unknown group result kind")
    error = None
    if r.u8():
        error = RoundAborted(_read_text(r), _read_text(r))
    times = {_read_text(r): r.f64() for _ in range(r.u32())}
    return _State(
        stage, done, deadline if has_deadline else None, records, result, error, times, epoch
    )


def _encode_directory(directory: Mapping[int, bytes]) -> bytes:
    w = Writer().u32(len(directory))
    for cid, key in sorted(directory.items()):
        w.u32(cid).var(key)
    return w.getvalue()


class GroupServerHost:
    """The actor's body: the group servers it holds, keyed by group round id."""

    def __init__(self) -> None:
        self.cores: dict[bytes, Any] = {}

    def open(
        self, params: bytes, directory: bytes, timeouts: bytes, now: float, he: bytes = b""
    ) -> bytes:
        """Open a group's server; ``he`` is the keyless CKKS context (``ckks``/``hybrid``)."""
        from secagg.server import SecAggServer

        p = RoundParams.decode(params)
        r = Reader(directory)
        keys = {r.u32(): r.var(64) for _ in range(r.u32())}
        t = Reader(timeouts)
        stages = StageTimeouts(*(t.f64() for _ in fields(StageTimeouts)))
        core: Any
        if p.mode is Mode.MASKED:
            core = SecAggServer(p, keys, timeouts=stages, now=now)
        else:
            from secagg import ckks
            from secagg.he_round import CkksServer

            ctx = ckks.load_server_context(he, p.he)  # refuses a context with any key
            if p.mode is Mode.CKKS:
                core = CkksServer(p, keys, ctx, timeout=stages.encrypted_input, now=now)
            else:
                core = SecAggServer(p, keys, timeouts=stages, now=now, he_context=ctx)
        self.cores[p.round_id] = core
        return _encode_state(core)

    def call(self, rid: bytes, op: str, cid: int, data: bytes, now: float, text: str) -> bytes:
        core = self.cores[rid]
        w = Writer()
        try:
            if op == "receive":
                msg: Message | bytes
                digest = None
                try:
                    msg = decode_message(data)
                    digest = hashlib.sha256(data).digest()
                except MalformedMessage:
                    msg = data
                out = core.receive(cid, msg, now, digest=digest)
            elif op == "tick":
                out = core.tick(now)
            elif op == "abort":
                stage, _, reason = text.partition("\x00")
                out = core.abort(stage, reason)
            elif op == "depart":
                out = core.depart(cid, now, text)
            else:
                core.rejoin(cid)
                out = []
        except DuplicateMessage:
            w.u8(_DUPLICATE)
        except ProtocolViolation as exc:
            w.u8(_VIOLATION)
            _text(_text(w, type(exc).__name__), str(exc))
            w.u32(exc.client_id if exc.client_id is not None else 0)
            w.u8(int(exc.client_id is not None)).u8(int(exc.drops_sender))
            _text(w, exc.stage or "")
        else:
            w.u8(_OK)
            index: dict[int, int] = {}
            blobs: list[bytes] = []
            for _, m in out:
                if id(m) not in index:
                    index[id(m)] = len(blobs)
                    blobs.append(m.encode())
            w.u32(len(blobs))
            for b in blobs:
                w.var(b)
            w.u32(len(out))
            for c, m in out:
                w.u32(c).u32(index[id(m)])
        return w.getvalue() + _encode_state(core)

    def close(self, rid: bytes) -> None:
        self.cores.pop(rid, None)


class _Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def encode(self) -> bytes:
        return self.data


def _violation(name: str, text: str) -> ProtocolViolation:
    cls = getattr(core_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, ProtocolViolation):
        try:
            return cls(text)
        except TypeError:  # another constructor: keep the type's meaning in the text
            pass
    return ProtocolViolation(f"{name}: {text}")


class RayGroupCore:
    """A group round's core on a Ray actor; duck-types :class:`RoundCore`."""

    def __init__(
        self,
        ray: Any,
        actor: Any,
        worker: int,
        params: RoundParams,
        directory: Mapping[int, bytes],
        timeouts: StageTimeouts,
        now: float,
        he: bytes = b"",
    ) -> None:
        self._ray, self._actor, self.worker = ray, actor, worker
        self.round_id = params.round_id
        self.warnings: list[str] = list(params.warnings)
        t = Writer()
        for f in fields(StageTimeouts):
            t.f64(float(getattr(timeouts, f.name)))
        state = ray.get(
            actor.open.remote(params.encode(), _encode_directory(directory), t.getvalue(), now, he)
        )
        self._s = _decode_state(Reader(state))

    stage = property(lambda self: self._s.stage)
    done = property(lambda self: self._s.done)
    deadline = property(lambda self: self._s.deadline)
    result = property(lambda self: self._s.result)
    error = property(lambda self: self._s.error)
    records = property(lambda self: self._s.records)
    stage_times = property(lambda self: self._s.stage_times)
    key_epoch = property(lambda self: self._s.key_epoch)
    """``ckks``/``hybrid``: the key-epoch fingerprint the actor says it summed under."""

    def _call(self, op: str, cid: int, data: bytes, now: float, text: str = "") -> list[Any]:
        if self._s.done:
            return []
        try:
            reply = self._ray.get(self._actor.call.remote(self.round_id, op, cid, data, now, text))
        except self._ray.exceptions.RayError as exc:
            return self._lost(exc)
        r = Reader(reply)
        kind = r.u8()
        out: list[Any] = []
        exc_: ProtocolViolation | None = None
        if kind == _DUPLICATE:
            exc_ = DuplicateMessage("a repeat of an accepted message", client_id=cid)
        elif kind == _VIOLATION:
            exc_ = _violation(_read_text(r), _read_text(r))
            who, has, drops = r.u32(), r.u8(), r.u8()
            exc_.client_id = who if has else None
            exc_.stage = _read_text(r) or None
            exc_.drops_sender = bool(drops)
        else:
            blobs = [_Raw(r.var(_BLOB)) for _ in range(r.u32())]
            out = [(r.u32(), blobs[r.u32()]) for _ in range(r.u32())]
        self._s = _decode_state(r)
        if exc_ is not None:
            raise exc_
        return out

    def _lost(self, exc: BaseException) -> list[Any]:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"aggregator worker {self.worker} lost: {type(exc).__name__}: {first}"[:500]
        stage = str(self._s.stage.value)
        self._s.error = RoundAborted(stage, reason)
        self._s.done, self._s.deadline, self._s.stage = True, None, Stage.ABORTED
        msg = Abort(self.round_id, 0, stage, reason)
        return [(c, msg) for c, rec in sorted(self._s.records.items()) if rec.active]

    def receive(
        self, client_id: int, message: Message | bytes, now: float, *, digest: bytes | None = None
    ) -> list[Any]:
        data = message if isinstance(message, bytes) else message.encode()
        return self._call("receive", client_id, data, now)

    def tick(self, now: float) -> list[Any]:
        return self._call("tick", 0, b"", now)

    def abort(self, stage: str, reason: str) -> list[Any]:
        return self._call("abort", 0, b"", 0.0, f"{stage}\x00{reason}")

    def depart(self, client_id: int, now: float, reason: str) -> list[Any]:
        return self._call("depart", client_id, b"", now, reason)

    def rejoin(self, client_id: int) -> None:
        self._call("rejoin", client_id, b"", 0.0)


class RayHosts:
    """The actors of one sharded round: ``n`` hosts (``num_cpus=1``, no restarts), group
    ``g`` on host ``g mod n``; killed when the round ends."""

    def __init__(self, n: int, address: str | None = None) -> None:
        from secagg.service.ray_engine import import_ray

        ray = import_ray()
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
        self.ray = ray
        cls = ray.remote(num_cpus=1, max_restarts=0)(GroupServerHost)
        self.actors = [cls.remote() for _ in range(max(1, n))]

    def core(
        self, g: int, params: RoundParams, directory: Mapping[int, bytes],
        timeouts: StageTimeouts, now: float, he: bytes = b"",
    ) -> RayGroupCore:  # fmt: skip
        k = g % len(self.actors)
        return RayGroupCore(self.ray, self.actors[k], k, params, directory, timeouts, now, he)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
