"""Per-client work that grows with k, not n (issue 14, item 1), and why it stays sound.

A client verifies the roster signatures of its neighbours only and ``t`` consistency
signatures; these tests count the verifications, and attack the roster as a server would:
a forged entry is caught by whichever honest client of that session uses it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import secagg.client as client_mod
import secagg.directory as directory_mod
from secagg.directory import Authority, SignedEntry, sign_entry
from secagg.errors import InvalidSignature, ServerMisbehaviour
from secagg.keys import IdentityKey
from secagg.messages import Message, NonceReveal, NonceReveals, Roster
from secagg.rounds.base import Stage
from secagg.server import StageTimeouts
from secagg.service.trust import VerifiedEntries
from tests.helpers import TEST_POLICY, Harness


def _forged_round(h: Harness, victim: int) -> tuple[dict[int, list[Message]], dict[int, Exception]]:
    """The server replaces ``victim``'s mask key in the roster it shows everyone (it holds
    the matching private key, so it could strip the pairwise masks of whoever uses it),
    then opens the reveals under the forged session. Returns each client's ShareKeys reply
    and the error of each client that refused."""
    out = h.stage(h.start())
    roster = out[0][1]
    assert isinstance(roster, Roster)
    forged_key = bytes(31) + b"\x09"
    entries = tuple(
        dataclasses.replace(e, mask_pk=forged_key) if e.sender == victim else e
        for e in roster.entries
    )
    evil = dataclasses.replace(roster, entries=entries)
    reveals: dict[int, NonceReveal] = {}
    for cid in h.ids:
        if cid == victim:  # the victim itself would notice its own entry changed
            continue
        (msg,) = h.clients[cid].receive(evil.encode(), h.now)
        assert isinstance(msg, NonceReveal)
        reveals[cid] = msg
    # The server knows every nonce it needs: the victim's real one it got in advertise.
    (victim_reveal,) = h.clients[victim].receive(roster.encode(), h.now)
    assert isinstance(victim_reveal, NonceReveal)
    sid = next(iter(reveals.values())).session_id
    nonces = tuple((c, reveals.get(c, victim_reveal).nonce) for c in sorted(h.ids))
    opened = NonceReveals(h.params.round_id, 0, sid, nonces)
    replies: dict[int, list[Message]] = {}
    refused: dict[int, Exception] = {}
    for cid in reveals:
        try:
            replies[cid] = h.clients[cid].receive(opened.encode(), h.now)
        except ServerMisbehaviour as exc:
            refused[cid] = exc
    return replies, refused


def test_forged_neighbour_entry_is_refused_before_any_share_is_sent() -> None:
    """Attack: the server swaps one client's mask key in the roster. Every neighbour of
    that client (all, in the complete graph) refuses before dealing shares or masking.
    Fails without :func:`secagg.client.verify_neighbours` (the clients then deal shares)."""
    h = Harness(5, 4, neighbors="all", auto_reveal=False)
    replies, refused = _forged_round(h, victim=1)
    assert not replies
    assert set(refused) == {2, 3, 4, 5}
    assert all("client 1 is not signed by it" in str(e) for e in refused.values())
    assert all(h.clients[c].stage is Stage.ABORTED for c in refused)


def test_forged_entry_in_sparse_graph_is_caught_by_its_neighbours() -> None:
    """Attack: as above with a sparse graph, where most clients never use the forged entry.
    Those carry on (the entry only enters their session id), but exactly the honest
    neighbours of the forged entry refuse, so the forgery cannot be used undetected: the
    clients that would mask with the server's key are the ones that verify it. Fails
    without :func:`secagg.client.verify_neighbours`."""
    h = Harness(12, 4, neighbors=4, threshold=3, policy=TEST_POLICY, auto_reveal=False)
    replies, refused = _forged_round(h, victim=1)
    users = {c for c in h.ids if c != 1 and 1 in h.clients[c]._ctx.neighbours}
    assert len(users) == 4
    assert set(refused) == users
    assert set(replies) == set(h.ids) - users - {1}


def test_client_verifies_k_roster_and_t_consistency_signatures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-client count of Ed25519 verifications is ``k + t``, independent of ``n``
    (first ``n + |U3|``, then ``2k + t``): ``k`` roster entries and ``t`` consistency
    signatures; the dealers' share commitments are checked by digest, their signatures
    by the server when it cites them (issue 14, branch verifyk). The round is exact."""
    calls: dict[int, int] = {}
    real = client_mod.verify_signature
    current = {"cid": 0}

    def counting(public: bytes, data: bytes, signature: bytes, **kw: object) -> None:
        calls[current["cid"]] = calls.get(current["cid"], 0) + 1
        real(public, data, signature)

    monkeypatch.setattr(client_mod, "verify_signature", counting)
    h = Harness(30, 4, neighbors=6, threshold=4, policy=TEST_POLICY)
    for cid, cl in h.clients.items():
        orig = cl.receive

        def wrapped(m: Message | bytes, now: float = 0.0, _c: int = cid, _o=orig) -> list[Message]:  # type: ignore[no-untyped-def]
            current["cid"] = _c
            return _o(m, now)

        cl.receive = wrapped  # type: ignore[method-assign]
    h.run()
    assert h.server.result is not None, h.server.error
    k, t = h.params.degree, h.params.threshold
    assert set(calls.values()) == {k + t}
    assert len(calls) == 30


def test_scaled_deadlines_grow_with_the_round() -> None:
    """Default stage deadlines grow with n (and n * dim for the bulk stages); explicit
    ones are kept as given."""
    base = StageTimeouts()
    small = base.for_round(10, 1000)
    big = base.for_round(1000, 100_000)
    assert small.share_keys >= base.share_keys
    assert big.share_keys > small.share_keys
    assert big.masked_input > small.masked_input + 40
    explicit = dataclasses.replace(base, share_keys=7.0)
    assert explicit.for_round(1000, 100_000).share_keys == 7.0
    assert StageTimeouts.uniform(3.0).for_round(1000, 10**6) == StageTimeouts.uniform(3.0)


# -- the SDK's directory check: verified entries are cached across rounds ----------------------


def _entry(auth: IdentityKey, name: str, key: bytes, **kw: int) -> tuple[SignedEntry, bytes]:
    e = sign_entry(auth, "fed", name, key, **kw)
    return e, e.encode()


def test_directory_cache_verifies_each_entry_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Across rounds, an entry's authority signature is verified once; the field checks
    still run every time."""
    auth_key = IdentityKey()
    auth = Authority("fed", auth_key.public)
    cache = VerifiedEntries()
    entries = [_entry(auth_key, f"s{i}", IdentityKey().public) for i in range(5)]
    count = {"n": 0}
    real = directory_mod.verify_signature

    def counting(*a: object, **kw: object) -> None:
        count["n"] += 1
        real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(directory_mod, "verify_signature", counting)
    for _ in range(3):
        for e, blob in entries:
            cache.verify(auth, e, blob, name=e.name, key=e.identity_key, now=0.0)
    assert count["n"] == 5
    e, blob = entries[0]
    with pytest.raises(InvalidSignature, match="another site or key"):
        cache.verify(auth, e, blob, name="other", key=e.identity_key, now=0.0)


def test_directory_cache_is_not_poisoned_and_expiry_still_applies() -> None:
    """Attack: a forged entry is refused every time (only verified bytes enter the cache),
    under another authority a cached entry is verified afresh (and refused), and an
    expired entry is refused even though its signature is cached."""
    auth_key = IdentityKey()
    auth = Authority("fed", auth_key.public)
    cache = VerifiedEntries()
    e, blob = _entry(auth_key, "s", IdentityKey().public, not_after=100)
    cache.verify(auth, e, blob, name="s", key=e.identity_key, now=50.0)
    forged = dataclasses.replace(e, signature=bytes(64))
    for _ in range(2):
        with pytest.raises(InvalidSignature, match="not signed"):
            cache.verify(auth, forged, forged.encode(), name="s", key=e.identity_key, now=50.0)
    other = Authority("fed", IdentityKey().public)
    with pytest.raises(InvalidSignature, match="not signed"):
        cache.verify(other, e, blob, name="s", key=e.identity_key, now=50.0)
    with pytest.raises(InvalidSignature, match="expired"):
        cache.verify(auth, e, blob, name="s", key=e.identity_key, now=150.0)
    assert len(cache) == 1


# -- the core's side of the grace period: depart / rejoin (sans-I/O, no clock) ---------------


def test_departed_client_that_owes_the_stage_ends_it_at_once() -> None:
    """A client known gone before it advertised is dropped there and then: the stage ends
    without its deadline (the clock never moves)."""
    h = Harness(6, 4, neighbors="all")
    replies = h.start()
    assert h.to_server(replies, skip={6}) == []
    out = h.server.depart(6, h.now, "gone")
    assert out and isinstance(out[0][1], Roster)
    rec = h.server.records[6]
    assert rec.dropped_stage is Stage.ADVERTISE_KEYS and rec.reason is not None
    assert "gone" in rec.reason


def _to_masked(h: Harness) -> dict[int, list[Message]]:
    out = h.stage(h.start())
    replies = h.to_clients(out)  # roster -> reveals -> ShareKeys
    out = h.stage(replies)
    return h.to_clients(out)  # deliveries -> MaskedInput


@pytest.mark.parametrize("rejoins", [False, True])
def test_departed_client_that_already_answered_drops_in_the_next_stage(rejoins: bool) -> None:
    """A client that sent its masked input and then went away stays in the sum; it is
    dropped as soon as the consistency stage starts (not at that stage's deadline), unless it
    came back first. The round is exact either way."""
    h = Harness(6, 4, neighbors="all")
    replies = _to_masked(h)
    assert h.to_server({6: replies.pop(6)}) == []
    assert h.server.depart(6, h.now, "gone") == []
    assert h.server.records[6].active
    if rejoins:
        h.server.rejoin(6)
    out = h.to_server(replies)
    assert h.server.stage is Stage.CONSISTENCY
    assert h.server.records[6].active is rejoins
    while not h.server.done:
        out = h.stage(h.to_clients(out, skip=set() if rejoins else {6}))
    res = h.server.result
    assert res is not None, h.server.error
    assert set(res.contributors) == set(h.ids)
    assert np.array_equal(res.sums, h.expected_sums(h.ids))
    assert h.now == 0.0  # no deadline was waited out
