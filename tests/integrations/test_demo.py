"""A small ``secagg demo`` run: its three claims, the dropout in the audit log, and the
real path: a provisioned federation, the server and every site started from their kits,
each training run a job the server runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from secagg.service import cli
from secagg.service.demo import MODES, DemoConfig, main, run_demo


def test_small_demo_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = DemoConfig(
        sites=5,
        rounds=8,
        modes=MODES,
        out=tmp_path,
        progress=False,
        cnn_rounds=3,
        cnn_modes=("masked",),
    )
    summary = run_demo(cfg)
    methods = summary["methods"]
    ran = [m for m in MODES if methods[m]["available"]]
    assert ran == list(MODES), {m: methods[m].get("reason") for m in MODES}
    claims = summary["claims"]
    # 1. secure FedAvg (every mode that ran) within 0.5 pp of plaintext FedAvg
    assert claims["secure_matches_plaintext"]["ok"], claims
    assert set(claims["secure_matches_plaintext"]["gap_pp"]) == set(ran)
    # Each round's aggregate is exact up to one quantization step (tests/test_modes.py and
    # tests/service check that bit for bit); over 8 rounds of SGD the independent rounding
    # noise of each run is amplified (measured: 4 to 41 steps), so only "the same model" is
    # checked here: weights of magnitude ~0.1-1 agree to 1e-2.
    for m in ran:
        assert methods[m]["max_weight_diff_vs_plaintext"] < 1e-2
    # 2. federated within 3 points of centralized on the tabular set
    assert summary["dataset"]["name"] == "breast_cancer"
    assert claims["federated_near_centralized"]["ok"], claims
    # 3. rounds with a dropped site complete and the dropout is in the audit log
    assert claims["dropped_rounds_audited"]["ok"], claims
    assert summary["drop_schedule"] == {"site": "site-5", "rounds": [2, 6]}
    for m in ran:
        rounds = methods[m]["rounds"]
        assert len(rounds) == 8
        for r in rounds:
            if r["dropped_site"]:
                stage = "encrypted_input" if m == "ckks" else "masked_input"
                assert r["dropouts"] == [{"name": "site-5", "stage": stage}]
                assert "site-5" not in r["contributors"] and len(r["contributors"]) == 4
            else:
                assert r["dropouts"] == [] and len(r["contributors"]) == 5
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

    # the second task: a CNN of >= 100,000 parameters, the same checks (3 rounds are too few
    # to come near centralized training: that claim is only checked at full size)
    second = summary["second_task"]
    assert second["parameters"] == second["dim"] == 105_226
    c2 = second["claims"]
    # Claim 1 is checked by `make demo` at full size (15 rounds). After 3 rounds the CNN sits
    # on the steep part of its learning curve: the secure and plaintext weights agree to
    # < 1e-2 (asserted below) yet test accuracy swings by several points with the fresh
    # randomized rounding of each run (measured 0.0 to 6.8 pp), so here only its presence.
    assert set(c2["secure_matches_plaintext"]["gap_pp"]) == {"masked"}, c2
    assert (
        c2["dropped_rounds_audited"]["ok"] and c2["dropped_rounds_audited"]["dropped_rounds"] == 1
    )
    cnn = second["methods"]["masked"]
    assert [r["dropped_site"] for r in cnn["rounds"]] == [None, "site-5", None]
    # the same model: 105k weights at lr 0.2 amplify the rounding noise more (measured
    # 1.2e-2 after 3 rounds); the accuracy gap above is the claim
    assert cnn["max_weight_diff_vs_plaintext"] < 5e-2
    over = second["overhead"]["masked"]
    assert over["plaintext_bytes_per_site"] == 4 * 105_226
    assert over["bytes_up_per_site"] > over["plaintext_bytes_per_site"] / 2  # 16-bit or wider
    assert over["site_secagg_seconds_per_round"] > 0
    assert summary["claims"]["second_task"]["ok"] == c2["all"]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["claims"]["secure_matches_plaintext"]["ok"]
    assert written["second_task"]["parameters"] == 105_226

    # the real path: kits from `secagg provision`, mutual TLS, each mode run as a job that
    # the server ran and the sites followed (Client.rounds), created by the operator's kit
    kits = tmp_path / "kits"
    assert (tmp_path / "federation.toml").is_file()
    assert sorted(p.name for p in (kits / "sites").iterdir()) == [f"site-{i}" for i in range(1, 6)]
    for m in ran:
        assert methods[m]["job_path"] == "server" and methods[m]["job"] == f"tabular-{m}"
    assert cnn["job_path"] == "server" and cnn["job"] == "cnn-masked"
    serving = next(
        json.loads(line)
        for line in (tmp_path / "server.log").read_text().splitlines()
        if '"serving"' in line
    )
    assert serving["mutual_tls"] is True and serving["tls"] is True
    assert Path(summary["audit"]["store"]) == kits / "server" / "secagg.db"
    from secagg.service.store import Store

    store_ = Store(kits / "server" / "secagg.db")
    try:
        jobs = {j.name: j for j in store_.jobs()}
        assert {"tabular-masked", "tabular-ckks", "tabular-hybrid", "cnn-masked"} <= set(jobs)
        assert all(jobs[n].status == "finished" for n in ("tabular-masked", "cnn-masked"))
        assert {j.created_by for j in jobs.values()} == {"operator"}
        created = [e for e in store_.audit_entries() if e.kind == "job_created"]
        assert len(created) == len(jobs) and {e.data["operator"] for e in created} == {"operator"}
    finally:
        store_.close()

    # the same dropout through `secagg audit`
    dropped = next(r for r in methods["masked"]["rounds"] if r["dropped_site"])
    capsys.readouterr()
    store = str(kits / "server" / "secagg.db")
    assert cli.main(["audit", "--store", store, "--round", dropped["round_id"], "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    done = [e for e in entries if e["kind"] == "round_completed"]
    assert [d["name"] for d in done[0]["body"]["dropouts"]] == ["site-5"]


def test_bad_arguments() -> None:
    assert main(["--modes", "rot13"]) == 2
    assert main(["--sites", "1"]) == 2
    assert main(["--cnn-modes", "rot13"]) == 2
    assert main(["--cnn-rounds", "-1"]) == 2
