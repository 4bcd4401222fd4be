"""``secagg privacy --job J``: the ledger table, its JSON, and one-line errors with the
documented exit codes (the style of test_cli_errors.py: the real command as a subprocess)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("dp_accounting")

from secagg.dp.calibration import calibrate
from secagg.dp.policy import DPOffer
from secagg.service import cli
from secagg.service.errors import EXIT_AUDIT, EXIT_CONFIG, EXIT_NOT_FOUND
from secagg.service.privacy import JobLedger
from secagg.service.store import Store

from .cli_proc import run_cli

ROUNDS = ["aa" * 16, "bb" * 16, "cc" * 16]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("privacy-cli") / "secagg.db"
    cal = calibrate(2.0, 1e-5, 4, n_clients=8, min_survivors=6, dim=30, clip=1.0)
    offer = DPOffer(cal.dim, cal.clip, cal.gamma, cal.beta, cal.bits, cal.rounds, cal.plan)
    store = Store(path)
    ledger = JobLedger(store, "dp-job", epsilon=2.0, delta=1e-5)
    for rid, survivors in zip(ROUNDS, [8, 7, 6], strict=True):
        ledger.admit(offer)
        ledger.charge(bytes.fromhex(rid), offer, survivors)
    store.close()
    return path


def test_prints_the_ledger(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["privacy", "--job", "dp-job", "--store", str(store_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("job dp-job: budget epsilon 2 at delta 1e-05; 3 rounds, spent ")
    assert out[1].split() == [
        "round",
        "contrib",
        "target",
        "std",
        "rho",
        "eps",
        "(RDP)",
        "eps",
        "(PLD)",
        "left",
    ]
    assert [line.split()[:2] for line in out[2:]] == [
        [r, c] for r, c in zip(ROUNDS, "876", strict=True)
    ]


def test_json(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["privacy", "--job", "dp-job", "--store", str(store_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["job"] == "dp-job" and doc["rounds_charged"] == 3
    assert [r["contributor_count"] for r in doc["rounds"]] == [8, 7, 6]
    assert doc["epsilon_spent"] == doc["rounds"][-1]["epsilon_rdp"] < 2.0
    assert doc["budget_left"] == pytest.approx(2.0 - doc["epsilon_spent"])
    for key in ("target_std", "rho", "epsilon_pld", "components_kept", "gamma", "bits"):
        assert key in doc["rounds"][0]


def _tampered(store_path: Path) -> Path:
    copy = store_path.with_name("tampered.db")
    src, dst = sqlite3.connect(store_path), sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.execute("DROP TRIGGER privacy_ledger_no_update")
    (body,) = dst.execute("SELECT body FROM privacy_ledger WHERE seq = 3").fetchone()
    doc = json.loads(body)
    doc["epsilon_rdp"] = 0.5  # hide what the job spent
    dst.execute("UPDATE privacy_ledger SET body = ? WHERE seq = 3", (json.dumps(doc),))
    dst.commit()
    dst.close()
    return copy


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--job", "nope"], EXIT_NOT_FOUND, "job 'nope' has no privacy ledger"),
        (["--job", "dp-job", "--store", "missing.db"], EXIT_CONFIG, "no store at missing.db"),
        (["--job", "dp-job", "--store", "TAMPERED"], EXIT_AUDIT, "row 3 (round cccc"),
        ([], EXIT_CONFIG, "the following arguments are required: --job"),
    ],
)
def test_errors_are_one_line(store_path: Path, args: list[str], code: int, message: str) -> None:
    if "TAMPERED" in args:
        args = [str(_tampered(store_path)) if a == "TAMPERED" else a for a in args]
    elif "--store" not in args and args:
        args = [*args, "--store", str(store_path)]
    proc = run_cli(["privacy", *args], cwd=store_path.parent)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("secagg"), lines[0]
    assert message in lines[0], lines[0]
    assert not (store_path.parent / "missing.db").exists()  # a read never creates a store


def test_audit_prints_the_dp_entries(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``secagg audit`` reads the ledger's entries: the count is ``contributor_count``, since
    ``format_entry`` takes ``contributors`` for a list of ids (an int there crashed it)."""
    assert cli.main(["audit", "--store", str(store_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    charges = [line for line in lines if " dp_charge " in line]
    assert len(charges) == 3 and all("job=dp-job" in line for line in charges)
    assert any(" dp_budget " in line for line in lines)
