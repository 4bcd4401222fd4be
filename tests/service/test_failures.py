"""Faulty and hostile clients: silence, crashes, bad bytes, replays, impersonation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import grpc
import numpy as np
import pytest

from secagg.client import SecAggClient
from secagg.keys import IdentityKey
from secagg.messages import AdvertiseKeys
from secagg.server import StageTimeouts
from secagg.service.auth import call_metadata
from secagg.service.client import Client, Policy, RetryPolicy
from secagg.service.errors import NotFound, PermissionDenied, Unauthenticated
from secagg.service.servicer import SESSION

from .helpers import Deployment, FlakyRelay, RawSession, participate, run_threads

FAST = StageTimeouts(
    advertise_keys=3.0, share_keys=3.0, masked_input=3.0, consistency=3.0, unmasking=3.0
)


def _advertise(d: Deployment, name: str, rid: bytes) -> tuple[AdvertiseKeys, Any]:
    joined = d.client(name).join(rid)
    core = SecAggClient(
        joined.client_id,
        d.identities[name],
        joined.params,
        joined.directory,
        np.zeros(joined.params.dim),
    )
    msg = core.start()[0]
    assert isinstance(msg, AdvertiseKeys)
    return msg, joined


def _status(d: Deployment, rid: bytes, timeout: float = 30.0) -> Any:
    assert d.admin is not None
    return d.admin.wait(rid, timeout=timeout)


def test_client_that_never_answers_is_dropped(deployment: Deployment) -> None:
    names = deployment.enroll(4)
    # t=3 of 4: clients refuse t=2 on the complete graph (2t <= k+1, split survivor views).
    rid = deployment.create(names, 1000, FAST, neighbors="all", threshold="3")
    out = run_threads(
        {n: (lambda n=n: participate(deployment, n, rid, np.ones(1000))) for n in names[:3]}
    )
    assert all(o.error is None for o in out.values())
    st = _status(deployment, rid)
    assert st.status == "completed" and list(st.contributors) == [1, 2, 3]
    (drop,) = st.dropouts
    assert (drop.client_id, drop.stage) == (4, "advertise_keys")
    assert "deadline" in drop.reason


CHILD = """
import sys, time
import numpy as np
from secagg.keys import IdentityKey
from secagg.service.client import Client, Policy
target, seed, rid = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])

def hang(msg):
    if msg.TYPE == 3:  # about to send the masked input: stall until killed
        print("stalled", flush=True)
        time.sleep(3600)
    return True

policy = Policy(trust_server_directory=True)  # this test is about the kill, not the directory
with Client(target, IdentityKey(seed), insecure_no_tls=True, policy=policy) as c:
    joined = c.join(rid)
    c.participate(joined, np.ones(joined.params.dim), on_send=hang)
"""


def test_client_process_killed_mid_round(deployment: Deployment) -> None:
    names = deployment.enroll(4)
    rid = deployment.create(
        names,
        1000,
        StageTimeouts(30.0, 5.0, 3.0, 3.0, 3.0),
        neighbors="all",
        threshold="3",
    )
    seed = deployment.identities[names[3]].private_bytes.hex()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, deployment.target, seed, rid.hex()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out = run_threads(
            {n: (lambda n=n: participate(deployment, n, rid, np.ones(1000))) for n in names[:3]}
            | {"kill": lambda: _kill_when_stalled(child)}
        )
    finally:
        child.kill()
        child.wait()
    assert all(o.error is None for o in out.values()), {k: o.error for k, o in out.items()}
    st = _status(deployment, rid)
    assert st.status == "completed" and list(st.contributors) == [1, 2, 3]
    assert [(d.client_id, d.stage) for d in st.dropouts] == [(4, "masked_input")]


def _kill_when_stalled(child: subprocess.Popen[str]) -> None:
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "stalled"
    os.kill(child.pid, signal.SIGKILL)


def test_unenrolled_not_invited_and_revoked_identities(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    rid = deployment.create(names[:2], 10, FAST)
    with (
        Client(deployment.target, IdentityKey(), insecure_no_tls=True) as stranger,
        pytest.raises(Unauthenticated, match="not enrolled"),
    ):
        stranger.join(rid)
    with pytest.raises(PermissionDenied, match="not invited"):
        deployment.client(names[2]).join(rid)
    with pytest.raises(NotFound):
        deployment.client(names[0]).join(bytes(16))
    assert deployment.admin is not None
    deployment.admin.revoke(names[1])
    with pytest.raises(PermissionDenied, match="revoked"):
        deployment.client(names[1]).join(rid)


def test_impersonation_refused(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    rid = deployment.create(names, 10, FAST)
    # Without c2's key, c1 cannot open c2's session: the call signature is c2's to make.
    md = dict(call_metadata(deployment.identities[names[0]], SESSION, rid))
    md["secagg-key"] = deployment.identities[names[1]].public.hex()
    raw = RawSession(deployment, names[1], rid, metadata=list(md.items()))
    with pytest.raises(grpc.RpcError) as err:
        raw.next_frame()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    raw.close()
    # On its own session, c1 sends a message claiming to come from c2: refused, c1 dropped.
    msg, _ = _advertise(deployment, names[1], rid)  # a genuine c2 message, replayed by c1
    raw = RawSession(deployment, names[0], rid)
    raw.send_message(0, msg.encode())
    with pytest.raises(grpc.RpcError) as err:
        raw.next_frame()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only send its own messages" in (err.value.details() or "")
    raw.close()
    assert deployment.admin is not None
    st = deployment.admin.status(rid)
    assert [d.client_id for d in st.dropouts] == [1]


def test_malformed_message_drops_the_sender(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    rid = deployment.create(names, 10, FAST)
    raw = RawSession(deployment, names[0], rid)
    raw.send_message(0, b"SAGG" + bytes(40))
    with pytest.raises(grpc.RpcError) as err:
        raw.next_frame()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MalformedMessage" in (err.value.details() or "")
    raw.close()
    assert deployment.admin is not None
    (drop,) = deployment.admin.status(rid).dropouts
    assert drop.client_id == 1 and drop.stage == "advertise_keys"


def test_oversized_messages_refused(tmp_path: Any) -> None:
    d = Deployment(tmp_path / "s.db", max_chunk_bytes=16 * 1024).start()
    try:
        names = d.enroll(3)
        rid = d.create(names, 10, FAST)
        raw = RawSession(d, names[0], rid)
        raw.send_chunk(seq=0, total=1 << 40, offset=0, data=b"x")  # announced size: 1 TiB
        with pytest.raises(grpc.RpcError) as err:
            raw.next_frame()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit" in (err.value.details() or "")
        raw.close()
        raw = RawSession(d, names[1], rid)
        raw.send_chunk(seq=0, total=1 << 20, offset=0, data=bytes(1 << 20))  # one 1 MiB frame
        with pytest.raises(grpc.RpcError) as err:
            raw.next_frame()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        raw.close()
    finally:
        d.stop()


def test_replayed_message_is_acknowledged_as_duplicate(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    rid = deployment.create(names, 10, FAST)
    msg, _ = _advertise(deployment, names[0], rid)
    raw = RawSession(deployment, names[0], rid)
    raw.send_message(0, msg.encode())
    first = raw.next_frame()
    raw.send_message(1, msg.encode())
    second = raw.next_frame()
    raw.close()
    assert (first.ack.seq, first.ack.duplicate) == (0, False)
    assert (second.ack.seq, second.ack.duplicate) == (1, True)
    assert deployment.admin is not None
    assert not deployment.admin.status(rid).dropouts


def test_cross_round_message_refused_without_dropping(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    round_a = deployment.create(names, 10, FAST)
    round_b = deployment.create(names, 10, FAST)
    msg_a, _ = _advertise(deployment, names[0], round_a)
    raw = RawSession(deployment, names[0], round_b)
    raw.send_message(0, msg_a.encode())
    with pytest.raises(grpc.RpcError) as err:
        raw.next_frame()
    raw.close()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another round" in (err.value.details() or "")
    assert deployment.admin is not None
    assert not deployment.admin.status(round_b).dropouts


def test_replayed_call_credentials_refused(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    rid = deployment.create(names, 10, FAST)
    md = call_metadata(deployment.identities[names[0]], SESSION, rid)
    msg, _ = _advertise(deployment, names[0], rid)
    first = RawSession(deployment, names[0], rid, metadata=md)
    first.send_message(0, msg.encode())
    assert first.next_frame().ack.seq == 0  # the first use of the credentials was accepted
    second = RawSession(deployment, names[0], rid, metadata=md)
    with pytest.raises(grpc.RpcError) as err:
        second.next_frame()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "replayed" in (err.value.details() or "")
    first.close()
    second.close()


def test_client_retries_after_the_connection_breaks(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    dim = 200_000
    rid = deployment.create(names, dim, StageTimeouts.uniform(20.0), neighbors="all")
    assert deployment.server is not None
    relay = FlakyRelay(deployment.server.port, cut_after=300_000)  # mid masked input
    flaky = Client(
        f"127.0.0.1:{relay.port}",
        deployment.identities[names[0]],
        retry=RetryPolicy(initial_backoff=0.01),
        policy=Policy(authority=deployment.authority),
        insecure_no_tls=True,
    )

    def via_relay() -> Any:
        joined = flaky.join(rid)
        return flaky.participate(joined, np.ones(dim))

    try:
        out = run_threads(
            {names[0]: via_relay}
            | {n: (lambda n=n: participate(deployment, n, rid, np.ones(dim))) for n in names[1:]}
        )
    finally:
        flaky.close()
        relay.close()
    assert all(o.error is None for o in out.values()), {k: o.error for k, o in out.items()}
    assert flaky.stats.reconnects >= 1 and relay.connections >= 2
    assert np.allclose(out[names[0]].result.mean, 1.0, atol=1e-3)


def test_late_message_after_drop_is_refused(deployment: Deployment) -> None:
    # Four clients, t=3: a sum needs three contributors (min_contributors) and 2t > k+1.
    names = deployment.enroll(4)
    rid = deployment.create(names, 10, StageTimeouts.uniform(1.0), neighbors="all", threshold="3")
    msg, _ = _advertise(deployment, names[3], rid)
    out = run_threads(
        {n: (lambda n=n: participate(deployment, n, rid, np.ones(10))) for n in names[:3]}
    )
    assert all(o.error is None for o in out.values())
    time.sleep(0.2)
    raw = RawSession(deployment, names[3], rid)
    raw.send_message(0, msg.encode())
    with pytest.raises(grpc.RpcError) as err:
        raw.next_frame()
    raw.close()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
