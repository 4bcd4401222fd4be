"""Server work that grew with the round per message or per call (issue 14, item 1).

At 1,000 clients, ``n`` calls of ``O(n)`` work each is a million steps: ``GetRound`` built
the directory for every caller, the runner scanned every client record after every
message, and ``ready()`` rebuilt the active set after every message. The first two tests
count the work and failed before the change (the directory built once per caller; records
read after every accepted message); the third checks that the faster ``ready()`` still
means what it did.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from secagg.rounds.base import ClientRecord, ServerState, Stage
from secagg.server import SecAggServer, StageTimeouts
from secagg.service import rounds, serde

from .helpers import Deployment, participate, run_threads

FAST = StageTimeouts.uniform(10.0)


def test_get_round_builds_the_directory_once_per_round(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six joins build the six-entry directory once; each caller still gets its own id,
    the round's status and the whole directory. Before: once per caller."""
    builds: list[int] = []
    real = serde.directory_to_proto

    def counted(members: Any) -> Any:
        builds.append(len(members))
        return real(members)

    monkeypatch.setattr(serde, "directory_to_proto", counted)
    names = deployment.enroll(6)
    rid = deployment.create(names, 8, FAST)
    builds.clear()  # CreateRound's answer lists the directory too (an operator call)
    joined = []
    for n in names:
        with deployment.client(n) as c:
            joined.append(c.join(rid))
    assert builds == [6]
    assert sorted(j.client_id for j in joined) == sorted(joined[0].directory)
    assert {j.status for j in joined} == {"running"}
    assert all(j.directory == joined[0].directory for j in joined)


def _record_reads(deployment: Deployment, monkeypatch: pytest.MonkeyPatch, lazy: bool) -> int:
    reads = [0]
    real = SecAggServer.records

    def counted(self: SecAggServer) -> Any:
        reads[0] += 1
        return real.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(SecAggServer, "records", property(counted))
    if not lazy:
        real_init = rounds.RoundRunner.__init__

        def eager(self: rounds.RoundRunner, **kw: Any) -> None:
            real_init(self, **kw)
            self._lazy_scan = False

        monkeypatch.setattr(rounds.RoundRunner, "__init__", eager)
    names = deployment.enroll(12, prefix="l" if lazy else "e")
    rid = deployment.create(names, 8, FAST)
    xs = {n: np.full(8, 0.25) for n in names}
    out = run_threads({n: (lambda n=n: participate(deployment, n, rid, xs[n])) for n in names})
    assert all(o.error is None for o in out.values()), out
    monkeypatch.undo()
    return reads[0]


def test_runner_scans_records_per_stage_not_per_message(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 12-client round reads the client records a few times a stage, not after each of
    its ~70 accepted messages (before: at least once per message, as the eager runner
    below still does)."""
    eager = _record_reads(deployment, monkeypatch, lazy=False)
    lazy = _record_reads(deployment, monkeypatch, lazy=True)
    assert eager >= 60
    assert lazy * 3 <= eager


class _State(ServerState):
    stage = Stage.SHARE_KEYS


@given(
    st.sets(st.integers(0, 40), max_size=40),
    st.sets(st.integers(0, 40), max_size=40),
    st.sets(st.integers(0, 40), max_size=40),
)
def test_ready_is_every_active_expected_client_answered(
    expected: set[int], received: set[int], dropped: set[int]
) -> None:
    """``ready()`` (now looking only at the clients yet to answer) equals its definition:
    the active expected clients are a subset of those who answered."""
    records = {c: ClientRecord(active=c not in dropped) for c in range(41)}
    ctx = types.SimpleNamespace(records=records)
    state = _State(ctx, frozenset(expected))  # type: ignore[arg-type]
    state.received = set(received) & set(expected)
    active = {c for c in expected if records[c].active}
    assert state.ready() == (active <= state.received)
