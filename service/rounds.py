"""One running round: the sans-I/O core behind a lock, its timer, and per-client mailboxes.

Every call into the core (a message, a timer tick, an abort) runs on the worker pool while
holding this round's lock, so unmasking a large round blocks that round only: other rounds
and all network I/O go on in the event loop. Messages the core emits are encoded once and
appended to the recipients' mailboxes in the order the core produced them; the client's
stream (:mod:`secagg.service.session`) drains its mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

from secagg.errors import (
    DuplicateMessage,
    MalformedMessage,
    ProtocolViolation,
    RoundAborted,
    SecAggError,
    UnexpectedMessage,
)
from secagg.messages import Message, decode_message
from secagg.params import RoundParams
from secagg.rounds.base import ClientRecord, Outgoing, RoundResult, Stage
from secagg.server import SecAggServer, StageTimeouts
from secagg.service.errors import Dropped, PermissionDenied
from secagg.service.logs import event
from secagg.service.metrics import Metrics
from secagg.service.plaintext import PlaintextServer
from secagg.service.serde import max_client_message_bytes, server_frames
from secagg.service.store import ABORTED, COMPLETED, Member, Store

__all__ = ["Mailbox", "RoundCore", "RoundRunner"]

log = logging.getLogger("secagg.service.rounds")


class RoundCore(Protocol):
    """What the runner needs of a sans-I/O round server (``SecAggServer``, ``PlaintextServer``)."""

    @property
    def stage(self) -> Stage: ...
    @property
    def done(self) -> bool: ...
    @property
    def deadline(self) -> float | None: ...
    @property
    def result(self) -> RoundResult | None: ...
    @property
    def error(self) -> RoundAborted | None: ...
    @property
    def records(self) -> Mapping[int, ClientRecord]: ...
    @property
    def stage_times(self) -> dict[str, float]: ...
    def receive(
        self, client_id: int, message: Message | bytes, now: float, *, digest: bytes | None = None
    ) -> list[Outgoing]: ...
    def tick(self, now: float) -> list[Outgoing]: ...
    def abort(self, stage: str, reason: str) -> list[Outgoing]: ...
    def depart(self, client_id: int, now: float, reason: str) -> list[Outgoing]: ...
    def rejoin(self, client_id: int) -> None: ...


class Mailbox:
    """Server messages for one client, in order; closed once no more will come.

    Appended to from worker threads (under the round lock), read from the event loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.messages: list[bytes] = []
        self.closed = False
        self.failure: SecAggError | None = None
        """Why the client's streams end with an error (``None``: they end OK)."""
        self._loop = loop
        self._waiters: set[asyncio.Event] = set()

    def post(self, data: bytes) -> None:
        self.messages.append(data)
        self._wake()

    def close(self, failure: SecAggError | None = None) -> None:
        if not self.closed:
            self.failure = failure
            self.closed = True
            self._wake()

    def watch(self, ev: asyncio.Event) -> None:
        self._waiters.add(ev)

    def unwatch(self, ev: asyncio.Event) -> None:
        self._waiters.discard(ev)

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop has nobody listening
            self._loop.call_soon_threadsafe(self._notify)

    def _notify(self) -> None:
        for ev in self._waiters:
            ev.set()


class RoundRunner:
    """Drives one round: delegates to the core, runs its deadline timer, records the outcome."""

    def __init__(
        self,
        *,
        round_id: bytes,
        job: str,
        params: RoundParams,
        members: Sequence[Member],
        core: RoundCore,
        plaintext: bool,
        deadlines: StageTimeouts,
        store: Store,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        pool: Executor,
        disconnect_grace: float = 3.0,
    ) -> None:
        self.round_id = round_id
        self.job = job
        self.job_index: int | None = None
        """The round's index in its job (set by the coordinator; ``None``: not a job's)."""
        self.opened_at = time.time()
        """Unix seconds the round opened at (its first deadline counts from then)."""
        self.params = params
        self.members = tuple(members)
        self.by_name = {m.name: m for m in members}
        self.core = core
        self.plaintext = plaintext
        self.deadlines = deadlines
        self.max_message_bytes = max_client_message_bytes(params)
        self.mailboxes = {m.client_id: Mailbox(loop) for m in members}
        self.finished = asyncio.Event()
        self.ended_at: float | None = None
        self._store = store
        self._metrics = metrics
        self._loop = loop
        self._pool = pool
        self._lock = threading.Lock()
        self._dropped: set[int] = set()
        self._stage = core.stage
        self._observed: set[str] = set()
        self._started = time.monotonic()
        self._finalized = False
        self._poke = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._frames: dict[tuple[int, int, int], tuple[bytes, list[bytes]]] = {}
        self.disconnect_grace = disconnect_grace
        self._streams: dict[int, int] = {}
        self._grace: dict[int, asyncio.TimerHandle] = {}
        self._departed: set[int] = set()
        self._scan = False
        """Set before a core call that may drop a client without ending a stage."""
        self._lazy_scan = isinstance(core, SecAggServer | PlaintextServer)
        """Whether the core drops clients only where ``_after`` expects it (see there)."""

    @property
    def status(self) -> str:
        if not self.core.done:
            return "running"
        return COMPLETED if self.core.result is not None else ABORTED

    def start(self) -> None:
        self._metrics.rounds.labels("created").inc()
        self._metrics.rounds_active.inc()
        self._timer = self._loop.create_task(self._run_timer())

    def frames(self, data: bytes, seq: int, chunk_bytes: int) -> list[bytes]:
        """Serialized frames of one mailbox message; shared by every client that gets it.

        Called on the event loop only. The aggregate goes to every contributor at the same
        position of their mailboxes, so it is cut and serialized once, not once per client.
        """
        key = (id(data), seq, chunk_bytes)
        hit = self._frames.get(key)
        if hit is None or hit[0] is not data:
            hit = self._frames[key] = (data, server_frames(seq, data, chunk_bytes))
        return hit[1]

    def member(self, name: str) -> Member:
        m = self.by_name.get(name)
        if m is None:
            raise PermissionDenied(f"participant {name!r} is not invited to this round")
        return m

    # -- inputs (event loop side) ------------------------------------------------------------

    async def submit(self, client_id: int, data: memoryview) -> bool:
        """Hand one client message to the core; ``True`` if it repeats an accepted one.

        Raises the core's :class:`ProtocolViolation` (or :class:`PermissionDenied` for a
        message claiming another sender) when the message is refused.
        """
        try:
            return await self._loop.run_in_executor(self._pool, self._receive, client_id, data)
        finally:
            self._poke.set()

    async def attach(self, client_id: int) -> None:
        """A ``Session`` stream of ``client_id`` opened (after its Hello)."""
        self._streams[client_id] = self._streams.get(client_id, 0) + 1
        timer = self._grace.pop(client_id, None)
        if timer is not None:
            timer.cancel()  # back within the grace period: it continues
        if client_id in self._departed:
            self._departed.discard(client_id)
            await self._loop.run_in_executor(self._pool, self._rejoin, client_id)

    def detach(self, client_id: int) -> None:
        """A ``Session`` stream of ``client_id`` closed; with none left open, the client is
        given ``disconnect_grace`` seconds to reconnect before the round treats it as gone
        (dropped now if it owes the stage a message), instead of waiting out the deadline."""
        left = self._streams.get(client_id, 0) - 1
        self._streams[client_id] = max(left, 0)
        if left > 0 or self.core.done or self.mailboxes[client_id].closed:
            return
        old = self._grace.pop(client_id, None)
        if old is not None:
            old.cancel()
        self._grace[client_id] = self._loop.call_later(
            self.disconnect_grace, self._grace_over, client_id
        )

    def _grace_over(self, client_id: int) -> None:
        self._grace.pop(client_id, None)
        if self._streams.get(client_id, 0) > 0 or self.core.done:
            return
        self._departed.add(client_id)
        self._loop.create_task(self._depart_later(client_id))

    async def _depart_later(self, client_id: int) -> None:
        try:
            await self._loop.run_in_executor(self._pool, self._depart, client_id)
        finally:
            self._poke.set()

    async def abort(self, reason: str) -> None:
        """Abort from outside (operator, shutdown); a finished round is left as it is."""
        await self._loop.run_in_executor(self._pool, self._abort, reason)
        self._poke.set()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for timer in self._grace.values():
            timer.cancel()
        self._grace.clear()

    # -- worker side (holds the round lock) ------------------------------------------------------

    def _receive(self, cid: int, data: memoryview) -> bool:
        self._metrics.bytes.labels("in").inc(len(data))
        msg: Message | bytes
        digest: bytes | None = None
        try:
            msg = decode_message(data)
            digest = hashlib.sha256(data).digest()  # outside the lock, spares re-encoding
        except MalformedMessage:
            msg = bytes(data)  # the core refuses it (and drops the sender) the usual way
        with self._lock:
            now = time.monotonic()
            if self.core.done:
                late = UnexpectedMessage(f"the round is {self.core.stage}", client_id=cid)
                late.drops_sender = False
                raise late
            try:
                out = self.core.receive(cid, msg, now, digest=digest)
            except DuplicateMessage:
                self._after(self.core.tick(now), now)
                self._metrics.messages.labels("duplicate").inc()
                return True
            except ProtocolViolation as exc:
                self._scan = True  # the sender may be dropped
                self._after(self.core.tick(now), now)
                self._metrics.messages.labels("refused").inc()
                event(
                    log,
                    logging.WARNING,
                    "message refused",
                    round=self.round_id.hex(),
                    client=cid,
                    stage=exc.stage,
                    error=type(exc).__name__,
                    reason=str(exc),
                    dropped=exc.drops_sender,
                )
                if isinstance(msg, Message) and msg.sender != cid:
                    raise PermissionDenied(
                        f"client {cid} may only send its own messages (this one claims to be "
                        f"from client {msg.sender}); it was dropped"
                    ) from exc
                raise
            self._after(out, now)
        self._metrics.messages.labels("accepted").inc()
        return False

    def _tick(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._after(self.core.tick(now), now)

    def _depart(self, cid: int) -> None:
        with self._lock:
            if self._streams.get(cid, 0) > 0:
                return  # it reconnected meanwhile
            now = time.monotonic()
            reason = (
                f"its stream closed and it did not reconnect within {self.disconnect_grace:g} s"
            )
            self._scan = True
            self._after(self.core.depart(cid, now, reason), now)

    def _rejoin(self, cid: int) -> None:
        with self._lock:
            self.core.rejoin(cid)

    def _abort(self, reason: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._after(self.core.abort(self.core.stage.value, reason), now)

    def _after(self, out: list[Outgoing], now: float) -> None:
        """Record what changed (stage, dropouts, outcome), then deliver ``out``.

        Recording first means a crash never leaves a client holding a result, or a stage,
        that the store does not know about. The masked and plaintext cores drop clients
        only when a stage ends (or the round does), when they refuse a message, or when a
        client departs (``_scan``): for them an accepted message that ends nothing and
        sends nothing is recorded without scanning the ``n`` client records, so a stage
        costs ``O(n)``, not ``O(n^2)``. Other cores are scanned after every call.
        """
        finishing = self.core.done and not self._finalized
        scan, self._scan = self._scan or not self._lazy_scan or bool(out) or self.core.done, False
        if not self._finalized:
            self._record_progress(scan)
        if finishing:
            self._record_outcome()
        encoded: dict[int, bytes] = {}
        for cid, msg in out:
            data = encoded.get(id(msg))
            if data is None:
                data = encoded[id(msg)] = msg.encode()
            self.mailboxes[cid].post(data)
            self._metrics.bytes.labels("out").inc(len(data))
        if finishing:
            for mailbox in self.mailboxes.values():
                mailbox.close()
            self._loop.call_soon_threadsafe(self.finished.set)

    def _record_progress(self, scan: bool = True) -> None:
        stage = self.core.stage
        if stage == self._stage and not scan:
            return
        if stage != self._stage:
            for name, seconds in self.core.stage_times.items():
                if name not in self._observed:
                    self._observed.add(name)
                    self._metrics.stage_seconds.labels(name).observe(seconds)
            event(log, logging.INFO, "stage", round=self.round_id.hex(), stage=stage.value)
            self._stage = stage
            if not self.core.done:
                self._store.set_stage(self.round_id, stage.value)
        for cid, rec in self.core.records.items():
            if not rec.active and cid not in self._dropped:
                self._dropped.add(cid)
                where = rec.dropped_stage.value if rec.dropped_stage else "unknown"
                self._metrics.dropouts.labels(where).inc()
                self.mailboxes[cid].close(
                    Dropped(f"client {cid} was dropped in stage {where}: {rec.reason}")
                )
                event(
                    log,
                    logging.INFO,
                    "client dropped",
                    round=self.round_id.hex(),
                    client=cid,
                    stage=where,
                    reason=rec.reason,
                )

    def _record_outcome(self) -> None:
        self._finalized = True
        outcome = self.outcome()
        status = outcome["status"]
        try:
            self._store.finish_round(self.round_id, status, outcome)
        except SecAggError:
            log.exception("could not record the outcome of round %s", self.round_id.hex())
        self.ended_at = time.monotonic()
        self._metrics.rounds.labels(status).inc()
        self._metrics.rounds_active.dec()
        self._metrics.round_seconds.observe(self.ended_at - self._started)
        event(
            log,
            logging.INFO,
            f"round {status}",
            round=self.round_id.hex(),
            job=self.job,
            contributors=len(outcome.get("contributors", [])),
            reason=outcome.get("reason"),
        )

    def snapshot(self) -> tuple[str, dict[str, Any]]:
        """The current stage and outcome so far, read under the lock (status RPCs)."""
        with self._lock:
            return self.core.stage.value, self.outcome()

    def outcome(self) -> dict[str, Any]:
        """What the audit log records when the round ends (no secrets, no inputs)."""
        core = self.core
        names = {m.client_id: m.name for m in self.members}
        dropouts = [
            {
                "client_id": cid,
                "name": names.get(cid, ""),
                "stage": rec.dropped_stage.value if rec.dropped_stage else "",
                "reason": rec.reason or "",
            }
            for cid, rec in sorted(core.records.items())
            if not rec.active
        ]
        out: dict[str, Any] = {
            "status": self.status,
            "dropouts": dropouts,
            "stage_seconds": core.stage_times,
            "insecure_plaintext": self.plaintext,
        }
        result, error = core.result, core.error
        if result is not None:
            # The published aggregate: the lane sums, or (ckks, hybrid) the encrypted sum.
            h = hashlib.sha256()
            if result.sums is not None:
                h.update(result.sums.astype("<u8").tobytes())
            for ct in result.ciphertexts or ():
                h.update(len(ct).to_bytes(8, "big") + ct)
            out.update(
                contributors=list(result.contributors),
                total_weight=result.total_weight,
                aggregate_sha256=h.hexdigest(),
            )
        elif error is not None:
            out.update(stage=str(error.stage), reason=error.reason)
            blamed = getattr(error, "blamed", None)
            if blamed is not None:
                # An attributable abort: the client and the proof it signed (docs/protocol.md).
                out.update(
                    blamed={"client_id": blamed, "name": names.get(blamed, "")},
                    evidence=getattr(error, "evidence", None),
                )
        warnings = getattr(core, "warnings", None) or getattr(
            getattr(core, "ctx", None), "warnings", []
        )
        out["warnings"] = list(warnings)
        return out

    # -- timer ----------------------------------------------------------------------------------

    async def _run_timer(self) -> None:
        """Calls ``core.tick`` at ``core.deadline`` (monotonic clock) until the round ends."""
        try:
            while True:
                self._poke.clear()
                deadline = self.core.deadline
                if deadline is None:
                    return
                delay = deadline - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._poke.wait(), timeout=delay)
                    continue
                await self._loop.run_in_executor(self._pool, self._tick)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("round %s timer failed; aborting the round", self.round_id.hex())
            await self._loop.run_in_executor(self._pool, self._abort, "internal timer failure")
