"""Jobs over real gRPC on loopback: the server opens each round, sites discover them.

A job fixes participants and round shape and runs its rounds one after another without an
operator creating each; sites follow it with ``Client.rounds(job)``. Before issue 12 item 2
a job had one running round, its deadlines started at creation and sites could not
discover rounds: an operator created every round and handed its id to each site by hand.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secagg.errors import RoundAborted, ServerMisbehaviour
from secagg.server import StageTimeouts
from secagg.service._gen import aggregation_pb2
from secagg.service.coordinator import JobSpec
from secagg.service.errors import (
    AlreadyExists,
    JobAborted,
    JobTimeout,
    NotFound,
    PermissionDenied,
    PolicyRefused,
)

from .helpers import Deployment, run_threads

DIM = 12


def _value(site: int, index: int) -> float:
    return 0.125 * site + 0.5 * index


def _follow(d: Deployment, name: str, job: str, site: int) -> list[tuple[str, float, int]]:
    """What a site runs: the README loop, one aggregate per round of the job."""
    out = []
    with d.client(name) as client:
        for round_id in client.rounds(job, timeout=60):
            index = len(out)
            agg = client.aggregate(round_id, np.full(DIM, _value(site, index)), weight=site)
            out.append((round_id, float(agg.mean[0]), agg.total_weight))
    return out


def _wait_open(d: Deployment, job: str, index: int, timeout: float = 30.0) -> bytes:
    """The id of the job's open round once it is round ``index``."""
    assert d.admin is not None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = d.admin.job(job)
        if st.current_round and st.next_index == index + 1:
            return bytes(st.current_round)
        time.sleep(0.05)
    raise AssertionError(f"round {index} of {job} did not open")


def test_job_runs_every_round_without_an_operator(deployment: Deployment) -> None:
    """Three rounds, four sites: every round opens by itself, each site gets each round id
    from ``client.rounds(job)`` and the weighted mean is right in every round."""
    names = deployment.enroll(4)
    assert deployment.admin is not None
    st = deployment.admin.create_job(
        JobSpec(
            name="fed",
            participants=names,
            dim=DIM,
            rounds=3,
            deadlines=StageTimeouts.uniform(20.0),
        )
    )
    assert st.status == "running" and st.rounds_total == 3 and st.created_by == "admin-token"
    out = run_threads(
        {
            n: (lambda n=n, i=i: _follow(deployment, n, "fed", i))
            for i, n in enumerate(names, start=1)
        }
    )
    errors = {k: o.error for k, o in out.items() if o.error}
    assert not errors, errors
    weights = range(1, 5)
    for index in range(3):
        want = sum(w * _value(w, index) for w in weights) / sum(weights)
        seen = {o.result[index][0] for o in out.values()}
        assert len(seen) == 1  # every site got the same round
        for o in out.values():
            assert abs(o.result[index][1] - want) < 1e-3
            assert o.result[index][2] == sum(weights)
    done = deployment.admin.wait_job("fed", timeout=30)
    assert (done.status, done.rounds_done, done.rounds_completed) == ("finished", 3, 3)
    rounds = deployment.admin.rounds("fed")
    assert [(r.job_index, r.in_job, r.status) for r in rounds] == [
        (i, True, "completed") for i in range(3)
    ]
    assert [r.round_id.hex() for r in rounds] == [x[0] for x in out[names[0]].result]
    assert all(r.opened_at > 0 and r.finished_at >= r.opened_at for r in rounds)
    kinds = [e.kind for e in deployment.store.audit_entries()]
    assert kinds.count("round_created") == 3 and kinds[-1] == "job_finished"
    created = [e for e in deployment.store.audit_entries() if e.kind == "job_created"]
    assert created[0].data["operator"] == "admin-token"
    assert [
        e.data["job_index"] for e in deployment.store.audit_entries() if e.kind == "round_created"
    ] == [0, 1, 2]


def test_deadlines_count_from_the_opening(deployment: Deployment) -> None:
    """Round 1 opens 4 s after round 0 with 3 s stage deadlines: counted from the job's
    creation its first deadline would have passed before it opened (it would abort at
    once); counted from its opening it completes."""
    names = deployment.enroll(3)
    assert deployment.admin is not None
    deployment.admin.create_job(
        JobSpec(
            name="gap",
            participants=names,
            dim=DIM,
            rounds=2,
            every=4.0,
            deadlines=StageTimeouts.uniform(3.0),
        )
    )
    out = run_threads(
        {
            n: (lambda n=n, i=i: _follow(deployment, n, "gap", i))
            for i, n in enumerate(names, start=1)
        }
    )
    assert not {k: o.error for k, o in out.items() if o.error}
    done = deployment.admin.wait_job("gap", timeout=30)
    assert (done.status, done.rounds_completed) == ("finished", 2)
    r0, r1 = deployment.admin.rounds("gap")
    assert r1.opened_at - r0.opened_at >= 4.0 - 0.05  # on schedule: every 4 s


def test_a_late_site_gets_the_open_round_first(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    assert deployment.admin is not None
    deployment.admin.create_job(
        JobSpec(name="late", participants=names, dim=DIM, deadlines=StageTimeouts.uniform(20.0))
    )
    open_round = _wait_open(deployment, "late", 0)
    with deployment.client(names[0]) as client:
        assert next(client.rounds("late", timeout=10)) == open_round.hex()
    deployment.admin.abort_job("late", "test over")


def test_a_restarted_server_resumes_the_job(tmp_path: Path) -> None:
    """The server dies while round 0 runs: the restarted one aborts round 0 (as any
    interrupted round) and opens round 1, which the sites then complete."""
    d = Deployment(tmp_path / "secagg.db").start()
    try:
        names = d.enroll(3)
        assert d.admin is not None
        d.admin.create_job(
            JobSpec(
                name="long",
                participants=names,
                dim=DIM,
                rounds=2,
                deadlines=StageTimeouts.uniform(20.0),
            )
        )
        first = _wait_open(d, "long", 0)
        assert d.server is not None
        d.server.crash()
        d.admin.close()
        d.start()
        out = run_threads(
            {n: (lambda n=n, i=i: _follow(d, n, "long", i)) for i, n in enumerate(names, start=1)}
        )
        assert not {k: o.error for k, o in out.items() if o.error}
        done = d.admin.wait_job("long", timeout=30)
        assert (done.status, done.rounds_done) == ("finished", 2)
        assert (done.rounds_completed, done.rounds_aborted) == (1, 1)
        r0, r1 = d.admin.rounds("long")
        assert r0.round_id == first and r0.status == "aborted" and "restarted" in r0.abort_reason
        assert (r1.job_index, r1.status) == (1, "completed")
        assert all(len(o.result) == 1 and o.result[0][0] == r1.round_id.hex() for o in out.values())
    finally:
        d.stop()


def test_aborting_a_job_stops_the_sites_iterators(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    assert deployment.admin is not None
    deployment.admin.create_job(
        JobSpec(name="stop", participants=names, dim=DIM, deadlines=StageTimeouts.uniform(20.0))
    )

    def site(name: str) -> Any:
        with deployment.client(name) as client:
            it = client.rounds("stop", timeout=30)
            first = next(it)
            with pytest.raises(RoundAborted):
                client.aggregate(first, np.zeros(DIM))  # the round dies with its job
            with pytest.raises(JobAborted, match="budget exhausted"):
                next(it)
            with pytest.raises(JobAborted):  # a new iterator learns it at once
                next(client.rounds("stop"))
            return first

    from threading import Thread

    results: dict[str, Any] = {}
    threads = [Thread(target=lambda n=n: results.__setitem__(n, site(n))) for n in names[:2]]
    for t in threads:
        t.start()
    open_round = _wait_open(deployment, "stop", 0)
    time.sleep(0.5)  # let the two sites join the round
    st = deployment.admin.abort_job("stop", "budget exhausted")
    for t in threads:
        t.join(30)
    assert results == {n: open_round.hex() for n in names[:2]}
    assert st.status == "aborted" and st.reason == "budget exhausted"
    round0 = deployment.admin.status(open_round)
    assert round0.status == "aborted" and "budget exhausted" in round0.abort_reason
    entry = next(e for e in deployment.store.audit_entries() if e.kind == "job_aborted")
    assert entry.data == {"job": "stop", "reason": "budget exhausted", "operator": "admin-token"}
    assert deployment.admin.abort_job("stop", "again").reason == "budget exhausted"  # as it was


def test_only_participants_see_a_jobs_rounds(deployment: Deployment) -> None:
    names = deployment.enroll(4)
    assert deployment.admin is not None
    deployment.admin.create_job(
        JobSpec(name="club", participants=names[:3], dim=DIM, deadlines=StageTimeouts.uniform(20.0))
    )
    _wait_open(deployment, "club", 0)
    with deployment.client(names[3]) as outsider:
        with pytest.raises(PermissionDenied, match="not in job 'club'"):
            next(outsider.rounds("club"))
        with pytest.raises(NotFound, match="no job 'nope'"):
            next(outsider.rounds("nope"))
    deployment.admin.abort_job("club")


def test_job_names_and_round_labels_do_not_clash(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    assert deployment.admin is not None
    spec = JobSpec(
        name="fed", participants=names, dim=DIM, rounds=1, deadlines=StageTimeouts.uniform(20.0)
    )
    deployment.admin.create_job(spec)
    with pytest.raises(AlreadyExists, match="never reused"):
        deployment.admin.create_job(spec)
    with pytest.raises(AlreadyExists, match="is a job"):
        deployment.create(names, DIM, job="fed")  # CreateRound may not slip a round in
    with pytest.raises(NotFound):
        deployment.admin.job("missing")
    deployment.admin.abort_job("fed")
    assert [j.name for j in deployment.admin.jobs()] == ["fed"]


def test_a_timeout_ends_the_wait_for_the_next_round(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    assert deployment.admin is not None
    deployment.admin.create_job(
        JobSpec(
            name="slow",
            participants=names,
            dim=DIM,
            every=3600.0,
            rounds=2,
            deadlines=StageTimeouts.uniform(20.0),
        )
    )
    first = _wait_open(deployment, "slow", 0)
    deployment.admin.abort(first, "skip it")  # round 0 ends; round 1 is an hour away
    with deployment.client(names[0]) as client:
        it = client.rounds("slow", timeout=1.0)
        with pytest.raises(JobTimeout, match="within 1 s"):
            next(it)
    deployment.admin.abort_job("slow")


def _lying_watch(events: list[aggregation_pb2.JobEvent]) -> Any:
    async def watch(name: str, participant: str) -> AsyncIterator[aggregation_pb2.JobEvent]:
        for ev in events:
            yield ev

    return watch


@pytest.mark.parametrize(
    ("events", "match"),
    [
        ([aggregation_pb2.JobEvent(job="other", kind="round", round_id=bytes(16))], "job 'other'"),
        ([aggregation_pb2.JobEvent(job="fed", kind="round", round_id=b"short")], "5 bytes"),
        ([aggregation_pb2.JobEvent(job="fed", kind="bogus")], "unknown event"),
        (
            [
                aggregation_pb2.JobEvent(job="fed", kind="round", round_id=b"a" * 16, index=3),
                aggregation_pb2.JobEvent(job="fed", kind="round", round_id=b"b" * 16, index=2),
            ],
            "round 2 announced after round 3",
        ),
        (
            [
                aggregation_pb2.JobEvent(job="fed", kind="round", round_id=b"a" * 16, index=3),
                aggregation_pb2.JobEvent(job="fed", kind="round", round_id=b"a" * 16, index=4),
            ],
            "now as round 4",
        ),
    ],
)
def test_sdk_checks_what_the_server_announces(
    deployment: Deployment, events: list[aggregation_pb2.JobEvent], match: str
) -> None:
    """A lying server announces rounds of another job, malformed ids, or rounds out of
    order (to replay an old round as new): the SDK refuses each instead of yielding it."""
    names = deployment.enroll(3)
    assert deployment.server is not None and deployment.server.service is not None
    deployment.server.service.coordinator.jobs.watch = _lying_watch(events)  # type: ignore[method-assign]
    with deployment.client(names[0]) as client, pytest.raises(ServerMisbehaviour, match=match):
        list(client.rounds("fed", timeout=10))


def test_sdk_refuses_a_round_announced_for_another_job(deployment: Deployment) -> None:
    """The server announces, on job "fed"'s stream, a real round of job "other" (one the
    site would join for that job's purpose): join refuses it, nothing is sent."""
    names = deployment.enroll(3)
    other = deployment.create(names, DIM, job="other")
    assert deployment.server is not None and deployment.server.service is not None
    deployment.server.service.coordinator.jobs.watch = _lying_watch(  # type: ignore[method-assign]
        [aggregation_pb2.JobEvent(job="fed", kind="round", round_id=other, index=0)]
    )
    with deployment.client(names[0]) as client:
        round_id = next(client.rounds("fed", timeout=10))
        assert round_id == other.hex()
        with pytest.raises(PolicyRefused, match="describes it as a round of job 'other'"):
            client.aggregate(round_id, np.zeros(DIM))
    assert deployment.admin is not None
    deployment.admin.abort(other)


def test_watching_sites_follow_the_job_across_a_restart(tmp_path: Path) -> None:
    """The sites' ``rounds`` streams break when the server dies; they reconnect to the
    restarted server (same address) and get the round it opened on resuming the job."""
    import socket
    import threading

    from secagg.service.admin import AdminClient
    from secagg.service.config import ServerConfig
    from secagg.service.server import BackgroundServer

    from .helpers import TOKEN

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServerConfig(listen=f"127.0.0.1:{port}", store=str(tmp_path / "s.db"), admin_token=TOKEN)
    d = Deployment(tmp_path / "s.db")
    d.server = BackgroundServer(cfg).start()
    d.admin = AdminClient(d.target, TOKEN)
    names = d.enroll(3)
    d.admin.create_job(
        JobSpec(name="on", participants=names, dim=DIM, rounds=2,
                deadlines=StageTimeouts.uniform(20.0))
    )  # fmt: skip
    first = _wait_open(d, "on", 0)
    watching = threading.Barrier(len(names) + 1, timeout=30)

    def site(name: str) -> list[str]:
        seen = []
        with d.client(name) as client:
            for round_id in client.rounds("on", timeout=60):
                seen.append(round_id)
                if len(seen) == 1:
                    watching.wait()  # round 0: sit it out while the server dies
                    continue
                client.aggregate(round_id, np.full(DIM, 0.5))
        return seen

    threads: dict[str, Any] = {}
    workers = [threading.Thread(target=lambda n=n: threads.__setitem__(n, site(n))) for n in names]
    for t in workers:
        t.start()
    try:
        watching.wait()
        d.server.crash()
        d.admin.close()
        d.server = BackgroundServer(cfg).start()  # same address, same store
        d.admin = AdminClient(d.target, TOKEN)
        for t in workers:
            t.join(60)
        second = bytes(d.admin.wait_job("on", timeout=30).current_round or b"")
        done = d.admin.job("on")
        assert (done.status, done.rounds_completed, done.rounds_aborted) == ("finished", 1, 1)
        r0, r1 = d.admin.rounds("on")
        assert r0.round_id == first and not second
        assert threads == {n: [first.hex(), r1.round_id.hex()] for n in names}
    finally:
        d.stop()


def test_a_rounds_first_deadline_counts_from_its_opening(deployment: Deployment) -> None:
    """The store write that records a round takes 2 s here (a slow disk): the first
    stage's deadline still lies a whole stage timeout after the round opened. Before, the
    core took its clock before the write, so the 2 s came off the first stage."""
    names = deployment.enroll(3)
    store = deployment.store
    slow = store.create_round

    def create_round(*args: Any, **kw: Any) -> None:
        time.sleep(2.0)
        slow(*args, **kw)

    store.create_round = create_round  # type: ignore[method-assign]
    try:
        rid = deployment.create(names, DIM, StageTimeouts.uniform(10.0))
    finally:
        store.create_round = slow  # type: ignore[method-assign]
    assert deployment.server is not None and deployment.server.service is not None
    runner = deployment.server.service.coordinator.runner(rid)
    deadline = runner.core.deadline
    assert deadline is not None
    # The runner is built right after the core, with no await between them.
    assert deadline > runner._started + 10.0 - 0.5
    assert deployment.admin is not None
    deployment.admin.abort(rid)


def test_watch_streams_are_bounded_and_signed_for_no_round(deployment: Deployment) -> None:
    """A site cannot hold more than 4 ``WatchRounds`` streams of one job (each costs the
    server a coroutine), and a call signed for a round is refused (it was signed for
    another purpose)."""
    import grpc

    from secagg.service._gen import aggregation_pb2_grpc
    from secagg.service.auth import call_metadata
    from secagg.service.servicer import MAX_WATCHES_PER_PARTICIPANT, WATCH_ROUNDS

    names = deployment.enroll(3)
    assert deployment.admin is not None
    deployment.admin.create_job(
        JobSpec(name="cap", participants=names, dim=DIM, deadlines=StageTimeouts.uniform(20.0))
    )
    _wait_open(deployment, "cap", 0)
    key = deployment.identities[names[0]]
    with grpc.insecure_channel(deployment.target) as channel:
        stub = aggregation_pb2_grpc.AggregationStub(channel)

        def watch(round_id: bytes = bytes(16)) -> Any:
            md = call_metadata(key, WATCH_ROUNDS, round_id)
            return stub.WatchRounds(aggregation_pb2.WatchRoundsRequest(job="cap"), metadata=md)

        calls = [watch() for _ in range(MAX_WATCHES_PER_PARTICIPANT)]
        for c in calls:
            assert next(c).kind == "round"  # each stream is open on the server
        with pytest.raises(grpc.RpcError) as err:
            next(watch())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for c in calls:
            c.cancel()
        with pytest.raises(grpc.RpcError) as err:
            next(watch(b"\x01" * 16))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    deployment.admin.abort_job("cap")


def test_rounds_gives_up_on_a_server_that_stays_away(deployment: Deployment) -> None:
    """Reconnects last ``connect_budget`` seconds of failures in a row, then one clear
    ``Unavailable`` (not an endless wait, not a ``JobTimeout`` that blames the job)."""
    from secagg.service.client import RetryPolicy
    from secagg.service.errors import Unavailable

    names = deployment.enroll(3)
    assert deployment.server is not None
    client = deployment.client(names[0], retry=RetryPolicy(connect_budget=1.0))
    deployment.server.stop()
    with client:
        with pytest.raises(Unavailable):
            next(client.rounds("fed"))
        with pytest.raises(Unavailable, match="stayed unreachable"):
            next(client.rounds("fed", timeout=0.5))
    deployment.server = None  # stopped already


def test_a_paused_job_opens_no_round_until_resumed(deployment: Deployment) -> None:
    """Pause while round 0 runs: round 0 ends as usual, round 1 opens only on resume;
    both actions are audited with their operator."""
    names = deployment.enroll(3)
    assert deployment.admin is not None
    deployment.admin.create_job(
        JobSpec(name="p", participants=names, dim=DIM, rounds=2,
                deadlines=StageTimeouts.uniform(20.0))
    )  # fmt: skip
    first = _wait_open(deployment, "p", 0)
    assert deployment.admin.pause_job("p").status == "paused"
    out = run_threads({n: (lambda n=n: participate_once(deployment, n, first)) for n in names})
    assert not {k: o.error for k, o in out.items() if o.error}
    st = deployment.admin.wait(first)
    assert st.status == "completed"
    job = deployment.admin.job("p")
    assert (job.status, job.rounds_done, job.next_index, job.current_round) == ("paused", 1, 1, b"")
    assert deployment.admin.resume_job("p").status == "running"
    second = _wait_open(deployment, "p", 1)
    assert second != first
    deployment.admin.abort_job("p", "enough")
    kinds = [(e.kind, e.data.get("operator")) for e in deployment.store.audit_entries()]
    assert ("job_paused", "admin-token") in kinds and ("job_resumed", "admin-token") in kinds
    with pytest.raises(AlreadyExists, match="is aborted"):
        deployment.admin.resume_job("p")


def participate_once(d: Deployment, name: str, round_id: bytes) -> Any:
    with d.client(name) as client:
        return client.aggregate(round_id, np.full(DIM, 0.5))
