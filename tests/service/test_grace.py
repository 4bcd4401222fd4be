"""Dropouts cost a grace period, not a deadline (issue 14, item 2), over real loopback gRPC.

A participant whose last stream closes and that does not reconnect within
``disconnect_grace`` counts as dropped at once, so the stage ends as soon as every expected
client has answered or is known gone; one that reconnects within the grace continues.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secagg.server import StageTimeouts
from secagg.service import client as sdk
from secagg.service.config import ServerConfig

from .helpers import Deployment, participate, run_threads, silent_from

SLOW = StageTimeouts.uniform(60.0)
"""Deadlines far longer than the grace: a dropout that waited for one would show it in its
drop reason (and the test would take a minute)."""


@pytest.fixture
def quick(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path / "secagg.db", config={"disconnect_grace": 0.5}).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.parametrize("msg_type", [2, 3, 5])
def test_client_whose_stream_closes_is_dropped_after_the_grace(
    quick: Deployment, msg_type: int
) -> None:
    """A client that goes away (its stream is cancelled) before sending ShareKeys (2),
    MaskedInput (3) or UnmaskShares (5) is dropped once the grace period is over, named with
    that reason, and the round completes without waiting out the 60 s deadline. Before the
    fix the drop reason was the deadline."""
    names = quick.enroll(5)
    rid = quick.create(names, 100, SLOW, neighbors="all", threshold="3")
    jobs = {
        n: (
            lambda n=n: participate(
                quick, n, rid, np.ones(100), on_send=silent_from(msg_type) if n == "c5" else None
            )
        )
        for n in names
    }
    out = run_threads(jobs)
    assert all(o.error is None for o in out.values()), {k: o.error for k, o in out.items()}
    assert quick.admin is not None
    st = quick.admin.wait(rid, timeout=30.0)
    assert st.status == "completed", st.abort_reason
    (drop,) = st.dropouts
    assert drop.client_id == 5
    assert "did not reconnect within 0.5 s" in drop.reason
    contributors = [1, 2, 3, 4] if msg_type in (2, 3) else [1, 2, 3, 4, 5]
    assert list(st.contributors) == contributors


def test_client_that_reconnects_within_the_grace_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose stream breaks after the roster reconnects (resuming its mailbox) well
    within the grace period: it is not dropped and its input is in the sum."""
    d = Deployment(tmp_path / "secagg.db", config={"disconnect_grace": 5.0}).start()
    try:
        names = d.enroll(4)
        rid = d.create(names, 100, SLOW, neighbors="all", threshold="3")
        victim: dict[str, Any] = {}
        original = sdk._Session._pump

        def flaky(self: Any, call: Any) -> Any:
            if self.client is not victim.get("client") or victim.get("broken"):
                return original(self, call)
            victim["broken"] = True

            def frames() -> Iterator[Any]:
                for frame in call:
                    yield frame
                    if self.received >= 1:  # the roster arrived: now lose the connection
                        raise sdk._Unavailable("test: connection lost")

            return original(self, frames())

        monkeypatch.setattr(sdk._Session, "_pump", flaky)

        def run(n: str) -> Any:
            with d.client(n) as c:
                if n == "c2":
                    victim["client"] = c
                joined = c.join(rid)
                res = c.participate(joined, np.ones(100))
                return res, c.stats.reconnects

        out = run_threads({n: (lambda n=n: run(n)) for n in names})
        assert all(o.error is None for o in out.values()), {k: o.error for k, o in out.items()}
        assert out["c2"].result[1] >= 1
        assert d.admin is not None
        st = d.admin.wait(rid, timeout=30.0)
        assert st.status == "completed", st.abort_reason
        assert not st.dropouts
        assert list(st.contributors) == [1, 2, 3, 4]
    finally:
        d.stop()


def test_disconnect_grace_is_configurable() -> None:
    assert ServerConfig(store=":memory:").disconnect_grace == 3.0
    assert ServerConfig(store=":memory:", disconnect_grace=0.25).disconnect_grace == 0.25
    with pytest.raises(Exception, match="disconnect_grace"):
        ServerConfig(store=":memory:", disconnect_grace=0.0)
