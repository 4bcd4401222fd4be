"""Distributed-DP rounds and jobs in the service (issue 13, service side), over real gRPC.

The operator asks for a budget (``--dp-epsilon --dp-delta --dp-rounds --dp-clip``); the
coordinator calibrates each round for its ``n`` and threshold, admits it against the job's
ledger (worst case ``n`` contributors) and charges it with its real contributors. Each site
also keeps its own ledger (``service/dpbudget.py``) and refuses, before sending, a round that
would pass its policy's ``max_epsilon``: the server is the adversary and may open more
rounds than it announced. Before this work a service round could not carry DP at all
(``RoundSpec`` had no DP field and ``--dp`` was carried opaquely) and a site counted
nothing across rounds.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("dp_accounting")

from secagg.dp.policy import DPPolicy
from secagg.errors import ConfigurationError
from secagg.messages import MaskedInput
from secagg.server import StageTimeouts
from secagg.service import cli, serde
from secagg.service.client import Policy
from secagg.service.coordinator import JobSpec, RoundSpec
from secagg.service.dpbudget import ANY_JOB, SiteBudget, worst_rho
from secagg.service.dpspec import DPSpec
from secagg.service.errors import (
    EXIT_CONFIG,
    SiteBudgetExhausted,
    exit_code_for,
)
from secagg.service.jobs import BUDGET_EXHAUSTED
from secagg.service.privacy import AUDIT_CHARGE, JobLedger
from secagg.service.serde import (
    job_spec_from_proto,
    job_spec_to_proto,
    max_client_message_bytes,
    max_server_message_bytes,
    round_spec_from_proto,
    round_spec_to_proto,
)

from .cli_proc import run_cli
from .helpers import Deployment, run_threads, silent_from

DIM = 12
EPS, DELTA, CLIP = 3.0, 1e-5, 1.0


def _policy(max_epsilon: float = EPS, max_rounds: int = 3, **kw: Any) -> Policy:
    dp = DPPolicy(max_epsilon=max_epsilon, delta=DELTA, max_rounds=max_rounds, max_clip=CLIP)
    return Policy(dp=dp, **kw)


# -- the typed spec and its wire form ---------------------------------------------------------


def test_dpspec_parses_and_refuses_in_one_line() -> None:
    """JSON keys fill from the job (rounds) and round (clip); every bad value is one line."""
    spec = DPSpec.from_json({"epsilon": 2}, rounds=4, clip=0.5)
    assert spec == DPSpec(epsilon=2.0, delta=1e-5, rounds=4, clip=0.5)
    assert DPSpec.from_json(spec.to_json()) == spec
    bad = [
        ({"epsilon": 1, "rounds": 2, "clip": 1, "eps": 3}, "unknown dp keys ['eps']"),
        ({"epsilon": 1, "clip": 1}, "dp needs rounds"),
        ({"epsilon": -1, "rounds": 2, "clip": 1}, "dp epsilon must be > 0, got -1.0"),
        ({"epsilon": 1, "rounds": 2, "clip": 1, "delta": 1}, "dp delta must be in (0, 1)"),
        ({"epsilon": 1, "rounds": 0, "clip": 1}, "dp rounds must be >= 1, got 0"),
        ({"epsilon": 1, "rounds": 2.5, "clip": 1}, "dp rounds must be an integer, got 2.5"),
        ({"epsilon": "x", "rounds": 2, "clip": 1}, "dp epsilon must be a finite number"),
        ({"epsilon": 1, "rounds": 2, "clip": 1, "max_withholders": -1}, "max_withholders"),
        ({"epsilon": 1, "rounds": 2, "clip": 1, "sampling_rate": 0}, "sampling_rate"),
    ]
    for doc, msg in bad:
        with pytest.raises(ConfigurationError, match=None) as info:
            DPSpec.from_json(doc)
        assert msg in str(info.value) and "\n" not in str(info.value), (doc, str(info.value))
    from secagg.service.coordinator import Coordinator

    with pytest.raises(ConfigurationError, match="masked and hybrid rounds only"):
        Coordinator._params(RoundSpec("j", ["a"] * 4, DIM, mode="plaintext", dp=spec), 4)


def test_dp_travels_in_create_round_and_create_job() -> None:
    """``CreateRoundRequest.dp_json`` and ``CreateJobRequest.dp_json`` round-trip the spec;
    a job's DP rounds default to the job's rounds."""
    dp = DPSpec(epsilon=EPS, delta=DELTA, rounds=3, clip=CLIP, max_withholders=1)
    rspec = RoundSpec("j", ["a", "b", "c"], DIM, dp=dp)
    again = round_spec_from_proto(round_spec_to_proto(rspec), StageTimeouts())
    assert again.dp == dp
    job = JobSpec(name="j", participants=["a", "b", "c"], dim=DIM, rounds=5, dp={"epsilon": 1})
    assert job.dp_spec == DPSpec(epsilon=1.0, delta=1e-5, rounds=5, clip=8.0)
    back = job_spec_from_proto(job_spec_to_proto(job), StageTimeouts())
    assert back.dp_spec == job.dp_spec and back.round_spec().dp == job.dp_spec
    assert JobSpec.from_json(job.to_json()).dp_spec == job.dp_spec


def test_message_bounds_grow_with_the_dp_sections() -> None:
    """The DP share sections (docs/dp.md) are inside the bounds both sides allocate by."""
    from secagg.service.coordinator import Coordinator

    plain = Coordinator._params(RoundSpec("j", ["a"] * 5, DIM), 5)
    spec = RoundSpec("j", ["a"] * 5, DIM, dp=DPSpec(epsilon=EPS, delta=DELTA, rounds=3, clip=1))
    dp = Coordinator._params(spec, 5)
    assert dp.dp is not None and dp.quant.max_weight == 1
    seeds, k = dp.dp.plan.components - 1, min(dp.degree, 4)
    assert seeds >= 1
    share_keys = 1 + 4 + k * (4 + 33 * seeds + 16) + 4 + (k + 1) * (4 + 32 * seeds)
    share_keys += 4 + (k + 1) * 36  # precompute salts (noise drawn before the round)
    assert serde._dp_share_section(k, seeds) == share_keys
    assert serde._dp_unmask_section(k, seeds) == 4 + (k + 1) * seeds * 38
    assert serde._dp_share_section(k, 0) == serde._dp_unmask_section(k, 0) == 0
    assert max_client_message_bytes(dp) >= max_client_message_bytes(plain)
    assert max_server_message_bytes(dp) >= max_server_message_bytes(plain)


# -- CLI flags ---------------------------------------------------------------------------------


def test_cli_dp_flags_errors(tmp_path: Path) -> None:
    """``round create`` / ``job create`` DP flags: one line, exit 2, before any connection."""
    base = ["--participants", "a,b,c", "--dim", "4", "--server", "127.0.0.1:1"]
    cases = [
        (["round", "create", "--job", "j", *base, "--dp-epsilon", "1"], "needs --dp-rounds"),
        (["round", "create", "--job", "j", *base, "--dp-rounds", "3"], "need --dp-epsilon"),
        (
            ["job", "create", "j", *base, "--dp", '{"epsilon": 1}', "--dp-epsilon", "1"],
            "not both",
        ),
        (
            [
                "job",
                "create",
                "j",
                *base,
                "--dp-epsilon",
                "1",
                "--dp-rounds",
                "2",
                "--dp-delta",
                "2",
            ],
            "dp delta must be in (0, 1), got 2.0",
        ),
    ]
    for argv, msg in cases:
        out = run_cli(argv, cwd=tmp_path)
        assert out.returncode == EXIT_CONFIG, (argv, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (argv, out.stderr)


def test_cli_dp_flags_build_the_spec() -> None:
    """The flags make the same DPSpec as the JSON (``--dp-rounds`` defaults to ``--rounds``)."""
    import argparse

    parser = argparse.ArgumentParser()
    cli._add_job(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["job", "create", "j", "--participants", "a", "--dim", "4", "--rounds", "3",
         "--dp-epsilon", "2", "--dp-clip", "0.5", "--dp-max-withholders", "1"]
    )  # fmt: skip
    assert cli._dp_arg(args, rounds=args.rounds) == DPSpec(
        epsilon=2.0, delta=1e-5, rounds=3, clip=0.5, max_withholders=1
    )


# -- the site's own ledger --------------------------------------------------------------------


def test_site_budget_file_counts_and_refuses(tmp_path: Path) -> None:
    """The state file is 0600, survives a new SiteBudget, never counts a round twice, and
    refuses the round that would pass ``max_epsilon`` (or ``max_rounds``)."""
    offer = DPSpec(epsilon=EPS, delta=DELTA, rounds=2, clip=CLIP).offer(5, 3, DIM)
    policy = _policy(max_rounds=10).dp
    assert policy is not None
    path = tmp_path / "kit" / "dp_state.json"
    a = SiteBudget(path)
    a.reserve(ANY_JOB, b"\x01" * 16, offer, policy)
    a.reserve(ANY_JOB, b"\x01" * 16, offer, policy)  # a reconnect: counted once
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    rho5 = a.settle(ANY_JOB, b"\x01" * 16, offer, 5)
    assert rho5 <= worst_rho(offer)
    b = SiteBudget(path)  # another process, later
    assert [r["contributors"] for r in b.rounds()] == [5]
    b.reserve(ANY_JOB, b"\x02" * 16, offer, policy)
    with pytest.raises(SiteBudgetExhausted, match=r"> its policy's 3") as info:
        b.reserve(ANY_JOB, b"\x03" * 16, offer, policy)
    assert exit_code_for(info.value) == 9
    assert len(SiteBudget(path).rounds()) == 2  # the refused round was not recorded
    few = DPPolicy(max_epsilon=100.0, delta=DELTA, max_rounds=2, max_clip=CLIP)
    with pytest.raises(SiteBudgetExhausted, match="max_rounds 2"):
        b.reserve(ANY_JOB, b"\x03" * 16, offer, few)
    path.write_text("{not json")
    with pytest.raises(ConfigurationError, match="malformed"):
        SiteBudget(path).rounds()


def test_sites_refuse_a_server_that_opens_more_dp_rounds_than_announced(
    deployment: Deployment,
) -> None:
    """Attack: every offer says ``rounds = 1`` at epsilon 3, and each is checked alone by
    :func:`secagg.dp.policy.check_offer` (it passes), but the server opens a second DP
    round (under a fresh job name, so its own ledger does not stop it). The sites' own
    ledgers refuse the second round before sending anything. Before the site-side budget
    every site joined it (the test failed: no SiteBudgetExhausted, the round completed)."""
    names = deployment.enroll(4, prefix="atk")
    dp = DPSpec(epsilon=EPS, delta=DELTA, rounds=1, clip=CLIP)
    policy = _policy(max_rounds=10)  # the offer's rounds are not what stops the attack
    clients = {n: deployment.client(n, policy=policy) for n in names}
    try:
        first = deployment.create(names, DIM, job="announced", dp=dp)
        out = run_threads(
            {n: (lambda c=c: c.aggregate(first, np.full(DIM, 0.1))) for n, c in clients.items()}
        )
        assert not {k: o.error for k, o in out.items() if o.error}
        second = deployment.create(names, DIM, job="unannounced", dp=dp)
        for c in clients.values():
            assert c.join(second).params.dp is not None  # the offer alone passes the policy
            with pytest.raises(SiteBudgetExhausted, match="would bring this site's epsilon"):
                c.aggregate(second, np.full(DIM, 0.1))
            assert len(c.dp_budget.rounds()) == 1
    finally:
        for c in clients.values():
            c.close()
    assert deployment.admin is not None
    st = deployment.admin.status(second)
    assert (
        not st.contributors and st.stage in ("advertise_keys", "AdvertiseKeys", "ADVERTISE_KEYS")
    ) or st.status != "completed"
    deployment.admin.abort(second, "test over")


# -- end to end: a DP job -----------------------------------------------------------------------


def _follow(d: Deployment, name: str, drop_in: int | None) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    x = np.linspace(-0.2, 0.2, DIM) * (1 + int(name[-1]) / 10)
    with d.client(name, policy=_policy(expected_job="dpjob")) as c:
        for rid in c.rounds("dpjob", timeout=60):
            if len(out) == drop_in:  # this site goes silent before its masked input
                joined = c.join(rid)
                got = c.participate(joined, x, on_send=silent_from(MaskedInput.TYPE))
                assert got is None
                out.append((rid, None))
                continue
            out.append((rid, c.aggregate(rid, x)))
        spent = c.dp_budget.rounds("dpjob")
    out.append(("ledger", spent))
    return out


def test_dp_job_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A DP job of 4 rounds whose budget covers 3 (epsilon 3, delta 1e-5, clip 1), five
    sites, one silent in round 1: every released mean is within the stated noise of the
    exact mean; ``secagg privacy --job`` prints 3 rows equal to the audit's ``dp_charge``
    entries; the 4th round is refused (the job finishes, the sites' iterators stop); each
    site's own ledger holds exactly the server's ``rho`` of the rounds it contributed to.

    Statistical bound: the released sum carries discrete-Gaussian noise of variance
    ``released_variance`` (integer units, ``1 / gamma`` each) and each site's randomized
    rounding adds at most ``1/4`` more per coordinate (counted as 1; the rotation is
    orthogonal), so per coordinate ``|mean - exact| <= 6 sqrt(released_variance + s) /
    (gamma s)``. False-alarm rate: ``P(|Z| > 6) = 2e-9`` per coordinate, ``< 1e-7`` over
    the 36 checked (noise from ``secrets``, not seeded).
    """
    d = Deployment(tmp_path / "secagg.db").start()
    try:
        names = d.enroll(5, prefix="s")
        assert d.admin is not None
        d.admin.create_job(
            JobSpec(
                name="dpjob",
                participants=names,
                dim=DIM,
                rounds=4,
                deadlines=StageTimeouts.uniform(20.0),
                dp=DPSpec(epsilon=EPS, delta=DELTA, rounds=3, clip=CLIP),
            )
        )
        out = run_threads({n: (lambda n=n: _follow(d, n, 1 if n == "s5" else None)) for n in names})
        errors = {k: repr(o.error) for k, o in out.items() if o.error}
        assert not errors, errors
        done = d.admin.wait_job("dpjob", timeout=30)
        assert (done.status, done.rounds_completed) == ("finished", 3)
        assert done.reason.startswith(BUDGET_EXHAUSTED)
        charges = [e for e in d.store.audit_entries() if e.kind == AUDIT_CHARGE]
        ledger_rows = JobLedger(d.store, "dpjob").rows
    finally:
        d.stop()
    assert len(charges) == 3 and [c.data["contributor_count"] for c in charges] == [5, 4, 5]
    assert [c.data for c in charges] == [r.as_dict() for r in ledger_rows]
    # The released means, against the exact mean of the contributors' inputs.
    xs = {n: np.linspace(-0.2, 0.2, DIM) * (1 + int(n[-1]) / 10) for n in names}
    for index, row in enumerate(ledger_rows):
        contributors = [n for n in names if not (n == "s5" and index == 1)]
        exact = np.mean([xs[n] for n in contributors], axis=0)
        means = {n: out[n].result[index][1].mean for n in contributors}
        first = means[contributors[0]]
        assert all(np.array_equal(m, first) for m in means.values())  # one release
        # noise plus rounding (variance <= 1/4 per site and coordinate; counted as 1)
        sd = math.sqrt(row.released_variance + row.contributor_count) / (
            row.gamma * row.contributor_count
        )
        bound = 6 * sd
        assert np.max(np.abs(first - exact)) <= bound, (index, first - exact, bound)
    # Each site's own ledger: the server's rho for the rounds it contributed to, its worst
    # case for the round it went silent in.
    for n in names:
        spent = out[n].result[-1][1]
        assert len(spent) == 3
        for index, entry in enumerate(spent):
            if n == "s5" and index == 1:
                assert entry["contributors"] == 0 and entry["rho"] >= ledger_rows[1].rho
            else:
                assert entry["rho"] == ledger_rows[index].rho
    # secagg privacy --job: 3 rows equal to the audit entries.
    capsys.readouterr()
    assert (
        cli.main(["privacy", "--job", "dpjob", "--store", str(tmp_path / "secagg.db"), "--json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["rounds"] == [c.data for c in charges]
    assert cli.main(["privacy", "--job", "dpjob", "--store", str(tmp_path / "secagg.db")]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 + 3 and all(
        r.round_id in t for r, t in zip(ledger_rows, table[2:], strict=True)
    )


def test_standalone_dp_rounds_use_the_ledger_of_their_job_name(deployment: Deployment) -> None:
    """``round create --job NAME --dp-*`` without a job: the ledger of NAME admits, charges
    and then refuses (BudgetExhausted, exit 9) the round past the budget."""
    names = deployment.enroll(4, prefix="sa")
    dp = DPSpec(epsilon=EPS, delta=DELTA, rounds=1, clip=CLIP)
    rid = deployment.create(names, DIM, job="solo", dp=dp)
    out = run_threads(
        {
            n: (lambda n=n: deployment.client(n, policy=_policy(max_rounds=1)).aggregate(
                rid, np.full(DIM, 0.05)))
            for n in names
        }
    )  # fmt: skip
    assert not {k: o.error for k, o in out.items() if o.error}
    assert deployment.admin is not None
    assert deployment.admin.wait(rid).status == "completed"
    ledger = JobLedger(deployment.store, "solo")
    for _ in range(50):
        if ledger.rows:
            break
        import time

        time.sleep(0.1)
    assert [r.contributor_count for r in ledger.rows] == [4]
    with pytest.raises(Exception, match="budget") as info:
        deployment.create(names, DIM, job="solo", dp=dp)
    assert exit_code_for(info.value) == 9, type(info.value)


def test_keygen_ckks_for_a_hybrid_dp_round(deployment: Deployment, tmp_path: Path) -> None:
    """``keygen --ckks --dp-*`` makes the contexts for the DP shape of a hybrid round (d'
    lanes of the offer's bits, unweighted): the server opens the round with that context and
    a context made without DP is refused for a DP round. Before, keygen knew only the plain
    shape and the server refused every context for a hybrid DP round."""
    out = tmp_path / "fed"
    dp_flags = ["--dp-epsilon", str(EPS), "--dp-rounds", "3", "--dp-clip", str(CLIP)]
    made = run_cli(
        ["keygen", "--ckks", "--out", str(out), "--mode", "hybrid", "--clients", "4",
         "--dim", str(DIM), *dp_flags],
        cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    shape = json.loads((tmp_path / "fed.ckks-params.json").read_text())
    assert shape["dp"]["epsilon"] == EPS and shape["max_weight"] == 1
    names = deployment.enroll(4, prefix="hy")
    dp = DPSpec(epsilon=EPS, delta=DELTA, rounds=3, clip=CLIP)
    server_ctx = (tmp_path / "fed.ckks-server").read_bytes()
    rid = deployment.create(names, DIM, job="hy", mode="hybrid", he_context=server_ctx, dp=dp)
    assert deployment.admin is not None
    st = deployment.admin.status(rid)
    assert st.status == "running" and st.mode == "hybrid"  # the server took the context
    deployment.admin.abort(rid, "test over")  # a full hybrid DP round: docs/dp.md (22 s here)
    with pytest.raises(Exception, match="made without DP"):
        plain = tmp_path / "plain"
        run_cli(["keygen", "--ckks", "--out", str(plain), "--clients", "4", "--dim", str(DIM)],
                cwd=tmp_path)  # fmt: skip
        from types import SimpleNamespace

        ns = SimpleNamespace(
            he_context=str(tmp_path / "plain.ckks-server"), mode="hybrid", bits=None,
            max_weight=None, threshold="auto", dp=None, dp_epsilon=EPS, dp_delta=None,
            dp_rounds=3, dp_clip=None, dp_max_withholders=None, clip=CLIP,
        )  # fmt: skip
        cli._he_shape(ns, 4, DIM)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="made with DP and the round has none"):
        from types import SimpleNamespace

        ns = SimpleNamespace(
            he_context=str(tmp_path / "fed.ckks-server"), mode="hybrid", bits=None,
            max_weight=None, threshold="auto", dp=None, dp_epsilon=None, dp_delta=None,
            dp_rounds=None, dp_clip=None, dp_max_withholders=None, clip=CLIP,
        )  # fmt: skip
        cli._he_shape(ns, 4, DIM)  # type: ignore[arg-type]
