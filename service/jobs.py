"""Jobs: a fixed federation whose rounds the server opens one after another.

A job (``CreateJob``, ``secagg job create``) fixes the participants, mode, layout and round
shape (:class:`~secagg.service.coordinator.JobSpec`) and runs ``rounds`` rounds (or until
aborted) without an operator creating each one: the next round opens as soon as the
previous one ended, or ``every`` seconds after the previous one opened. Only one round of
a job runs at a time, and each round's deadlines count from its opening.

The ``jobs`` table (:class:`~secagg.service.store.Store`) is the truth: a restarted server
resumes every running job at its next round (the interrupted round is aborted by
:meth:`~secagg.service.coordinator.Coordinator.recover`, as any round is). Sites learn of
each round through ``WatchRounds`` (:meth:`JobScheduler.watch`,
:meth:`secagg.service.client.Client.rounds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING

from secagg.errors import ConfigurationError, SecAggError
from secagg.service._gen import aggregation_pb2
from secagg.service.errors import NotFound, PermissionDenied
from secagg.service.logs import event
from secagg.service.store import ABORTED, FINISHED, PAUSED, RUNNING, JobRecord

if TYPE_CHECKING:
    from secagg.service.coordinator import Coordinator, JobSpec
    from secagg.service.rounds import RoundRunner

__all__ = ["SERVER_OPERATOR", "JobScheduler"]

log = logging.getLogger("secagg.service.jobs")

SERVER_OPERATOR = "server"
"""Operator named in the log for what the server decides itself (a job it had to abort)."""
WATCH_RECHECK = 30.0
"""Seconds a ``WatchRounds`` stream sleeps at most before it looks at the store again."""


class _Signal:
    """Wakes every waiter once (the event loop only): ``fire`` sets and replaces the event."""

    def __init__(self) -> None:
        self._ev = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._ev

    def fire(self) -> None:
        self._ev.set()
        self._ev = asyncio.Event()


async def _wait(ev: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ev.wait(), timeout=max(timeout, 0.0))


class JobScheduler:
    """Creates jobs, opens their rounds, and tells watching participants (one per server)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coord = coordinator
        self._store = coordinator.store
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._signals: dict[str, _Signal] = {}
        self._current: dict[str, RoundRunner] = {}
        self._stopped = False

    def _signal(self, name: str) -> _Signal:
        sig = self._signals.get(name)
        if sig is None:
            sig = self._signals[name] = _Signal()
        return sig

    # -- operator side ----------------------------------------------------------------------

    async def create(self, spec: JobSpec, *, operator: str) -> JobRecord:
        """Validate ``spec`` (participants enrolled, parameters feasible), record the job
        (``job_created`` names ``operator``) and start opening its rounds."""
        from secagg.service.coordinator import Coordinator

        rspec = spec.round_spec()
        mode = rspec.mode.lower()
        if mode in ("ckks", "hybrid") and not rspec.he_context:
            raise ConfigurationError(f"a {mode} job needs the server's CKKS context")
        if len(set(rspec.participants)) != len(rspec.participants):
            raise ConfigurationError("a participant is named twice")
        members = await asyncio.to_thread(self._coord._members, rspec.participants)
        params = await asyncio.to_thread(Coordinator._params, rspec, len(members))
        if mode in ("ckks", "hybrid"):
            await asyncio.to_thread(Coordinator._he_context, rspec, params)
        doc = spec.to_json()
        audit = {
            "participants": list(spec.participants),
            "mode": mode,
            "dim": spec.dim,
            "every": spec.every,
            "layout": spec.layout.hex(),
            "he_context_sha256": hashlib.sha256(spec.he_context).hexdigest()
            if spec.he_context
            else None,
            "dp": doc["dp"],
        }
        record = await asyncio.to_thread(
            lambda: self._store.create_job(
                spec.name, doc, spec.rounds, operator=operator, audit=audit
            )
        )
        event(
            log,
            logging.INFO,
            "job created",
            job=spec.name,
            rounds=spec.rounds,
            every=spec.every,
            clients=len(members),
            mode=mode,
            operator=operator,
        )
        self._start(spec.name)
        return record

    async def abort(self, name: str, reason: str, *, operator: str) -> JobRecord:
        """Abort job ``name`` (logged as ``job_aborted`` naming ``operator``) and its
        running round; its watchers' streams end with an ``aborted`` event."""
        record = await asyncio.to_thread(
            lambda: self._store.end_job(name, ABORTED, reason, operator=operator)
        )
        runner = self._current.get(name)
        if runner is not None and not runner.core.done:
            await runner.abort(f"job {name!r} aborted: {reason or 'by the operator'}")
        self._signal(name).fire()
        event(log, logging.INFO, "job aborted", job=name, reason=reason, operator=operator)
        return record

    async def pause(self, name: str, *, operator: str) -> JobRecord:
        """Open no further round of ``name`` until :meth:`resume` (``job_paused``); its
        running round goes on to its end."""
        record = await asyncio.to_thread(
            functools.partial(self._store.set_job_status, name, PAUSED, operator=operator)
        )
        self._signal(name).fire()
        event(log, logging.INFO, "job paused", job=name, operator=operator)
        return record

    async def resume(self, name: str, *, operator: str) -> JobRecord:
        """Let a paused job open its next round (``job_resumed``)."""
        record = await asyncio.to_thread(
            functools.partial(self._store.set_job_status, name, RUNNING, operator=operator)
        )
        self._start(name)
        self._signal(name).fire()
        event(log, logging.INFO, "job resumed", job=name, operator=operator)
        return record

    def current(self, name: str) -> RoundRunner | None:
        """The job's running round, if one is open."""
        runner = self._current.get(name)
        return runner if runner is not None and not runner.core.done else None

    # -- lifecycle --------------------------------------------------------------------------

    def start_all(self) -> list[str]:
        """Start opening rounds for every job the store has running (server start)."""
        names = [j.name for j in self._store.jobs() if j.status in (RUNNING, PAUSED)]
        for name in names:
            event(log, logging.INFO, "job resumed by restart", job=name)
            self._start(name)
        return names

    async def stop(self) -> None:
        """Open no further round (shutdown); running jobs stay running in the store."""
        self._stopped = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    def _start(self, name: str) -> None:
        if self._stopped or name in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._drive(name))
        self._tasks[name] = task
        task.add_done_callback(lambda _t: self._tasks.pop(name, None))

    async def _drive(self, name: str) -> None:
        """Open the job's rounds one after another until it ends."""
        try:
            while True:
                sig = self._signal(name).current()
                rec = await asyncio.to_thread(self._store.job, name)
                if rec is None or rec.status not in (RUNNING, PAUSED):
                    return
                if rec.rounds_total is not None and rec.rounds_done >= rec.rounds_total:
                    await asyncio.to_thread(self._store.end_job, name, FINISHED, "")
                    return
                if rec.status == PAUSED:
                    await _wait(sig, WATCH_RECHECK)
                    continue
                spec = _spec(rec)
                if spec.every is not None and rec.last_opened_at is not None:
                    delay = rec.last_opened_at + spec.every - time.time()
                    if delay > 0:
                        await _wait(sig, delay)  # an abort wakes it early
                        continue
                try:
                    runner = await self._coord.create(
                        spec.round_spec(), operator=rec.created_by, job_index=rec.next_index
                    )
                except SecAggError as exc:
                    reason = f"round {rec.next_index} could not open: {type(exc).__name__}: {exc}"
                    await asyncio.to_thread(
                        functools.partial(
                            self._store.end_job, name, ABORTED, reason, operator=SERVER_OPERATOR
                        )
                    )
                    event(log, logging.WARNING, "job aborted", job=name, reason=reason)
                    return
                self._current[name] = runner
                self._signal(name).fire()
                await runner.finished.wait()
                self._current.pop(name, None)
                self._signal(name).fire()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: its scheduler failed; the job stays as the store has it", name)
        finally:
            self._signal(name).fire()

    # -- participant side -------------------------------------------------------------------

    async def watch(self, name: str, participant: str) -> AsyncIterator[aggregation_pb2.JobEvent]:
        """The events of job ``name`` for ``participant``: the open round first, each
        round as it opens, then one ``finished`` or ``aborted`` event.

        Raises
        ------
        NotFound
            No such job.
        PermissionDenied
            ``participant`` is not one of the job's participants.
        """
        rec = await asyncio.to_thread(self._store.job, name)
        if rec is None:
            raise NotFound(f"no job {name!r}")
        if participant not in rec.spec.get("participants", ()):
            raise PermissionDenied(f"participant {participant!r} is not in job {name!r}")
        sent: bytes | None = None
        while True:
            sig = self._signal(name).current()  # before looking: no wake-up is missed
            runner = self.current(name)
            if runner is not None and runner.round_id != sent and participant in runner.by_name:
                sent = runner.round_id
                yield aggregation_pb2.JobEvent(
                    job=name,
                    kind="round",
                    round_id=runner.round_id,
                    index=runner.job_index or 0,
                )
                continue
            rec = await asyncio.to_thread(self._store.job, name)
            if rec is None:  # pragma: no cover - jobs are never deleted
                return
            if rec.status in (FINISHED, ABORTED):
                yield aggregation_pb2.JobEvent(job=name, kind=rec.status, reason=rec.reason)
                return
            await _wait(sig, WATCH_RECHECK)


def _spec(rec: JobRecord) -> JobSpec:
    from secagg.service.coordinator import JobSpec

    spec = JobSpec.from_json(rec.spec)
    return replace(spec, name=rec.name, job=rec.name)
