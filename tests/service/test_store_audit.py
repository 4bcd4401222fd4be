"""The SQLite store and the hash-chained audit log: append-only, tamper-evident."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from secagg.errors import StoreError
from secagg.keys import IdentityKey
from secagg.service.cli import main
from secagg.service.errors import AlreadyExists
from secagg.service.store import Member, Store


def _filled(path: Path) -> Store:
    store = Store(path)
    keys = [IdentityKey().public for _ in range(3)]
    for i, k in enumerate(keys):
        store.enroll(f"p{i}", k)
    rid = bytes(range(16))
    members = [Member(i + 1, f"p{i}", k) for i, k in enumerate(keys)]
    store.create_round(rid, "job", b"params", False, {"share_keys": 5.0}, members, {"job": "job"})
    store.finish_round(rid, "completed", {"status": "completed", "contributors": [1, 2, 3]})
    store.revoke("p2")
    return store


def test_chain_verifies_and_records_everything(tmp_path: Path) -> None:
    store = _filled(tmp_path / "s.db")
    kinds = [e.kind for e in store.audit_entries()]
    assert kinds == ["participant_enrolled"] * 3 + [
        "round_created",
        "round_completed",
        "participant_revoked",
    ]
    head = store.verify_audit()
    assert store.verify_audit(expect_head=head) == head
    assert store.participant("p2") is not None and store.participant("p2").revoked  # type: ignore[union-attr]
    rec = store.round(bytes(range(16)))
    assert rec is not None and rec.status == "completed" and len(rec.members) == 3
    with pytest.raises(AlreadyExists):
        store.enroll("p0", IdentityKey().public)


def test_log_refuses_update_and_delete(tmp_path: Path) -> None:
    store = _filled(tmp_path / "s.db")
    store.close()
    db = sqlite3.connect(tmp_path / "s.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET body = '{}' WHERE seq = 2")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit WHERE seq = 2")


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        (
            "UPDATE audit SET body = replace(body, 'job', 'JOB') WHERE seq = 4",
            "entry 4 was altered",
        ),
        ("DELETE FROM audit WHERE seq = 2", "entry 2 is missing"),
        ("UPDATE audit SET ts = ts + 1 WHERE seq = 5", "entry 5 was altered"),
        ("UPDATE audit SET prev_hash = hash WHERE seq = 3", "entry 3 does not link"),
    ],
)
def test_tampering_is_detected(tmp_path: Path, sql: str, match: str) -> None:
    path = tmp_path / "s.db"
    _filled(path).close()
    db = sqlite3.connect(path)
    db.executescript("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
    db.execute(sql)
    db.commit()
    db.close()
    store = Store(path)
    with pytest.raises(StoreError, match=match):
        store.verify_audit()
    store.close()
    assert main(["audit", "--store", str(path)]) == 4


def test_truncation_detected_against_a_kept_head(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = _filled(path)
    head = store.verify_audit()
    store.close()
    db = sqlite3.connect(path)
    db.executescript("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq = 6;")
    db.close()
    assert main(["audit", "--store", str(path)]) == 0  # a shorter chain still links
    assert main(["audit", "--store", str(path), "--expect-head", head]) == 4


def test_audit_cli_prints_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.db"
    _filled(path).close()
    assert main(["audit", "--store", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "round_completed" in out and "audit chain OK: 6 entries" in err
    assert main(["audit", "--store", str(path), "--json"]) == 0
    assert '"kind": "round_created"' in capsys.readouterr().out
