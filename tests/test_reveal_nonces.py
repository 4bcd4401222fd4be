"""The neighbour graph cannot be ground (issue 11, item 5): the reveal_nonces stage.

The graph seed hashes the session id and every roster member's graph nonce, each committed
to in the signed AdvertiseKeys and opened only after the roster is fixed. These tests attack
it as the server and its colluding clients would.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable

import pytest

from secagg import graph
from secagg.client import SecAggClient
from secagg.errors import ProtocolViolation, RoundAborted, ServerMisbehaviour
from secagg.messages import (
    AdvertiseKeys,
    Message,
    NonceReveal,
    NonceReveals,
    Roster,
    ShareKeys,
    nonce_commitment,
)
from secagg.prg import Purpose, derive_key
from secagg.rounds.advertise_keys import session_id_for
from secagg.rounds.base import Stage
from secagg.rounds.reveal_nonces import graph_seed
from secagg.simulate import SimulationConfig, simulate
from tests.helpers import TEST_POLICY, Harness

GRIND_TRIES = 600
"""Tries per grinding attempt. The goal below has probability 1/36 per draw, so 600 tries
miss it with probability (35/36)^600 < 10^-7."""
REPEATS = 3


def _predicted_neighbours(h: Harness, entries: list[AdvertiseKeys], target: int) -> frozenset[int]:
    """The adversary's offline graph: everything it sees before the honest clients reveal
    anything (the advertised keys), through the pre-fix derivation
    ``graph seed = HKDF(session id)``."""
    sid = session_id_for(h.params.digest(), entries)
    seed = derive_key(sid, sid, Purpose.GRAPH)
    ids = sorted(e.sender for e in entries)
    return graph.neighbours_of(ids, h.params.degree, seed, target)


def _grind_once(target: int, goal: frozenset[int]) -> bool:
    """One round in which corrupt client 10, colluding with the server (which holds every
    honest AdvertiseKeys before it publishes the roster), re-draws its keys until the
    predicted graph gives ``target`` exactly the neighbours ``goal``. Returns whether the
    honest target really ends up with those neighbours."""
    h = Harness(10, 4, neighbors=2, threshold=2, policy=TEST_POLICY)
    replies = h.start()
    honest = [replies[c][0] for c in h.ids if c != 10]
    assert all(isinstance(m, AdvertiseKeys) for m in honest)
    for _ in range(GRIND_TRIES):
        corrupt = SecAggClient(
            10, h.identities[10], h.params, h.directory, h.xs[10], policy=TEST_POLICY
        )
        adv = corrupt.start()[0]
        assert isinstance(adv, AdvertiseKeys)
        entries = [m for m in honest if isinstance(m, AdvertiseKeys)] + [adv]
        if _predicted_neighbours(h, entries, target) == goal:
            break
    h.clients[10] = corrupt
    replies[10] = [adv]
    replies = h.to_clients(h.stage(replies))  # roster (and, after the fix, the reveals)
    sent = replies[target][0]
    assert isinstance(sent, ShareKeys)
    return frozenset(r for r, _ in sent.shares) == goal


def test_grinding_advertised_keys_does_not_steer_the_graph() -> None:
    """Attack: a colluding client re-draws its advertised keys offline (about a millisecond
    a try) until the graph gives honest client 1 only corrupt neighbours, {9, 10}
    (probability 1/36 per draw at n = 10, k = 2).

    Before the fix the graph seed hashed only the advertised keys, so the grind landed the
    goal in every one of the REPEATS rounds: this test failed. After it the seed also hashes
    the honest clients' nonces, unknown until the roster (hence every key) is fixed, so the
    adversary's prediction is worthless and each round lands the goal with probability 1/36:
    the test fails by chance with probability (1/36)^3 < 2.2e-5.
    """
    goal = frozenset({9, 10})
    hits = sum(_grind_once(1, goal) for _ in range(REPEATS))
    assert hits < REPEATS


def _to_reveals(h: Harness) -> dict[int, list[Message]]:
    """Advertise, deliver the roster; the clients' NonceReveal replies, not yet sent."""
    out = h.stage(h.start())
    assert all(isinstance(m, Roster) for _, m in out)
    replies = h.to_clients(out)
    assert all(isinstance(r[0], NonceReveal) for r in replies.values())
    return replies


def test_withheld_reveal_aborts_naming_the_client() -> None:
    """Attack: a colluding client sees the graph only after the honest reveals, then
    withholds its own to make the server drop it and re-draw the graph from the rest. The
    reveal set must be the whole roster: the round aborts, naming the client (the job
    excludes it next round), instead of going on with a graph of the adversary's choosing."""
    h = Harness(6, 4, neighbors="all", auto_reveal=False)
    replies = _to_reveals(h)
    out = h.stage(replies, silent={4})
    err = h.server.error
    assert isinstance(err, RoundAborted)
    assert err.stage == Stage.REVEAL_NONCES.value and "[4]" in err.reason
    assert h.server.records[4].dropped_stage is Stage.REVEAL_NONCES
    h.to_clients(out)
    for c in set(h.ids) - {4}:
        assert h.clients[c].stage is Stage.ABORTED


def test_reveal_that_does_not_open_the_commitment_is_refused() -> None:
    """Attack: a corrupt client reveals a nonce other than the one it committed to (chosen
    after seeing the honest ones). The server drops it and aborts naming it."""
    h = Harness(6, 4, neighbors="all", auto_reveal=False)
    replies = _to_reveals(h)
    m = replies[3][0]
    assert isinstance(m, NonceReveal)
    replies[3] = [dataclasses.replace(m, nonce=secrets.token_bytes(32))]
    h.stage(replies)
    assert any(isinstance(e, ProtocolViolation) and e.client_id == 3 for e in h.errors)
    err = h.server.error
    assert isinstance(err, RoundAborted) and "[3]" in err.reason


def _tamper_reveals(h: Harness, change: Callable[[NonceReveals], NonceReveals]) -> None:
    """Deliver ``change(NonceReveals)`` to one client: it must refuse and abort."""
    out = h.stage(_to_reveals(h))
    cid, msg = out[0]
    assert isinstance(msg, NonceReveals)
    with pytest.raises(ServerMisbehaviour):
        h.clients[cid].receive(change(msg).encode(), h.now)
    assert h.clients[cid].stage is Stage.ABORTED


def test_client_refuses_a_subset_of_reveals() -> None:
    """Attack: a malicious server forwards only some reveals (or a superset, or out of
    order) so as to choose among 2^c graphs. Each client checks that the reveals name
    exactly the roster, in id order."""
    h = Harness(6, 4, neighbors="all", auto_reveal=False)
    _tamper_reveals(h, lambda m: dataclasses.replace(m, nonces=m.nonces[:-1]))
    h = Harness(6, 4, neighbors="all", auto_reveal=False)
    _tamper_reveals(h, lambda m: dataclasses.replace(m, nonces=m.nonces[::-1]))
    h = Harness(6, 4, neighbors="all", auto_reveal=False)
    extra = ((7, secrets.token_bytes(32)),)
    _tamper_reveals(h, lambda m: dataclasses.replace(m, nonces=m.nonces + extra))


def test_client_refuses_a_forged_reveal() -> None:
    """Attack: a malicious server substitutes a nonce of its choosing for a client's. Each
    client checks every nonce against that client's signed commitment, and its own."""
    h = Harness(6, 4, neighbors="all", auto_reveal=False)

    def forge(m: NonceReveals) -> NonceReveals:
        (u, _), *rest = m.nonces
        return dataclasses.replace(m, nonces=((u, secrets.token_bytes(32)), *rest))

    replies = _to_reveals(h)
    out = h.stage(replies)
    for cid, msg in out:
        assert isinstance(msg, NonceReveals)
        with pytest.raises(ServerMisbehaviour, match="nonce"):
            h.clients[cid].receive(forge(msg).encode(), h.now)
    h = Harness(6, 4, neighbors="all", auto_reveal=False)
    _tamper_reveals(h, lambda m: dataclasses.replace(m, session_id=bytes(32)))


def test_client_and_server_agree_on_the_graph() -> None:
    """The server's graph is the clients': each honest client's ShareKeys goes to exactly
    the neighbours the server expects (the server accepted them all)."""
    h = Harness(12, 4, neighbors=4, threshold=3, policy=TEST_POLICY)
    out = h.stage(h.start())
    replies = h.to_clients(out)
    for cid, (msg,) in replies.items():
        assert isinstance(msg, ShareKeys)
        assert frozenset(r for r, _ in msg.shares) == h.server.ctx.graph[cid]
    seed = graph_seed(h.server.session_id, h.server.ctx.nonces)
    assert dict(graph.neighbours(h.ids, 4, seed)) == h.server.ctx.graph


def test_graph_seed_depends_on_every_nonce() -> None:
    """Any one nonce changed (an honest one the adversary cannot predict) changes the seed."""
    sid = secrets.token_bytes(32)
    nonces = {c: secrets.token_bytes(32) for c in (1, 2, 5)}
    base = graph_seed(sid, nonces)
    assert graph_seed(sid, dict(reversed(nonces.items()))) == base  # id order, not insertion
    for c in nonces:
        assert graph_seed(sid, {**nonces, c: secrets.token_bytes(32)}) != base
    assert graph_seed(secrets.token_bytes(32), nonces) != base
    assert nonce_commitment(bytes(32), 1, nonces[1]) != nonce_commitment(bytes(32), 2, nonces[1])


def test_advertisement_signature_covers_the_nonce_commitment() -> None:
    """Attack: the server swaps a client's nonce commitment for one it can open. The
    signature covers the commitment, so the server refuses the message (and a client would
    refuse such a roster entry)."""
    h = Harness(5, 4, neighbors="all")
    replies = h.start()
    adv = replies[2][0]
    assert isinstance(adv, AdvertiseKeys)
    mine = nonce_commitment(h.params.digest(), 2, bytes(32))
    forged = dataclasses.replace(adv, nonce_commit=mine)
    with pytest.raises(ProtocolViolation):
        h.server.receive(2, forged.encode(), 0.0)


def test_simulate_drop_in_reveal_aborts_and_random_never_picks_it() -> None:
    cfg = SimulationConfig(clients=8, dim=16, dropout=0.25, drop_stage="reveal")
    report = simulate(cfg)
    assert report["status"] == "aborted"
    assert report["abort"]["stage"] == "reveal_nonces"
    cfg = SimulationConfig(clients=20, dim=16, dropout=0.2, drop_stage="random", seed=3)
    report = simulate(cfg)
    assert "reveal_nonces" not in report["dropped"].values()
    assert report["status"] == "completed" and report["exact"]


def test_service_size_bounds_cover_the_reveal_stage() -> None:
    """The gRPC layer allocates at most ``max_*_message_bytes``: the larger AdvertiseKeys
    and Roster and the new messages must fit (the roster bound was 32 bytes an entry short)."""
    from secagg.service.serde import max_client_message_bytes, max_server_message_bytes

    h = Harness(9, 4, neighbors="all", auto_reveal=False)
    replies = h.start()
    up = [m for msgs in replies.values() for m in msgs]
    roster = h.stage(replies)
    replies = h.to_clients(roster)
    up += [m for msgs in replies.values() for m in msgs]
    down = [m for _, m in roster + h.stage(replies)]
    assert {type(m) for m in down} == {Roster, NonceReveals}
    assert max(len(m.encode()) for m in up) <= max_client_message_bytes(h.params)
    assert max(len(m.encode()) for m in down) <= max_server_message_bytes(h.params)
