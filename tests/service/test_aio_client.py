"""The asyncio client driver (service/aio_client.py): many SDK clients on one event loop.

It must give the same exact result as the threaded SDK, and refuse what the server makes
up exactly as the SDK does: it runs the SDK's own checks and protocol core, only the
transport differs. The invented-participant test failed with the driver's call to the
SDK's round check (``Client._checked_round``) replaced by a bare decode; the tampered-roster
test checks that the core's refusal reaches the caller as the SDK's own error type.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from secagg.errors import SecAggError
from secagg.keys import IdentityKey
from secagg.server import StageTimeouts
from secagg.service import rounds
from secagg.service.aio_client import AsyncClient, aio_channel
from secagg.service.client import Policy
from secagg.service.errors import PolicyRefused
from secagg.service.loopback import simulate_grpc
from secagg.simulate import SimulationConfig

from .helpers import Deployment, participate, run_threads

FAST = StageTimeouts.uniform(10.0)


def test_async_workers_round_is_exact_with_dropouts() -> None:
    """30 clients in 3 worker processes, each an event loop of AsyncClients, over loopback
    gRPC with 10% dropout: the published sum equals the plaintext sum of the survivors'
    quantized inputs, and every survivor received it (``exact``)."""
    cfg = SimulationConfig(clients=30, dim=500, dropout=0.1, seed=3)
    report = simulate_grpc(cfg, workers="async", processes=3, deadlines=StageTimeouts.uniform(60))
    assert report["dropped"], "the plan drops some clients"
    assert report["status"] == "completed", report.get("abort")
    assert report["exact"] is True
    before_upload = {"advertise_keys", "reveal_nonces", "share_keys", "masked_input"}
    lost = sum(stage in before_upload for stage in report["dropped"].values())
    assert report["survivors"] == 30 - lost  # a later dropout's input is still summed
    assert report["transport"]["workers"] == "async"


def _async_clients(d: Deployment, names: list[str], policy: Policy | None = None) -> Any:
    async def run(rid: bytes, vectors: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with aio_channel(d.target) as channel:

            async def one(name: str) -> None:
                c = AsyncClient(
                    channel,
                    d.target,
                    d.identities[name],
                    policy=policy or Policy(authority=d.authority),
                    insecure_no_tls=True,
                )
                try:
                    joined = await c.join(rid)
                    out[name] = await c.participate(joined, vectors[name])
                except SecAggError as exc:
                    out[name] = exc
                finally:
                    c.close()

            await asyncio.gather(*(one(n) for n in names))
        return out

    return run


def test_async_round_matches_threaded_sdk(deployment: Deployment) -> None:
    """Four AsyncClients on one loop and one channel get the sums the sync SDK computes
    from the same inputs (the threaded SDK's round is the reference)."""
    names = deployment.enroll(4)
    rng = np.random.default_rng(5)
    xs = {n: rng.uniform(-1, 1, 64) for n in names}
    rid = deployment.create(names, 64, FAST)
    got = asyncio.run(_async_clients(deployment, names)(rid, xs))
    sums = {n: r.sums for n, r in got.items()}
    assert all(not isinstance(r, Exception) for r in got.values()), got
    first = sums[names[0]]
    assert all(np.array_equal(first, s) for s in sums.values())
    assert len(got[names[0]].contributors) == len(names)
    # The same inputs through the threaded SDK give the same float sum.
    rid2 = deployment.create(names, 64, FAST)
    ref = run_threads({n: (lambda n=n: participate(deployment, n, rid2, xs[n])) for n in names})
    assert all(o.error is None for o in ref.values()), ref
    np.testing.assert_allclose(
        got[names[0]].weighted_sum, ref[names[0]].result.weighted_sum, atol=1e-2
    )


def test_async_client_refuses_server_invented_participant(deployment: Deployment) -> None:
    """Attack: the server adds a participant it controls (no authority signature) to the
    directory to reach the threshold with its own keys. The AsyncClient refuses the round
    before sending anything, as the SDK does (with the SDK's check skipped it joined)."""
    names = deployment.enroll(3)
    assert deployment.admin is not None
    deployment.admin.enroll("sybil", IdentityKey().public)  # the server's own store
    rid = deployment.create([*names, "sybil"], 10, FAST)

    async def join() -> None:
        async with aio_channel(deployment.target) as channel:
            c = AsyncClient(
                channel,
                deployment.target,
                deployment.identities[names[0]],
                policy=Policy(authority=deployment.authority),
                insecure_no_tls=True,
            )
            try:
                await c.join(rid)
            finally:
                c.close()

    with pytest.raises(PolicyRefused, match=r"'sybil' .* carries no authority signature"):
        asyncio.run(join())


def test_async_client_refuses_tampered_roster(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: the server alters the roster it relays (one byte of the last signed entry).
    Every AsyncClient refuses it with the protocol core's own error (the same the SDK
    raises) and sends nothing after; the round does not complete."""
    names = deployment.enroll(4)
    real = rounds.RoundRunner.frames

    def tampered(self: rounds.RoundRunner, data: bytes, seq: int, chunk: int) -> list[bytes]:
        if seq == 0:  # the roster: every client's first server message
            data = data[:-1] + bytes([data[-1] ^ 1])
        return real(self, data, seq, chunk)

    monkeypatch.setattr(rounds.RoundRunner, "frames", tampered)
    rid = deployment.create(names, 16, StageTimeouts.uniform(5.0))
    xs = {n: np.zeros(16) for n in names}
    got = asyncio.run(_async_clients(deployment, names)(rid, xs))
    assert all(isinstance(r, SecAggError) for r in got.values()), got
    # The threaded SDK refuses the same tampering with the same error type.
    rid2 = deployment.create(names, 16, StageTimeouts.uniform(5.0))
    ref = run_threads({n: (lambda n=n: participate(deployment, n, rid2, xs[n])) for n in names})
    assert all(isinstance(o.error, SecAggError) for o in ref.values()), ref
    assert {type(r) for r in got.values()} == {type(o.error) for o in ref.values()}
