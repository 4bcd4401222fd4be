"""The embedded store (SQLite): participants, operators, jobs, rounds and the audit log.

One connection guarded by a lock; every write that appends to the audit log runs in one
``BEGIN IMMEDIATE`` transaction, so two processes sharing the file (``secagg enroll``
beside a running server) cannot fork the chain. A store has one server: :class:`WriterLock`
(``STORE.lock``, an OS file lock that dies with its process) refuses a second one. Triggers
refuse ``UPDATE`` and ``DELETE`` on the log; the hash chain (:mod:`secagg.service.audit`)
catches whoever drops them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secagg.directory import SignedEntry
from secagg.errors import ConfigurationError, InvalidSignature, StoreError
from secagg.keys import PUBLIC_KEY_BYTES, check_identity_key
from secagg.service.audit import GENESIS, AuditEntry, canonical_json, entry_hash, verify_chain
from secagg.service.errors import AlreadyExists, NotFound, StoreLocked

__all__ = [
    "LOCAL_OPERATOR",
    "JobRecord",
    "Member",
    "OperatorRecord",
    "ParticipantRecord",
    "RoundRecord",
    "Store",
    "WriterLock",
]

LOCAL_OPERATOR = "local"
"""Operator named in the log for edits made on the store file directly (its owner)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS participants (
    name TEXT PRIMARY KEY,
    public_key BLOB NOT NULL UNIQUE,
    enrolled_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY,
    public_key BLOB NOT NULL UNIQUE,
    added_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS directory_entries (
    name TEXT PRIMARY KEY,
    entry BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id BLOB PRIMARY KEY,
    job TEXT NOT NULL,
    status TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT 'advertise_keys',
    params BLOB NOT NULL,
    plaintext INTEGER NOT NULL,
    deadlines TEXT NOT NULL,
    created_at REAL NOT NULL,
    ended_at REAL,
    outcome TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    status TEXT NOT NULL,
    rounds_total INTEGER,
    rounds_done INTEGER NOT NULL DEFAULT 0,
    next_index INTEGER NOT NULL DEFAULT 0,
    ended_at REAL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS round_members (
    round_id BLOB NOT NULL,
    client_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    public_key BLOB NOT NULL,
    PRIMARY KEY (round_id, client_id)
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    round_id TEXT NOT NULL,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

RUNNING, COMPLETED, ABORTED = "running", "completed", "aborted"
FINISHED, PAUSED = "finished", "paused"
"""Job statuses are ``RUNNING``, ``FINISHED``, ``ABORTED`` and ``PAUSED``."""
JOB_STATUSES = (RUNNING, FINISHED, ABORTED, PAUSED)


class WriterLock:
    """The one-server-per-store lock: ``flock`` on ``STORE.lock``, holder written inside.

    The OS drops the lock when its process exits, however it exits, so a lock file left
    behind by a killed server is stale and harmless: the next server takes it. (``flock``
    is not reliable on network file systems; keep the store on a local disk.)
    """

    def __init__(self, store_path: str | Path) -> None:
        self.path = Path(f"{store_path}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StoreLocked` naming the holder."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise StoreLocked(
                f"the store {str(self.path)[:-5]} is in use by another server "
                f"({_describe_holder(holder)}); stop it first, or give this one another --store"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays; its content no longer means anything)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _describe_holder(text: str) -> str:
    try:
        doc = json.loads(text)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(doc["since"])))
        return f"pid {int(doc['pid'])} on host {doc['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


@dataclass(frozen=True)
class ParticipantRecord:
    """An enrolled identity."""

    name: str
    public_key: bytes
    enrolled_at: float
    revoked_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class OperatorRecord:
    """An operator allowed to call the admin API with its Ed25519 key."""

    name: str
    public_key: bytes
    added_at: float
    revoked_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class Member:
    """A participant's seat in one round (``signed_entry``: its authority-signed entry)."""

    client_id: int
    name: str
    public_key: bytes
    signed_entry: bytes = b""


@dataclass(frozen=True)
class RoundRecord:
    """A round as stored: what was configured and, once over, how it ended."""

    round_id: bytes
    job: str
    status: str
    params: bytes
    plaintext: bool
    deadlines: dict[str, float]
    created_at: float
    ended_at: float | None
    outcome: dict[str, Any]
    members: tuple[Member, ...]
    job_index: int | None = None
    """The round's index in its job (from 0); ``None`` for a round made by ``CreateRound``."""


@dataclass(frozen=True)
class JobRecord:
    """A job as stored: its spec (JSON object), who made it, and how far it got."""

    name: str
    spec: dict[str, Any]
    created_at: float
    created_by: str
    status: str
    rounds_total: int | None
    rounds_done: int
    next_index: int
    ended_at: float | None
    reason: str
    rounds_completed: int = 0
    rounds_aborted: int = 0
    last_opened_at: float | None = None
    """When the job's newest round opened (Unix seconds), ``None`` before the first."""


class Store:
    """SQLite-backed store; ``path`` may be ``":memory:"`` (tests)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(rounds)")}
            if "job_index" not in columns:  # a store written before jobs existed
                self._db.execute("ALTER TABLE rounds ADD COLUMN job_index INTEGER")
            self._db.execute("CREATE INDEX IF NOT EXISTS rounds_by_job ON rounds (job, job_index)")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"store write failed: {exc}") from exc

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"store read failed: {exc}") from exc

    # -- audit ------------------------------------------------------------------------------

    def _append(
        self, db: sqlite3.Connection, kind: str, round_id: str, body: Mapping[str, Any]
    ) -> AuditEntry:
        row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
        ts = time.time()
        text = canonical_json(body)
        digest = entry_hash(prev, seq, ts, kind, round_id, text)
        db.execute(
            "INSERT INTO audit (seq, ts, kind, round_id, body, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, ts, kind, round_id, text, prev, digest),
        )
        return AuditEntry(seq, ts, kind, round_id, text, prev, digest)

    def append_audit(self, kind: str, round_id: str, body: Mapping[str, Any]) -> AuditEntry:
        """Append one entry to the log."""
        with self._tx() as db:
            return self._append(db, kind, round_id, body)

    def audit_entries(self, round_id: str | None = None) -> list[AuditEntry]:
        sql = "SELECT seq, ts, kind, round_id, body, prev_hash, hash FROM audit"
        args: tuple[Any, ...] = ()
        if round_id is not None:
            sql += " WHERE round_id = ?"
            args = (round_id,)
        return [AuditEntry(*row) for row in self._query(sql + " ORDER BY seq", args)]

    def verify_audit(self, expect_head: str | None = None) -> str:
        """Verify the whole chain; return the head hash (raises ``StoreError``)."""
        return verify_chain(self.audit_entries(), expect_head)

    # -- participants -------------------------------------------------------------------------

    def enroll(
        self,
        name: str,
        public_key: bytes,
        signed_entry: bytes = b"",
        *,
        operator: str = LOCAL_OPERATOR,
    ) -> ParticipantRecord:
        """Enrol ``name`` with its Ed25519 public key and, optionally, the federation
        authority's signed directory entry for it (stored and served, never verified
        here: the server does not hold the authority's key, the clients do the checking).
        ``operator`` is named in the audit entry."""
        _check_name(name, "participant")
        _check_key(public_key)
        if signed_entry:
            _check_entry(signed_entry, name, public_key)
        now = time.time()
        with self._tx() as db:
            clash = db.execute(
                "SELECT name FROM participants WHERE name = ? OR public_key = ?",
                (name, public_key),
            ).fetchone()
            if clash:
                raise AlreadyExists(f"participant {clash[0]!r} already holds this name or key")
            db.execute(
                "INSERT INTO participants (name, public_key, enrolled_at) VALUES (?, ?, ?)",
                (name, public_key, now),
            )
            if signed_entry:
                db.execute(
                    "INSERT OR REPLACE INTO directory_entries (name, entry) VALUES (?, ?)",
                    (name, bytes(signed_entry)),
                )
            body = {"name": name, "identity_key": public_key.hex(), "operator": operator}
            self._append(db, "participant_enrolled", "", body)
        return ParticipantRecord(name, public_key, now, None)

    def set_signed_entry(
        self, name: str, signed_entry: bytes, *, operator: str = LOCAL_OPERATOR
    ) -> ParticipantRecord:
        """Replace ``name``'s signed directory entry (recorded in the log by its SHA-256)."""
        entry = SignedEntry.decode(signed_entry)
        with self._tx() as db:
            row = db.execute(
                "SELECT public_key, enrolled_at, revoked_at FROM participants WHERE name = ?",
                (name,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no participant named {name!r}")
            if entry.name != name or entry.identity_key != bytes(row[0]):
                raise ConfigurationError(
                    f"the signed entry vouches for {entry.name!r}, not for {name!r} with its key"
                )
            db.execute(
                "INSERT OR REPLACE INTO directory_entries (name, entry) VALUES (?, ?)",
                (name, bytes(signed_entry)),
            )
            body = {
                "name": name,
                "epoch": entry.epoch,
                "not_after": entry.not_after,
                "operator": operator,
            }
            digest = hashlib.sha256(bytes(signed_entry)).hexdigest()
            self._append(db, "participant_entry_set", "", {**body, "entry_sha256": digest})
        return ParticipantRecord(name, row[0], row[1], row[2])

    def signed_entry(self, name: str) -> bytes:
        """The authority-signed directory entry enrolled for ``name`` (empty if none)."""
        rows = self._query("SELECT entry FROM directory_entries WHERE name = ?", (name,))
        return bytes(rows[0][0]) if rows else b""

    def revoke(self, name: str, *, operator: str = LOCAL_OPERATOR) -> ParticipantRecord:
        """Revoke ``name``: its identity is refused from now on (recorded in the log)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT public_key, enrolled_at, revoked_at FROM participants WHERE name = ?",
                (name,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no participant named {name!r}")
            if row[2] is not None:
                return ParticipantRecord(name, row[0], row[1], row[2])
            db.execute("UPDATE participants SET revoked_at = ? WHERE name = ?", (now, name))
            self._append(db, "participant_revoked", "", {"name": name, "operator": operator})
        return ParticipantRecord(name, row[0], row[1], now)

    def rotate(
        self,
        name: str,
        public_key: bytes,
        signed_entry: bytes = b"",
        *,
        operator: str = LOCAL_OPERATOR,
    ) -> ParticipantRecord:
        """Give site ``name`` a new identity key, keeping its name (and so its place in
        rosters); a revoked site is reinstated with the new key. A site that had a signed
        directory entry needs one for the new key (clients would refuse the old one).
        Recorded as ``participant_rotated`` with both keys."""
        _check_key(public_key)
        if signed_entry:
            _check_entry(signed_entry, name, public_key)
        with self._tx() as db:
            row = db.execute(
                "SELECT public_key, enrolled_at FROM participants WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no participant named {name!r}")
            if bytes(row[0]) == bytes(public_key):
                raise AlreadyExists(f"participant {name!r} already holds this key")
            clash = db.execute(
                "SELECT name FROM participants WHERE public_key = ?", (public_key,)
            ).fetchone()
            if clash:
                raise AlreadyExists(f"participant {clash[0]!r} already holds this key")
            had_entry = db.execute(
                "SELECT 1 FROM directory_entries WHERE name = ?", (name,)
            ).fetchone()
            if had_entry and not signed_entry:
                raise ConfigurationError(
                    f"participant {name!r} has a signed directory entry: rotating needs a new "
                    "one for the new key (secagg authority sign)"
                )
            db.execute(
                "UPDATE participants SET public_key = ?, revoked_at = NULL WHERE name = ?",
                (public_key, name),
            )
            if signed_entry:
                db.execute(
                    "INSERT OR REPLACE INTO directory_entries (name, entry) VALUES (?, ?)",
                    (name, bytes(signed_entry)),
                )
            body = {
                "name": name,
                "old_identity_key": bytes(row[0]).hex(),
                "identity_key": public_key.hex(),
                "operator": operator,
            }
            if signed_entry:
                body["entry_sha256"] = hashlib.sha256(bytes(signed_entry)).hexdigest()
            self._append(db, "participant_rotated", "", body)
        return ParticipantRecord(name, public_key, row[1], None)

    def participant(self, name: str) -> ParticipantRecord | None:
        rows = self._query(
            "SELECT name, public_key, enrolled_at, revoked_at FROM participants WHERE name = ?",
            (name,),
        )
        return ParticipantRecord(*rows[0]) if rows else None

    def participant_by_key(self, public_key: bytes) -> ParticipantRecord | None:
        rows = self._query(
            "SELECT name, public_key, enrolled_at, revoked_at FROM participants "
            "WHERE public_key = ?",
            (public_key,),
        )
        return ParticipantRecord(*rows[0]) if rows else None

    def participants(self) -> list[ParticipantRecord]:
        rows = self._query(
            "SELECT name, public_key, enrolled_at, revoked_at FROM participants ORDER BY name"
        )
        return [ParticipantRecord(*r) for r in rows]

    # -- operators -----------------------------------------------------------------------------

    def add_operator(
        self, name: str, public_key: bytes, *, operator: str = LOCAL_OPERATOR
    ) -> OperatorRecord:
        """Allow ``name`` to call the admin API with Ed25519 key ``public_key``."""
        _check_name(name, "operator")
        _check_key(public_key)
        now = time.time()
        with self._tx() as db:
            clash = db.execute(
                "SELECT name FROM operators WHERE name = ? OR public_key = ?", (name, public_key)
            ).fetchone()
            if clash:
                raise AlreadyExists(f"operator {clash[0]!r} already holds this name or key")
            db.execute(
                "INSERT INTO operators (name, public_key, added_at) VALUES (?, ?, ?)",
                (name, public_key, now),
            )
            body = {"name": name, "public_key": public_key.hex(), "operator": operator}
            self._append(db, "operator_added", "", body)
        return OperatorRecord(name, public_key, now, None)

    def revoke_operator(self, name: str, *, operator: str = LOCAL_OPERATOR) -> OperatorRecord:
        """Refuse ``name``'s admin calls from now on (recorded in the log)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT public_key, added_at, revoked_at FROM operators WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no operator named {name!r}")
            if row[2] is not None:
                return OperatorRecord(name, bytes(row[0]), row[1], row[2])
            db.execute("UPDATE operators SET revoked_at = ? WHERE name = ?", (now, name))
            self._append(db, "operator_revoked", "", {"name": name, "operator": operator})
        return OperatorRecord(name, bytes(row[0]), row[1], now)

    def operator_by_key(self, public_key: bytes) -> OperatorRecord | None:
        rows = self._query(
            "SELECT name, public_key, added_at, revoked_at FROM operators WHERE public_key = ?",
            (public_key,),
        )
        return OperatorRecord(rows[0][0], bytes(rows[0][1]), *rows[0][2:]) if rows else None

    def operators(self) -> list[OperatorRecord]:
        rows = self._query(
            "SELECT name, public_key, added_at, revoked_at FROM operators ORDER BY name"
        )
        return [OperatorRecord(r[0], bytes(r[1]), r[2], r[3]) for r in rows]

    # -- rounds ---------------------------------------------------------------------------------

    def create_round(
        self,
        round_id: bytes,
        job: str,
        params: bytes,
        plaintext: bool,
        deadlines: Mapping[str, float],
        members: Sequence[Member],
        audit_body: Mapping[str, Any],
        job_index: int | None = None,
    ) -> None:
        """Record a new running round and its ``round_created`` audit entry, atomically.

        ``job_index`` places the round in job ``job`` (which must be running, with this as
        its next index); the job's next index moves on in the same transaction.
        """
        now = time.time()
        with self._tx() as db:
            if job_index is not None:
                row = db.execute(
                    "SELECT status, next_index FROM jobs WHERE name = ?", (job,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"no job {job!r}")
                if row[0] != RUNNING or row[1] != job_index:
                    raise AlreadyExists(
                        f"job {job!r} is {row[0]} at round {row[1]}: round {job_index} cannot open"
                    )
                db.execute("UPDATE jobs SET next_index = ? WHERE name = ?", (job_index + 1, job))
            db.execute(
                "INSERT INTO rounds (round_id, job, status, params, plaintext, deadlines, "
                "created_at, job_index) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    round_id,
                    job,
                    RUNNING,
                    params,
                    int(plaintext),
                    json.dumps(dict(deadlines)),
                    now,
                    job_index,
                ),
            )
            db.executemany(
                "INSERT INTO round_members (round_id, client_id, name, public_key) "
                "VALUES (?, ?, ?, ?)",
                [(round_id, m.client_id, m.name, m.public_key) for m in members],
            )
            self._append(db, "round_created", round_id.hex(), audit_body)

    def finish_round(self, round_id: bytes, status: str, outcome: Mapping[str, Any]) -> None:
        """Mark a running round completed or aborted and log its outcome, atomically."""
        with self._tx() as db:
            row = db.execute(
                "SELECT status, job, job_index FROM rounds WHERE round_id = ?", (round_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no round {round_id.hex()}")
            if row[0] != RUNNING:
                return
            now = time.time()
            db.execute(
                "UPDATE rounds SET status = ?, ended_at = ?, outcome = ? WHERE round_id = ?",
                (status, now, canonical_json(outcome), round_id),
            )
            self._append(db, f"round_{status}", round_id.hex(), outcome)
            if row[2] is not None:
                self._round_of_job_ended(db, row[1], now)

    def _round_of_job_ended(self, db: sqlite3.Connection, job: str, now: float) -> None:
        """Count one more ended round of ``job``; a job that reached its rounds finishes."""
        db.execute("UPDATE jobs SET rounds_done = rounds_done + 1 WHERE name = ?", (job,))
        row = db.execute(
            "SELECT status, rounds_total, rounds_done FROM jobs WHERE name = ?", (job,)
        ).fetchone()
        if row is None or row[0] not in (RUNNING, PAUSED) or row[1] is None or row[2] < row[1]:
            return
        db.execute("UPDATE jobs SET status = ?, ended_at = ? WHERE name = ?", (FINISHED, now, job))
        self._append(db, "job_finished", "", {"job": job, "rounds_done": row[2]})

    def set_stage(self, round_id: bytes, stage: str) -> None:
        """Remember the stage a running round reached (reported if the server dies)."""
        with self._tx() as db:
            db.execute("UPDATE rounds SET stage = ? WHERE round_id = ?", (stage, round_id))

    def abort_interrupted(self, reason: str) -> list[bytes]:
        """Mark every round still ``running`` (the server stopped under it) as aborted."""
        rows = self._query("SELECT round_id, stage FROM rounds WHERE status = ?", (RUNNING,))
        for rid, stage in rows:
            self.finish_round(
                bytes(rid), ABORTED, {"status": ABORTED, "stage": stage, "reason": reason}
            )
        return [bytes(r[0]) for r in rows]

    # -- jobs -------------------------------------------------------------------------------------

    def create_job(
        self,
        name: str,
        spec: Mapping[str, Any],
        rounds_total: int | None,
        *,
        operator: str = LOCAL_OPERATOR,
        audit: Mapping[str, Any] | None = None,
    ) -> JobRecord:
        """Record a new running job (``job_created`` names ``operator``); names are unique
        forever, so a job's audit entries never mix with an older job's."""
        _check_name(name, "job")
        if rounds_total is not None and rounds_total < 1:
            raise ConfigurationError(f"a job runs at least 1 round, got {rounds_total}")
        now = time.time()
        text = canonical_json(spec)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"a job named {name!r} exists (job names are never reused)")
            if db.execute(
                "SELECT 1 FROM rounds WHERE job = ? AND status = ?", (name, RUNNING)
            ).fetchone():
                raise AlreadyExists(f"{name!r} already has a running round (round create)")
            db.execute(
                "INSERT INTO jobs (name, spec, created_at, created_by, status, rounds_total) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, text, now, operator, RUNNING, rounds_total),
            )
            body = {"job": name, "rounds": rounds_total, "operator": operator, **(audit or {})}
            self._append(db, "job_created", "", body)
        record = self.job(name)
        assert record is not None
        return record

    def end_job(
        self, name: str, status: str, reason: str = "", *, operator: str = LOCAL_OPERATOR
    ) -> JobRecord:
        """Mark a running or paused job ``status`` (``aborted`` or ``finished``), logged as
        ``job_<status>`` naming ``operator``; a job that already ended is left as it is."""
        if status not in (ABORTED, FINISHED):
            raise ConfigurationError(f"a job ends finished or aborted, not {status!r}")
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no job {name!r}")
            if row[0] in (RUNNING, PAUSED):
                db.execute(
                    "UPDATE jobs SET status = ?, ended_at = ?, reason = ? WHERE name = ?",
                    (status, time.time(), reason, name),
                )
                body = {"job": name, "reason": reason, "operator": operator}
                self._append(db, f"job_{status}", "", body)
        record = self.job(name)
        assert record is not None
        return record

    def set_job_status(
        self, name: str, status: str, *, operator: str = LOCAL_OPERATOR
    ) -> JobRecord:
        """Pause a running job or resume a paused one (``job_paused`` / ``job_resumed``)."""
        if status not in (RUNNING, PAUSED):
            raise ConfigurationError(f"a job is paused or resumed, not set to {status!r}")
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no job {name!r}")
            if row[0] not in (RUNNING, PAUSED):
                raise AlreadyExists(f"job {name!r} is {row[0]}")
            if row[0] != status:
                db.execute("UPDATE jobs SET status = ? WHERE name = ?", (status, name))
                kind = "job_paused" if status == PAUSED else "job_resumed"
                self._append(db, kind, "", {"job": name, "operator": operator})
        record = self.job(name)
        assert record is not None
        return record

    _JOB_SQL = (
        "SELECT j.name, j.spec, j.created_at, j.created_by, j.status, j.rounds_total, "
        "j.rounds_done, j.next_index, j.ended_at, j.reason, "
        "(SELECT COUNT(*) FROM rounds r WHERE r.job = j.name AND r.job_index IS NOT NULL "
        " AND r.status = 'completed'), "
        "(SELECT COUNT(*) FROM rounds r WHERE r.job = j.name AND r.job_index IS NOT NULL "
        " AND r.status = 'aborted'), "
        "(SELECT MAX(r.created_at) FROM rounds r WHERE r.job = j.name "
        " AND r.job_index IS NOT NULL) "
        "FROM jobs j"
    )

    @staticmethod
    def _job_record(row: Sequence[Any]) -> JobRecord:
        return JobRecord(
            name=row[0],
            spec=json.loads(row[1]),
            created_at=row[2],
            created_by=row[3],
            status=row[4],
            rounds_total=row[5],
            rounds_done=row[6],
            next_index=row[7],
            ended_at=row[8],
            reason=row[9],
            rounds_completed=row[10],
            rounds_aborted=row[11],
            last_opened_at=row[12],
        )

    def job(self, name: str) -> JobRecord | None:
        rows = self._query(self._JOB_SQL + " WHERE j.name = ?", (name,))
        return self._job_record(rows[0]) if rows else None

    def jobs(self, status: str | None = None) -> list[JobRecord]:
        """Every job (or those with ``status``), oldest first."""
        if status is None:
            rows = self._query(self._JOB_SQL + " ORDER BY j.created_at, j.name")
        else:
            rows = self._query(
                self._JOB_SQL + " WHERE j.status = ? ORDER BY j.created_at, j.name", (status,)
            )
        return [self._job_record(r) for r in rows]

    def rounds(self, job: str | None = None) -> list[RoundRecord]:
        """Every round (or those labelled ``job``), oldest first, without their members."""
        sql = (
            "SELECT round_id, job, status, params, plaintext, deadlines, created_at, ended_at, "
            "outcome, job_index FROM rounds"
        )
        args: tuple[Any, ...] = ()
        if job is not None:
            sql += " WHERE job = ?"
            args = (job,)
        rows = self._query(sql + " ORDER BY created_at, rowid", args)
        return [self._round_record(r, ()) for r in rows]

    @staticmethod
    def _round_record(r: Sequence[Any], members: tuple[Member, ...]) -> RoundRecord:
        return RoundRecord(
            bytes(r[0]),
            r[1],
            r[2],
            bytes(r[3]),
            bool(r[4]),
            json.loads(r[5]),
            r[6],
            r[7],
            json.loads(r[8]) if r[8] else {},
            members,
            r[9],
        )

    def running_job(self, job: str) -> bytes | None:
        rows = self._query(
            "SELECT round_id FROM rounds WHERE job = ? AND status = ?", (job, RUNNING)
        )
        return bytes(rows[0][0]) if rows else None

    def round(self, round_id: bytes) -> RoundRecord | None:
        rows = self._query(
            "SELECT round_id, job, status, params, plaintext, deadlines, created_at, ended_at, "
            "outcome, job_index FROM rounds WHERE round_id = ?",
            (round_id,),
        )
        if not rows:
            return None
        r = rows[0]
        members = tuple(
            Member(*m)
            for m in self._query(
                "SELECT client_id, name, public_key FROM round_members WHERE round_id = ? "
                "ORDER BY client_id",
                (round_id,),
            )
        )
        return self._round_record(r, members)


def _check_name(name: str, what: str) -> None:
    if not name or len(name) > 128 or not name.isprintable():
        raise ConfigurationError(f"{what} names are 1..128 printable characters")


def _check_key(public_key: bytes) -> None:
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ConfigurationError("identity keys are 32-byte Ed25519 public keys")
    try:
        check_identity_key(public_key)
    except InvalidSignature as exc:
        raise ConfigurationError(f"unusable identity key: {exc}") from None


def _check_entry(signed_entry: bytes, name: str, public_key: bytes) -> None:
    entry = SignedEntry.decode(signed_entry)
    if entry.name != name or entry.identity_key != bytes(public_key):
        raise ConfigurationError(
            f"the signed entry vouches for {entry.name!r}, not for {name!r} with this key"
        )
