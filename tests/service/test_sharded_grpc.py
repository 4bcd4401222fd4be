"""Sharded rounds over real gRPC (loopback, port 0, SQLite): the server is the front door.

docs/sharding.md, "Over gRPC". Each test is one sharded round of 12 clients in 3 groups.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from secagg import groups as gr
from secagg.errors import MalformedMessage, RoundAborted, ServerMisbehaviour
from secagg.messages import SEND_ORDER, MaskedInput, Message
from secagg.server import StageTimeouts
from secagg.service import sharded
from secagg.service.client import Policy
from secagg.service.errors import PolicyRefused
from secagg.service.sharded import ShardedRunner
from secagg.service.store import Member

from .helpers import Deployment, expected_sums, run_threads

N, G, DIM = 12, 3, 6


@pytest.fixture
def d(deployment: Deployment) -> Deployment:
    """The running server of tests/service/conftest.py, by the short name used here."""
    return deployment


def _front(d: Deployment, rid: bytes) -> ShardedRunner:
    assert d.server is not None and d.server.service is not None
    runner = d.server.service.coordinator.runner(rid)
    assert isinstance(runner, ShardedRunner)
    return runner


def _run(
    d: Deployment,
    names: list[str],
    rid: bytes,
    xs: dict[int, np.ndarray[Any, Any]],
    keys: dict[int, bytes],
    *,
    policy: Policy | None = None,
    hook: Callable[[int], Callable[[Message], bool] | None] = lambda cid: None,
) -> dict[int, Any]:
    def job(cid: int, name: str) -> Callable[[], Any]:
        def go() -> Any:
            with d.client(name, policy=policy) as c:
                joined = c.join(rid)
                assert joined.groups == G and joined.client_id == cid
                return c.participate(joined, xs[cid], 1, rounding_key=keys[cid], on_send=hook(cid))

        return go

    out = run_threads({str(i): job(i, n) for i, n in enumerate(names, start=1)})
    return {int(k): v for k, v in out.items()}


def _inputs() -> tuple[dict[int, np.ndarray[Any, Any]], dict[int, bytes]]:
    rng = np.random.default_rng(7)  # test data, no secrets
    xs = {c: rng.uniform(-1, 1, DIM) for c in range(1, N + 1)}
    return xs, {c: secrets.token_bytes(32) for c in xs}


def _audit(d: Deployment, rid: bytes) -> dict[str, dict[str, Any]]:
    d.store.verify_audit()  # the chain verifies (secagg audit)
    return {e.kind: json.loads(e.body) for e in d.store.audit_entries(rid.hex())}


def test_sharded_round_over_grpc_is_exact_and_audited(d: Deployment) -> None:
    names = d.enroll(N)
    rid = d.create(names, DIM, groups=G)
    xs, keys = _inputs()
    out = _run(d, names, rid, xs, keys)
    errors = {c: o.error for c, o in out.items() if o.error is not None}
    assert not errors
    front = _front(d, rid)
    joined = front.params
    want = expected_sums(_J(joined), xs, keys, range(1, N + 1))
    for o in out.values():
        assert o.result.contributors == tuple(range(1, N + 1))
        assert np.array_equal(o.result.sums, want)  # exact: the group sums add as integers
    asg = front.front.assignment
    assert asg is not None and sorted(len(g) for g in asg.groups) == [4, 4, 4]
    log = _audit(d, rid)
    assert log["group_assignment"]["assignment_seed"] == asg.seed.hex()
    assert len(log["group_assignment"]["group_rounds"]) == G
    done = log["round_completed"] if "round_completed" in log else log["round_finished"]
    sh = done["sharded"]
    assert sh["partial"] is False and sh["transcript_sha256"]
    assert [r["status"] for r in sh["group_status"]] == ["completed"] * G
    for g in range(G):  # every group round is in the log too
        assert d.store.round(gr.group_round_id(asg.seed, g)) is not None


class _J:
    """What :func:`expected_sums` reads of a joined round."""

    def __init__(self, params: Any) -> None:
        self.params = params


def _dropping(
    d: Deployment, rid: bytes, victims: int
) -> Callable[[int], Callable[[Message], bool]]:
    """Members of group 0 go silent at MaskedInput (``victims`` of them): group 0 ends
    below its threshold and aborts."""

    def hook(cid: int) -> Callable[[Message], bool]:
        def on_send(m: Message) -> bool:
            asg = _front(d, rid).front.assignment
            assert asg is not None
            doomed = asg.groups[0][:victims]
            return not (cid in doomed and SEND_ORDER[m.TYPE] >= SEND_ORDER[MaskedInput.TYPE])

        return on_send

    return hook


@pytest.mark.parametrize("policy", ["publish", "abort"])
def test_group_below_threshold_aborts_and_the_job_policy_decides(
    d: Deployment, policy: str
) -> None:
    names = d.enroll(N)
    rid = d.create(names, DIM, groups=G, on_group_abort=policy)
    xs, keys = _inputs()
    out = _run(d, names, rid, xs, keys, hook=_dropping(d, rid, 2))
    asg = _front(d, rid).front.assignment
    assert asg is not None
    g0 = set(asg.groups[0])
    rest = [c for c in range(1, N + 1) if c not in g0]
    for c in g0:  # the dropped ones went silent; the others saw their group abort
        assert out[c].result is None
    log = _audit(d, rid)
    done = log.get("round_completed") or log.get("round_finished") or log["round_aborted"]
    rows = done["sharded"]["group_status"]
    assert rows[0]["status"] == "aborted" and "reason" in rows[0]
    assert [r["status"] for r in rows[1:]] == ["completed"] * (G - 1)
    if policy == "publish":
        want = expected_sums(_J(_front(d, rid).params), xs, keys, rest)
        for c in rest:
            assert out[c].error is None, out[c].error
            assert out[c].result.contributors == tuple(rest)
            assert np.array_equal(out[c].result.sums, want)  # exactly the surviving groups
        assert done["sharded"]["partial"] is True
        assert d.store.round(rid).status == "completed"  # type: ignore[union-attr]
    else:
        for c in rest:
            assert isinstance(out[c].error, RoundAborted), out[c].error
        assert d.store.round(rid).status == "aborted"  # type: ignore[union-attr]
        assert "policy aborts" in done["reason"]


def test_group_worker_lost_mid_round_is_recorded_and_the_rest_published(d: Deployment) -> None:
    """The in-process engine's fault path: group 1's round is ended mid-round (its
    aggregator lost) while its clients are in MaskedInput; the round publishes the other
    groups' sum and records group 1 as aborted with the reason."""
    names = d.enroll(N)
    rid = d.create(names, DIM, groups=G)
    xs, keys = _inputs()
    killed: list[bool] = []

    def hook(cid: int) -> Callable[[Message], bool]:
        def on_send(m: Message) -> bool:
            front = _front(d, rid)
            asg = front.front.assignment
            assert asg is not None
            if cid == asg.groups[1][0] and isinstance(m, MaskedInput) and not killed:
                killed.append(True)
                runner = front.group_runners[1]
                assert d.server is not None and d.server._loop is not None
                asyncio.run_coroutine_threadsafe(
                    runner.abort("aggregator worker lost (fault drill)"), d.server._loop
                ).result()
            return True

        return on_send

    out = _run(d, names, rid, xs, keys, hook=hook)
    asg = _front(d, rid).front.assignment
    assert asg is not None and killed
    rest = [c for c in range(1, N + 1) if c not in asg.groups[1]]
    for c in rest:
        assert out[c].error is None, out[c].error
    log = _audit(d, rid)
    done = log.get("round_completed") or log["round_finished"]
    row = done["sharded"]["group_status"][1]
    assert row["status"] == "aborted" and "worker lost" in row["reason"]
    assert done["sharded"]["partial"] is True


def test_wrong_member_list_from_the_front_door_is_refused(
    d: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: the front door seats group 0's round with a member of group 1 swapped in
    (a client it controls, say). Every honest member of group 0 refuses before sending any
    key (check_group_invite); without the check they ran the rigged group round."""
    real = sharded._open_group

    async def rigged(coord: Any, runner: Any, spec: Any, g: int, params: Any, ms: Any) -> Any:
        if g == 0:
            first_of_1 = runner.front.assignment.groups[1][0]
            other: Member = next(m for m in runner.members if m.client_id == first_of_1)
            ms = [*ms[:-1], other]
        return await real(coord, runner, spec, g, params, ms)

    monkeypatch.setattr(sharded, "_open_group", rigged)
    names = d.enroll(N)
    rid = d.create(names, DIM, groups=G, deadlines=StageTimeouts.uniform(3.0))
    xs, keys = _inputs()
    out = _run(d, names, rid, xs, keys)
    asg = _front(d, rid).front.assignment
    assert asg is not None
    for c in asg.groups[0][:-1]:
        err = out[c].error
        assert isinstance(err, ServerMisbehaviour), err
        assert "differs from the assignment" in str(err)


def test_group_below_min_contributors_is_refused_by_the_client(d: Deployment) -> None:
    """Attack: the front door cuts the clients into groups of 4 while each client's policy
    needs 5 contributors in any sum. Each client refuses its group round before sending
    anything (its policy on the group round's GetRound; check_group_invite's check_params
    and check_set behind it), though the 12-client front door passes its policy; with
    those checks removed they ran groups of 4 (the test failed)."""
    names = d.enroll(N)
    rid = d.create(names, DIM, groups=G, deadlines=StageTimeouts.uniform(3.0))
    xs, keys = _inputs()
    out = _run(d, names, rid, xs, keys, policy=Policy(min_contributors=5))
    for o in out.values():
        assert isinstance(o.error, PolicyRefused), o.error
        assert "n=4" in str(o.error) or "min_contributors=5" in str(o.error)


def test_group_results_encoding_round_trips_and_refuses_garbage() -> None:
    rows = (gr.GroupRow(0, 4, 4, True), gr.GroupRow(1, 4, 0, False, "stage masked_input: x"))
    msg = gr.GroupResults(b"\x01" * 16, True, "", "", (1, 2, 3), 3, b"\x00" * 16, rows)
    assert gr.GroupResults.decode(msg.encode()) == msg
    with pytest.raises(MalformedMessage):
        gr.GroupResults.decode(msg.encode()[:-1])
    with pytest.raises(MalformedMessage):
        gr.GroupResults.decode(msg.encode() + b"\x00")


def test_sharded_job_spec_round_trips_through_the_store_and_the_wire() -> None:
    from secagg.service.coordinator import JobSpec
    from secagg.service.serde import job_spec_from_proto, job_spec_to_proto

    spec = JobSpec(name="j", participants=["a", "b"], dim=3, groups=4, on_group_abort="abort")
    back = JobSpec.from_json(spec.to_json())
    assert (back.groups, back.on_group_abort) == (4, "abort")
    wire = job_spec_from_proto(job_spec_to_proto(spec), StageTimeouts())
    assert (wire.groups, wire.on_group_abort) == (4, "abort")
    assert wire.round_spec().groups == 4
    assert "groups" not in JobSpec(name="k", participants=["a"], dim=1).to_json()


def test_cli_round_create_groups_and_refusals(
    d: Deployment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``round create --groups G --on-group-abort``: a front-door round (abortable, in the
    audit log); a non-masked mode and too few participants per group refused by the
    server (the CLI's remote-refusal exit status 1, the typed error named)."""
    from secagg.service.cli import main

    from .helpers import TOKEN

    monkeypatch.setenv("SECAGG_ADMIN_TOKEN", TOKEN)
    names = ",".join(d.enroll(6))
    base = ["round", "create", "--job", "cj", "--participants", names, "--dim", "4"]
    remote = ["--server", d.target]
    capsys.readouterr()
    assert main([*base, "--groups", "2", "--on-group-abort", "abort", *remote]) == 0
    rid = json.loads(capsys.readouterr().out)["round_id"]
    assert _front(d, bytes.fromhex(rid)).groups == 2
    assert main(["round", "abort", rid, "--reason", "test", *remote]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "aborted"
    assert main([*base, "--groups", "3", "--job", "cj2", *remote]) == 1  # groups of 2
    assert "cannot form 3 groups of at least 3" in capsys.readouterr().err
    assert main([*base, "--groups", "2", "--mode", "plaintext", "--job", "cj3", *remote]) == 1
    assert "UnsupportedShardedMode" in capsys.readouterr().err
    entries = [e.kind for e in d.store.audit_entries(rid)]
    assert entries == ["round_created", "round_abort_requested", "round_aborted"]
    d.store.verify_audit()


def test_front_door_core_treats_a_resent_message_as_a_duplicate() -> None:
    """A client that reconnects resends its unacknowledged join message: the front door
    answers "duplicate" (as a round does) instead of dropping it for joining twice."""
    from secagg.errors import DuplicateMessage
    from secagg.keys import IdentityKey
    from secagg.params import make_params

    keys = {c: IdentityKey() for c in range(1, 7)}
    directory = {c: k.public for c, k in keys.items()}
    params = make_params(6, 2)
    core = sharded.FrontDoorCore(
        params, directory, 2, on_group_abort="publish", min_group=3, timeout=5.0, now=0.0
    )
    joiner = gr.GroupJoinClient(1, keys[1], params.round_id, 2, directory)
    assert core.receive(1, joiner.start(), 0.1) == []
    with pytest.raises(DuplicateMessage):
        core.receive(1, joiner.start(), 0.2)
    assert core.records[1].active


def test_published_sum_without_the_clients_group_as_run_is_refused(
    d: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: the front door publishes a total that leaves out one member of group 0
    (contributors, total weight and group 0's survivor count rewritten to match). Every
    client of group 0
    knows how its group round ended and refuses the sum; without the check in
    ``FrontDoorClient._finish`` they returned it (the test failed)."""
    real = sharded.FrontDoorCore._broadcast

    def rigged(self: sharded.FrontDoorCore, msg: gr.GroupResults) -> list[tuple[int, Any]]:
        asg = self.assignment
        if msg.completed and asg is not None:
            gone = asg.groups[0][-1]
            rows = tuple(
                gr.GroupRow(r.group, r.size, r.survivors - (r.group == 0), r.completed, r.reason)
                for r in msg.rows
            )
            msg = gr.GroupResults(
                msg.round_id, True, "", "", tuple(c for c in msg.contributors if c != gone),
                msg.total_weight - 1, msg.sums, rows,
            )  # fmt: skip
        return real(self, msg)

    monkeypatch.setattr(sharded.FrontDoorCore, "_broadcast", rigged)
    names = d.enroll(N)
    rid = d.create(names, DIM, groups=G)
    xs, keys = _inputs()
    out = _run(d, names, rid, xs, keys)
    asg = _front(d, rid).front.assignment
    assert asg is not None
    for c in asg.groups[0]:
        err = out[c].error
        assert isinstance(err, ServerMisbehaviour), err
        assert "this client's group as run" in str(err)


def test_sharded_job_runs_its_rounds_with_weights(d: Deployment) -> None:
    """``job create --groups``: two weighted sharded rounds of 9 sites in 3 groups, each
    site following the job with ``client.rounds`` and ``aggregate`` unchanged."""
    from secagg.service.coordinator import JobSpec

    names = d.enroll(9)
    assert d.admin is not None
    d.admin.create_job(
        JobSpec(name="sj", participants=names, dim=DIM, rounds=2, groups=3,
                deadlines=StageTimeouts.uniform(10.0))
    )  # fmt: skip

    def follow(site: int, name: str) -> list[tuple[float, int]]:
        got = []
        with d.client(name) as c:
            for round_id in c.rounds("sj", timeout=60):
                agg = c.aggregate(round_id, np.full(DIM, 0.25 * site), weight=site)
                got.append((float(agg.mean[0]), agg.total_weight))
        return got

    out = run_threads({n: (lambda s=s, n=n: follow(s, n)) for s, n in enumerate(names, 1)})
    assert not {k: o.error for k, o in out.items() if o.error}
    want = sum(s * 0.25 * s for s in range(1, 10)) / sum(range(1, 10))
    for o in out.values():
        assert len(o.result) == 2
        for mean, weight in o.result:
            assert abs(mean - want) < 1e-3 and weight == sum(range(1, 10))
    done = d.admin.wait_job("sj", timeout=30)
    assert (done.status, done.rounds_completed) == ("finished", 2)
