"""Sharded rounds over gRPC: the server is the front door (docs/sharding.md, "Over gRPC").

A round created with ``groups=G > 1`` opens a *front-door* round: its ``Session`` streams
carry the commit-reveal group assignment of :mod:`secagg.groups` (``JoinCommit`` ->
``JoinRoster`` -> ``NonceOpen`` -> ``NonceOpens``, magic ``SAGJ``, apart from the round
messages). Once assigned, the server opens one ordinary group round per group, with round
id :func:`secagg.groups.group_round_id` and the group's members (same client ids), on the
in-process engine (a :class:`~secagg.server.SecAggServer` behind its own
:class:`~secagg.service.rounds.RoundRunner`). Clients fetch and check the group round
(``GetRound``, :func:`secagg.groups.check_group_invite`) and run it as any round. When all
groups ended, the front door sums the completed groups' lane sums (exact integers mod
``2^64``), applies the job's ``on_group_abort`` policy and sends every client
:class:`secagg.groups.GroupResults`; the audit log records the assignment (seed, transcript
hash, group round ids) and every group's size, survivors, status and abort reason, and
whether a partial sum was published.

``hybrid``/``ckks``: every group round is an ordinary round of that mode (its CKKS
parameters sized for the whole sharded round, ``RoundParams.he_clients``); the front door
adds the completed groups' encrypted sums with its keyless context
(:func:`secagg.sharded_he.add_group_sums`) and sends the encrypted total in
``GroupResults`` with its key epoch; the clients (key holders) decrypt it. The front door
sees no sum, and neither do the group members: a group round of a sharded HE round sends its
members the contributors only (an ``EncryptedResult`` with no ciphertext, no verdict stage;
``RoundParams.he_clients`` marks such a round), so each key holder decrypts the total alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from secagg import ckks
from secagg import groups as gr
from secagg.errors import ConfigurationError, DuplicateMessage, ProtocolViolation, RoundAborted
from secagg.messages import Message
from secagg.params import Mode, RoundParams
from secagg.policy import MIN_CONTRIBUTORS
from secagg.rounds.base import ClientRecord, RoundResult, Stage
from secagg.server import SecAggServer
from secagg.service.errors import AlreadyExists
from secagg.service.logs import event
from secagg.service.rounds import RoundCore, RoundRunner
from secagg.service.serde import deadlines_dict
from secagg.service.store import ABORTED, Member
from secagg.sharded_he import EncryptedGroupSum, GroupCiphertextRefused, add_group_sums
from secagg.simulate_sharded import UnsupportedShardedMode

if TYPE_CHECKING:
    from secagg.service.coordinator import Coordinator, RoundSpec
    from secagg.service.sharded_ray import RayHosts

__all__ = [
    "ON_GROUP_ABORT",
    "FrontDoorCore",
    "GroupEnd",
    "ShardStage",
    "ShardedRunner",
    "create_sharded",
]

log = logging.getLogger("secagg.service.sharded")

ON_GROUP_ABORT = ("publish", "abort")
"""The job's policies when a group aborts: publish the rest's sum, or abort the round."""


class ShardStage(StrEnum):
    """Stages of a front-door round (recorded like a round's stages)."""

    GROUP_ASSIGNMENT = "group_assignment"
    GROUP_ROUNDS = "group_rounds"
    COMPLETED = "completed"
    ABORTED = "aborted"


class _Raw:
    """Encoded assignment bytes posted to mailboxes (the runner calls ``encode``)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def encode(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class GroupEnd:
    """How one group round ended, as the front door sums it."""

    group: int
    size: int
    result: RoundResult | None
    reason: str = ""
    key_epoch: bytes = b""
    """``ckks``/``hybrid``: the key-epoch fingerprint the group's aggregator summed under."""


class FrontDoorCore:
    """Sans-I/O front door: the assignment (:class:`secagg.groups.GroupCoordinator`), then
    the sum of the group results (:meth:`finish`). Duck-types :class:`RoundCore`."""

    def __init__(
        self,
        params: RoundParams,
        directory: Mapping[int, bytes],
        groups: int,
        *,
        on_group_abort: str,
        min_group: int,
        timeout: float,
        now: float,
        he: ckks.ServerContext | None = None,
    ) -> None:
        self.params = params
        self.he = he
        """``ckks``/``hybrid``: the front door's keyless context (adds the group sums)."""
        self.directory = dict(directory)
        self.on_group_abort = on_group_abort
        self.coord = gr.GroupCoordinator(
            params.round_id, groups, self.directory, min_group=min_group, now=now,
            timeout=timeout,
        )  # fmt: skip
        self.records: dict[int, ClientRecord] = {c: ClientRecord() for c in directory}
        self.stage_times: dict[str, float] = {}
        self.result: RoundResult | None = None
        self.error: RoundAborted | None = None
        self.rows: list[gr.GroupRow] = []
        self.partial = False
        self._stage = ShardStage.GROUP_ASSIGNMENT
        self._t0 = now
        self._held: list[tuple[int, Any]] = []
        self._accepted: dict[int, set[bytes]] = {}

    # -- RoundCore ------------------------------------------------------------------------

    @property
    def stage(self) -> ShardStage:
        return self._stage

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    @property
    def deadline(self) -> float | None:
        if self._stage is ShardStage.GROUP_ASSIGNMENT:
            return self.coord.deadline
        return None

    @property
    def assignment(self) -> gr.Assignment | None:
        return self.coord.assignment

    def receive(
        self, client_id: int, message: Message | bytes, now: float, *, digest: bytes | None = None
    ) -> list[tuple[int, Any]]:
        data = message if isinstance(message, bytes) else message.encode()
        if data in self._accepted.get(client_id, ()):  # resent after a reconnect
            raise DuplicateMessage(f"client {client_id} repeated a message", client_id=client_id)
        if self._stage is not ShardStage.GROUP_ASSIGNMENT:
            raise ProtocolViolation(
                f"the front door expects no message in stage {self._stage}", client_id=client_id
            )
        try:
            out = self.coord.receive(client_id, data, now)
        except ProtocolViolation as exc:
            rec = self.records.get(client_id)
            if rec is not None and rec.active:  # ignored from here on; named in the log
                rec.active, rec.reason = False, str(exc)
                rec.dropped_stage = cast(Stage, ShardStage.GROUP_ASSIGNMENT)
            raise
        self._accepted.setdefault(client_id, set()).add(data)
        return self._after(out, now)

    def tick(self, now: float) -> list[tuple[int, Any]]:
        if self._stage is not ShardStage.GROUP_ASSIGNMENT:
            return []
        return self._after(self.coord.tick(now), now)

    def _after(self, out: list[tuple[int, bytes]], now: float) -> list[tuple[int, Any]]:
        msgs: dict[bytes, _Raw] = {}
        sent = [(c, msgs.setdefault(d, _Raw(d))) for c, d in out]
        if self.coord.error is not None:
            return sent + self.abort(self.coord.error.stage, self.coord.error.reason)
        if self.coord.assignment is not None and self._stage is ShardStage.GROUP_ASSIGNMENT:
            self.stage_times[str(ShardStage.GROUP_ASSIGNMENT)] = now - self._t0
            self._stage = ShardStage.GROUP_ROUNDS
            self._held = sent  # the openings go out once the group rounds are open
            return []
        return sent

    def release(self) -> list[tuple[int, Any]]:
        """The held ``NonceOpens`` broadcast: sent once every group round is open, so a
        client that computed its group finds its round (``GetRound``)."""
        out, self._held = self._held, []
        return [] if self.done else out

    def abort(self, stage: str, reason: str) -> list[tuple[int, Any]]:
        if self.done:
            return []
        self.error = RoundAborted(stage, reason)
        self._stage = ShardStage.ABORTED
        return self._broadcast(
            gr.GroupResults(
                self.params.round_id, False, stage, reason, (), 0, b"", tuple(self.rows)
            )
        )

    def depart(self, client_id: int, now: float, reason: str) -> list[tuple[int, Any]]:
        return []  # the assignment's deadline names who did not open

    def rejoin(self, client_id: int) -> None:
        return None

    # -- the sum ---------------------------------------------------------------------------

    def finish(self, ends: Sequence[GroupEnd], min_contributors: int) -> list[tuple[int, Any]]:
        """Sum the completed groups (exact: each group sum is below ``2^64 / G``) under the
        job's policy; never publish a sum of fewer than ``min_contributors`` inputs.

        ``ckks``/``hybrid``: the group results are ciphertexts; a group whose result the
        keyless check refuses (:class:`~secagg.sharded_he.GroupCiphertextRefused`) counts
        as aborted, with that reason."""
        if self.done:
            return []
        cts: tuple[bytes, ...] = ()
        if self.he is not None:
            ends, cts = self._add_encrypted(list(ends))
        self.rows = []
        done: list[RoundResult] = []
        for e in ends:
            r = e.result
            self.rows.append(
                gr.GroupRow(
                    e.group, e.size, len(r.contributors) if r else 0, r is not None, e.reason
                )
            )
            if r is not None:
                done.append(r)
        failed = [row.group for row in self.rows if not row.completed]
        contributors = tuple(sorted(c for r in done for c in r.contributors))
        if failed and self.on_group_abort == "abort":
            return self.abort(
                "sharded", f"groups {failed} aborted and the job's policy aborts the round"
            )
        if len(contributors) < min_contributors:
            return self.abort(
                "sharded",
                f"{len(contributors)} contributors in completed groups; the round needs at"
                f" least {min_contributors}",
            )
        if self.he is not None:  # the front door publishes the encrypted total, sees no sum
            self.partial = bool(failed)
            self.result = RoundResult(contributors, ciphertexts=cts)
            self._stage = ShardStage.COMPLETED
            return self._broadcast(
                gr.GroupResults(
                    self.params.round_id, True, "", "", contributors, 0, b"",
                    tuple(self.rows), cts, self.he.epoch.fingerprint,
                )
            )  # fmt: skip
        sums = np.zeros(self.params.quant.values(self.params.dim), dtype=np.uint64)
        weight = 0
        for r in done:
            assert r.sums is not None
            sums += r.sums.astype(np.uint64)  # wraps mod 2^64: the ring of the lanes
            weight += int(r.total_weight or 0)
        self.partial = bool(failed)
        self.result = RoundResult(contributors, sums, weight)
        self._stage = ShardStage.COMPLETED
        return self._broadcast(
            gr.GroupResults(
                self.params.round_id, True, "", "", contributors, weight,
                sums.astype("<u8").tobytes(), tuple(self.rows),
            )
        )  # fmt: skip

    def _add_encrypted(self, ends: list[GroupEnd]) -> tuple[list[GroupEnd], tuple[bytes, ...]]:
        """Check and add the completed groups' ciphertexts (keyless context)."""
        assert self.he is not None
        while True:
            done = [e for e in ends if e.result is not None]
            if not done:
                return ends, ()
            sums = []
            for e in done:
                assert e.result is not None
                r = e.result
                cts = tuple(r.ciphertexts or ())
                sums.append(EncryptedGroupSum(e.group, e.key_epoch, len(r.contributors), cts))
            try:
                total, _ = add_group_sums(self.he, self.params.mode, sums)
            except GroupCiphertextRefused as exc:
                ends = [
                    replace(e, result=None, reason=f"result refused: {exc}")
                    if e.group == exc.group
                    else e
                    for e in ends
                ]
                continue
            return ends, total

    def _broadcast(self, msg: gr.GroupResults) -> list[tuple[int, Any]]:
        raw = _Raw(msg.encode())
        return [(c, raw) for c in sorted(self.directory)]

    def audit(self) -> dict[str, Any]:
        """The sharding part of the round's audit entry."""
        c = self.coord
        doc: dict[str, Any] = {"groups": c.groups, "on_group_abort": self.on_group_abort}
        asg = c.assignment
        if asg is not None:
            doc.update(
                assignment_seed=asg.seed.hex(),
                roster_sha256=asg.roster_hash.hex(),
                transcript_sha256=transcript_hash(c.roster_bytes, c.opens_bytes),
            )
        doc["group_status"] = [
            {
                "group": r.group,
                "size": r.size,
                "survivors": r.survivors,
                "status": "completed" if r.completed else "aborted",
                **({"reason": r.reason} if r.reason else {}),
            }
            for r in self.rows
        ]
        doc["partial"] = self.partial
        return doc


def transcript_hash(roster: bytes, opens: bytes) -> str:
    """SHA-256 over the assignment transcript (roster and openings, length-prefixed)."""
    h = hashlib.sha256(gr.ASSIGNMENT_TAG + b"/transcript")
    for part in (roster, opens):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


class ShardedRunner(RoundRunner):
    """The front-door round: a :class:`RoundRunner` over :class:`FrontDoorCore`, plus its
    group rounds."""

    def __init__(self, *, min_contributors: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.assigned = asyncio.Event()
        self.group_runners: dict[int, RoundRunner] = {}
        self.min_contributors = min_contributors
        self._seen_assignment = False
        self.groups = 0
        self.driver: asyncio.Task[None] | None = None
        self.hosts: RayHosts | None = None

    @property
    def front(self) -> FrontDoorCore:
        return cast(FrontDoorCore, self.core)

    def _after(self, out: list[Any], now: float) -> None:
        super()._after(out, now)
        if not self._seen_assignment and self.front.assignment is not None:
            self._seen_assignment = True
            self._loop.call_soon_threadsafe(self.assigned.set)
        if self.core.done:
            self._loop.call_soon_threadsafe(self.assigned.set)

    def outcome(self) -> dict[str, Any]:
        out = super().outcome()
        out["sharded"] = self.front.audit()
        return out

    def _release(self) -> None:
        with self._lock:
            self._after(self.front.release(), time.monotonic())

    def _finish(self, ends: Sequence[GroupEnd]) -> None:
        with self._lock:
            now = time.monotonic()
            self._after(self.front.finish(ends, self.min_contributors), now)

    async def abort(self, reason: str) -> None:
        await super().abort(reason)
        for r in list(self.group_runners.values()):
            if not r.core.done:
                await r.abort(f"the sharded round was aborted: {reason}")


def check_spec(spec: RoundSpec) -> None:
    """Refuse what sharded rounds do not run (yet)."""
    mode = spec.mode.lower()
    if mode not in ("masked", "hybrid", "ckks"):
        raise UnsupportedShardedMode(f"sharded rounds run masked, hybrid or ckks, not {mode}")
    if mode != "masked" and not spec.he_context:
        raise ConfigurationError(f"a {mode} round needs the server's CKKS context")
    if mode == "ckks" and spec.publish_after is not None:
        raise UnsupportedShardedMode("publish_after runs with single ckks rounds only")
    if spec.dp is not None:
        raise ConfigurationError("distributed DP runs in single rounds only, not sharded ones")
    if spec.on_group_abort not in ON_GROUP_ABORT:
        raise ConfigurationError(
            f"on_group_abort must be publish or abort, not {spec.on_group_abort!r}"
        )
    if spec.groups > gr.MAX_GROUPS:
        raise ConfigurationError(f"groups={spec.groups} exceeds {gr.MAX_GROUPS}")


def group_params(
    coord: Coordinator, spec: RoundSpec, size: int, round_id: bytes, he_clients: int = 0
) -> RoundParams:
    """Parameters of a group round of ``size`` members (the spec's shape, its own n); in
    ``ckks``/``hybrid`` the CKKS parameters sized for ``he_clients`` summands."""
    if not he_clients:
        return replace(coord._params(spec, size), round_id=round_id)
    base = coord._params(replace(spec, mode="masked"), size)  # the group's graph and t
    return replace(base, round_id=round_id, mode=Mode.parse(spec.mode), he_clients=he_clients)


async def create_sharded(
    coord: Coordinator,
    spec: RoundSpec,
    *,
    operator: str | None = None,
    job_index: int | None = None,
) -> ShardedRunner:
    """Record and open the front-door round of ``spec`` and start its driver task."""
    check_spec(spec)
    loop = asyncio.get_running_loop()
    pool = coord._pool
    async with coord._create_lock:
        coord._evict()
        members = await loop.run_in_executor(pool, coord._members, spec.participants)
        job = await loop.run_in_executor(pool, coord.store.job, spec.job)
        if job_index is None and job is not None:
            raise AlreadyExists(
                f"{spec.job!r} is a job (secagg job create): the server opens its rounds; "
                "give this round another --job"
            )
        if await loop.run_in_executor(pool, coord.store.running_job, spec.job):
            raise AlreadyExists(f"job {spec.job!r} already has a running round")
        n, g = len(members), spec.groups
        min_group = max(MIN_CONTRIBUTORS, 3)
        if n < g * min_group:
            raise ConfigurationError(
                f"{n} participants cannot form {g} groups of at least {min_group}"
            )
        mode = Mode.parse(spec.mode)
        # ckks/hybrid: CKKS sized for the whole roster (the front door and every group)
        he_clients = gr.sharded_he_clients(mode, n, g)
        params = await loop.run_in_executor(
            pool, group_params, coord, spec, n, secrets.token_bytes(16), he_clients
        )
        for size in {n // g, -(-n // g)}:  # every group size must have parameters
            await loop.run_in_executor(
                pool, group_params, coord, spec, size, params.round_id, he_clients
            )
        he_ctx = None
        if he_clients:
            he_ctx = await loop.run_in_executor(pool, coord._he_context, spec, params)
        spec = replace(spec, deadlines=spec.deadlines.for_round(n, params.dim))
        directory = {m.client_id: m.public_key for m in members}
        body = coord._audit_body(spec, params, members, False)
        body["sharded"] = {
            "groups": g, "on_group_abort": spec.on_group_abort, "engine": coord.group_engine,
        }  # fmt: skip
        if operator is not None:
            body["operator"] = operator
        if job_index is not None:
            body["job_index"] = job_index
        await loop.run_in_executor(
            pool,
            lambda: coord.store.create_round(
                params.round_id, spec.job, params.encode(), False,
                deadlines_dict(spec.deadlines), members, body, job_index,
            ),
        )  # fmt: skip
        core = FrontDoorCore(
            params, directory, g, on_group_abort=spec.on_group_abort, min_group=min_group,
            timeout=spec.deadlines.advertise_keys, now=time.monotonic(), he=he_ctx,
        )  # fmt: skip
        runner = ShardedRunner(
            min_contributors=MIN_CONTRIBUTORS,
            round_id=params.round_id,
            job=spec.job,
            params=params,
            members=members,
            core=cast(RoundCore, core),
            plaintext=False,
            deadlines=spec.deadlines,
            store=coord.store,
            metrics=coord.metrics,
            loop=loop,
            pool=pool,
            disconnect_grace=coord._grace,
        )
        runner.groups = g
        runner.job_index = job_index
        coord._rounds[params.round_id] = runner
        runner.start()
        runner.driver = loop.create_task(_drive(coord, runner, spec))
    event(
        log, logging.INFO, "sharded round created", round=params.round_id.hex(), job=spec.job,
        clients=n, groups=g,
    )  # fmt: skip
    return runner


async def _drive(coord: Coordinator, runner: ShardedRunner, spec: RoundSpec) -> None:
    """Assignment -> group rounds -> sum; every failure ends in a recorded abort."""
    try:
        await runner.assigned.wait()
        asg = runner.front.assignment
        if runner.core.done or asg is None:
            return
        await _run_groups(coord, runner, spec, asg)
    except Exception as exc:
        log.exception("sharded round %s failed", runner.round_id.hex())
        await runner.abort(f"internal failure of the sharded round: {type(exc).__name__}: {exc}")


async def _run_groups(
    coord: Coordinator, runner: ShardedRunner, spec: RoundSpec, asg: gr.Assignment
) -> None:
    loop = asyncio.get_running_loop()
    pool = coord._pool
    rid = runner.round_id.hex()
    front = runner.front
    by_id = {m.client_id: m for m in runner.members}
    plan: list[tuple[int, RoundParams, list[Member]]] = []
    he_clients = runner.params.he_clients  # sized for the whole roster at creation
    for g, ids in enumerate(asg.groups):
        gp = await loop.run_in_executor(
            pool, group_params, coord, spec, len(ids), gr.group_round_id(asg.seed, g), he_clients
        )
        plan.append((g, gp, [by_id[c] for c in ids]))
    await loop.run_in_executor(
        pool,
        coord.store.append_audit,
        "group_assignment",
        rid,
        {
            "groups": len(asg.groups),
            "assignment_seed": asg.seed.hex(),
            "roster_sha256": asg.roster_hash.hex(),
            "transcript_sha256": transcript_hash(front.coord.roster_bytes, front.coord.opens_bytes),
            "group_rounds": [
                {"group": g, "round_id": gp.round_id.hex(), "size": len(ms),
                 "members": [m.name for m in ms]}
                for g, gp, ms in plan
            ],
        },
    )  # fmt: skip
    if coord.group_engine == "ray":
        from secagg.service.sharded_ray import RayHosts

        runner.hosts = await loop.run_in_executor(
            pool, RayHosts, min(coord.ray_workers, len(plan)), coord.ray_address
        )
    try:
        for g, gp, ms in plan:
            runner.group_runners[g] = await _open_group(coord, runner, spec, g, gp, ms)
        await _await_groups(coord, runner, plan)
    finally:
        if runner.hosts is not None:
            await loop.run_in_executor(pool, runner.hosts.close)


async def _await_groups(
    coord: Coordinator, runner: ShardedRunner, plan: list[tuple[int, RoundParams, list[Member]]]
) -> None:
    loop = asyncio.get_running_loop()
    pool = coord._pool
    await loop.run_in_executor(pool, runner._release)
    ends: list[GroupEnd] = []
    for g, _gp, ms in plan:
        gr_runner = runner.group_runners[g]
        await gr_runner.finished.wait()
        res, err = gr_runner.core.result, gr_runner.core.error
        reason = "" if res is not None else (
            f"stage {err.stage}: {err.reason}" if err is not None else "no result"
        )  # fmt: skip
        ends.append(GroupEnd(g, len(ms), res, reason, _key_epoch(gr_runner.core)))
    await loop.run_in_executor(pool, runner._finish, ends)


def _key_epoch(core: Any) -> bytes:
    """The key-epoch fingerprint a group's aggregator summed under (``b""`` in masked): a
    Ray actor's report, or the in-process server's context."""
    if hasattr(core, "key_epoch"):
        return bytes(core.key_epoch)
    he = getattr(getattr(core, "ctx", None), "he", None)
    return he.epoch.fingerprint if isinstance(he, ckks.ServerContext) else b""


async def _open_group(
    coord: Coordinator,
    runner: ShardedRunner,
    spec: RoundSpec,
    g: int,
    params: RoundParams,
    members: Sequence[Member],
) -> RoundRunner:
    """Record and open group ``g``'s round on the in-process engine."""
    loop = asyncio.get_running_loop()
    pool = coord._pool
    deadlines = spec.deadlines
    body = coord._audit_body(spec, params, members, False)
    body["sharded_round"] = {"round_id": runner.round_id.hex(), "group": g}
    await loop.run_in_executor(
        pool,
        lambda: coord.store.create_round(
            params.round_id, spec.job, params.encode(), False, deadlines_dict(deadlines),
            list(members), body,
        ),
    )  # fmt: skip
    directory = {m.client_id: m.public_key for m in members}
    core: RoundCore
    try:
        if runner.hosts is not None:  # the group's SecAggServer lives on a Ray actor
            hosts = runner.hosts
            he = spec.he_context or b""
            core = cast(RoundCore, await loop.run_in_executor(
                pool, lambda: hosts.core(g, params, directory, deadlines, time.monotonic(), he)
            ))  # fmt: skip
        elif params.mode is Mode.MASKED:
            core = SecAggServer(params, directory, timeouts=deadlines, now=time.monotonic())
        else:  # the group's aggregator: the keyless context, sized for the whole round
            he_ctx = await loop.run_in_executor(pool, coord._he_context, spec, params)
            core = coord._core(spec.mode.lower(), spec, params, directory, he_ctx, time.monotonic())
    except Exception as exc:
        reason = f"the group round could not open: {type(exc).__name__}: {exc}"
        outcome = {"status": ABORTED, "stage": "open", "reason": reason}
        await loop.run_in_executor(
            pool, coord.store.finish_round, params.round_id, ABORTED, outcome
        )
        raise
    gr_runner = RoundRunner(
        round_id=params.round_id,
        job=spec.job,
        params=params,
        members=members,
        core=core,
        plaintext=False,
        deadlines=deadlines,
        store=coord.store,
        metrics=coord.metrics,
        loop=loop,
        pool=pool,
        disconnect_grace=coord._grace,
    )
    coord._rounds[params.round_id] = gr_runner
    gr_runner.start()
    return gr_runner
