"""The append-only, hash-chained audit log: entry hashing, verification and printing.

Entry ``i`` commits to entry ``i - 1``::

    hash_i = SHA-256("secagg/v1/audit" || hash_{i-1} || seq_i || ts_i || kind_i
                     || round_i || body_i)

with ``hash_0`` of the first entry's predecessor all zero, integers as decimal text
separated by NUL bytes and ``body`` as canonical JSON (sorted keys, no spaces). Changing,
inserting or removing any entry breaks every later hash; removing entries at the *end*
is only visible against a head hash kept elsewhere (``secagg audit --expect-head``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from secagg.errors import StoreError

__all__ = ["GENESIS", "AuditEntry", "canonical_json", "entry_hash", "format_entry", "verify_chain"]

GENESIS = "00" * 32
"""Predecessor hash of the first entry."""


@dataclass(frozen=True)
class AuditEntry:
    """One row of the log, as stored."""

    seq: int
    ts: float
    kind: str
    round_id: str
    body: str
    prev_hash: str
    hash: str

    @property
    def data(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


def canonical_json(body: Mapping[str, Any]) -> str:
    """The one encoding of ``body`` that gets hashed."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(prev_hash: str, seq: int, ts: float, kind: str, round_id: str, body: str) -> str:
    """Hex SHA-256 of one entry chained to its predecessor."""
    h = hashlib.sha256(b"secagg/v1/audit\0")
    for part in (prev_hash, str(seq), repr(ts), kind, round_id, body):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def verify_chain(entries: Iterable[AuditEntry], expect_head: str | None = None) -> str:
    """Check every link and hash; return the head hash (``GENESIS`` for an empty log).

    Raises
    ------
    StoreError
        Naming the first entry that does not verify.
    """
    prev = GENESIS
    expected_seq = 1
    for e in entries:
        if e.seq != expected_seq:
            raise StoreError(f"audit log: entry {expected_seq} is missing (found {e.seq})")
        if e.prev_hash != prev:
            raise StoreError(f"audit log: entry {e.seq} does not link to entry {e.seq - 1}")
        try:
            canonical = canonical_json(json.loads(e.body))
        except ValueError:
            raise StoreError(f"audit log: entry {e.seq} body is not JSON") from None
        if (
            canonical != e.body
            or entry_hash(prev, e.seq, e.ts, e.kind, e.round_id, e.body) != e.hash
        ):
            raise StoreError(f"audit log: entry {e.seq} was altered (hash mismatch)")
        prev = e.hash
        expected_seq += 1
    if expect_head is not None and prev != expect_head:
        raise StoreError(f"audit log: head is {prev}, expected {expect_head} (entries removed?)")
    return prev


def format_entry(e: AuditEntry) -> str:
    """One human-readable line per entry (``secagg audit``)."""
    data = e.data
    parts = [f"#{e.seq}", e.kind]
    if e.round_id:
        parts.append(f"round={e.round_id}")
    for key in ("job", "name", "operator", "status", "stage", "reason", "aggregate_sha256"):
        if key in data and data[key] not in ("", None):
            parts.append(f"{key}={data[key]}")
    if "participants" in data:
        parts.append(f"participants={len(data['participants'])}")
    if "contributors" in data:
        parts.append(f"contributors={len(data['contributors'])}")
    for d in data.get("dropouts", []):
        parts.append(f"dropped[{d['client_id']}@{d['stage']}]")
    return " ".join(parts)
