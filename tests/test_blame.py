"""No unattributable abort (issue 11, item 4): every attack here is one malicious client.

Each test names the attack it catches; each failed on the code before the defence
(changes/secblame.md): small-order keys crashed honest clients, inconsistent shares ended
the round without naming their dealer, and a lying holder was only warned about.
"""

from __future__ import annotations

import dataclasses
import secrets

import pytest

from secagg import shamir
from secagg.client import share_aad
from secagg.errors import InvalidPublicKey, RoundAborted, ServerMisbehaviour
from secagg.keys import AgreementKey, aead_encrypt, check_agreement_key
from secagg.messages import (
    AdvertiseKeys,
    Message,
    Roster,
    ShareKeys,
    UnmaskShares,
    share_commit_payload,
    share_commitment,
)
from secagg.rounds.base import Stage
from secagg.rounds.unmasking import check_dealer_evidence
from tests.helpers import Harness
from tests.test_protocol import assert_exact

P = 2**255 - 19
SMALL_ORDER_U = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
    P,  # non-canonical encodings of 0 and 1 (libsodium's blocklist)
    P + 1,
]
"""libsodium's X25519 blocklist, without the high-bit variants (added below)."""

BAD_KEYS = [(u + (hb << 255)).to_bytes(32, "little") for u in SMALL_ORDER_U for hb in (0, 1)]


# --- X25519 keys -------------------------------------------------------------------------


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: k.hex()[:6] + ".." + k.hex()[-2:])
def test_small_order_and_non_canonical_keys_are_refused(key: bytes) -> None:
    """Attack: a peer key whose X25519 output is all zero (RFC 7748 section 6.1)."""
    with pytest.raises(InvalidPublicKey):
        check_agreement_key(key)
    with pytest.raises(InvalidPublicKey):
        AgreementKey().agree(key)


def test_honest_keys_pass_the_check() -> None:
    for _ in range(50):
        check_agreement_key(AgreementKey().public)


def _advertise_bad_key(h: Harness, cid: int, field: str, key: bytes) -> dict[int, list[Message]]:
    """Start every client; ``cid`` advertises ``key`` in ``field``, correctly signed."""
    replies = h.start()
    (adv,) = replies[cid]
    assert isinstance(adv, AdvertiseKeys)
    bad = (
        dataclasses.replace(adv, enc_pk=key)
        if field == "enc_pk"
        else dataclasses.replace(adv, mask_pk=key)
    )
    sig = h.identities[cid].sign(bad.signed_payload(h.params.digest()))
    replies[cid] = [dataclasses.replace(bad, signature=sig)]
    return replies


@pytest.mark.parametrize("field", ["enc_pk", "mask_pk"])
@pytest.mark.parametrize(
    "key", [BAD_KEYS[0], BAD_KEYS[4], BAD_KEYS[9]], ids=["zero", "order8", "p"]
)
def test_small_order_key_drops_and_names_its_sender(field: str, key: bytes) -> None:
    """Attack: a client signs and advertises a small-order X25519 key. Before the fix the
    server put it in the roster and every honest neighbour raised CryptoError while
    dealing shares (no result); now the sender is dropped with a reason naming it."""
    h = Harness(6, 8, neighbors="all")
    out = h.stage(_advertise_bad_key(h, 3, field, key))
    rec = h.server.records[3]
    assert not rec.active and rec.dropped_stage is Stage.ADVERTISE_KEYS
    assert "X25519" in (rec.reason or "")
    for _ in range(4):
        out = h.stage(h.to_clients(out, skip={3}))
    # The only refusal is the server's, of the bad advertisement; no honest client failed.
    assert [(type(e), e.client_id) for e in h.errors] == [(InvalidPublicKey, 3)]  # type: ignore[attr-defined]
    assert_exact(h, set(h.ids) - {3})


def test_client_refuses_roster_with_small_order_key() -> None:
    """Attack: the server keeps a small-order key in the roster (it should have dropped
    its sender). Before the fix the honest client crashed with CryptoError in
    deal_shares; now it refuses the roster as server misbehaviour."""
    h = Harness(5, 8, neighbors="all")
    replies = _advertise_bad_key(h, 2, "enc_pk", BAD_KEYS[2])
    entries = tuple(m for c in sorted(replies) for m in replies[c])
    assert all(isinstance(e, AdvertiseKeys) for e in entries)
    roster = Roster(h.params.round_id, 0, entries)  # type: ignore[arg-type]
    with pytest.raises(ServerMisbehaviour, match="unusable key of client 2"):
        h.clients[1].receive(roster.encode())


# --- inconsistent shares from a dealer ---------------------------------------------------


def _garbage_deal(
    h: Harness,
    cid: int,
    *,
    match_commitments: bool = True,
    bad_for: set[int] | None = None,
    unsigned_for: frozenset[int] | set[int] = frozenset(),
) -> ShareKeys:
    """What a malicious dealer sends: random field elements as the shares of the holders in
    ``bad_for`` (all by default), valid under the AEAD, the others honest; it signs
    commitments to what it sends (``match_commitments``) or to its honest shares. The
    commitments of the holders in ``unsigned_for`` carry a signature over other bytes."""
    c = h.clients[cid]._ctx
    holders = sorted(c.neighbours | {cid})
    sid = c.session_id
    seed_sh, key_sh = shamir.split_many(
        [c.secrets.seed, c.secrets.mask.private_bytes], c.params.threshold, holders
    )
    honest = {v: (seed_sh[v], key_sh[v]) for v in holders}

    def rand() -> bytes:
        return shamir.encode_share(secrets.randbelow(shamir.PRIME))

    bad = set(holders) if bad_for is None else bad_for
    dealt = {v: (rand(), rand()) if v in bad else honest[v] for v in holders}
    c.own_shares = dealt[cid]
    commitments = []
    for v in holders:
        seed_s, key_s = dealt[v] if match_commitments else honest[v]
        h_seed = share_commitment(sid, cid, v, b"seed", seed_s)
        h_key = share_commitment(sid, cid, v, b"key", key_s)
        sig = h.identities[cid].sign(share_commit_payload(sid, cid, v, h_seed, h_key))
        if v in unsigned_for:
            sig = h.identities[cid].sign(b"not the commitment")
        commitments.append((v, h_seed + h_key + sig))
    bundles = []
    for v in sorted(c.neighbours):
        key = c.share_key(v, sender=cid, recipient=v)
        pt = dealt[v][0] + dealt[v][1]
        bundles.append((v, aead_encrypt(key, pt, share_aad(sid, cid, v))))
    return ShareKeys(c.rid, cid, sid, tuple(bundles), tuple(commitments))


def _run_with_dealer(
    h: Harness,
    dealer: int,
    *,
    match: bool,
    silent_after_share: bool = False,
    bad_for: set[int] | None = None,
    unsigned_for: frozenset[int] | set[int] = frozenset(),
) -> None:
    out = h.stage(h.start())
    replies = h.to_clients(out)
    replies[dealer] = [
        _garbage_deal(
            h, dealer, match_commitments=match, bad_for=bad_for, unsigned_for=unsigned_for
        )
    ]
    out = h.stage(replies)
    gone = {dealer} if silent_after_share else set()
    for _ in range(3):
        out = h.stage(h.to_clients(out, skip=gone), silent=gone)
        if h.server.done:
            break


@pytest.mark.parametrize("dropped", [False, True], ids=["alive", "dropped"])
def test_inconsistent_dealer_is_named_with_signed_evidence(dropped: bool) -> None:
    """Attack: a dealer hands out garbage shares that pass the AEAD (and that it commits
    to), so its self-mask seed (alive) or mask key (dropped after ShareKeys) cannot be
    reconstructed. Before the fix the round aborted with "no candidate passed the check"
    naming nobody; now the abort names the dealer, carries evidence that re-verifies
    under its identity key alone, and its drop reason says why."""
    h = Harness(8, 8, neighbors="all")
    _run_with_dealer(h, 2, match=True, silent_after_share=dropped)
    err = h.server.error
    assert isinstance(err, RoundAborted) and h.server.result is None
    assert err.blamed == 2 and "client 2 dealt shares" in err.reason
    assert err.evidence is not None
    assert err.evidence["secret"] == ("key" if dropped else "seed")
    assert check_dealer_evidence(err.evidence, h.directory)
    assert not check_dealer_evidence(err.evidence, {**h.directory, 2: h.directory[3]})
    forged = dict(err.evidence, dealer=3)
    assert not check_dealer_evidence(forged, h.directory)
    rec = h.server.records[2]
    assert not rec.active  # an alive dealer's drop reason is the blame; first reason wins
    assert dropped or "dealt shares" in (rec.reason or "")


def test_shares_off_their_commitment_cost_only_those_shares() -> None:
    """Attack: a dealer sends two holders shares other than those it signed, hoping the
    server blames the holders. Before the fix the holders kept and revealed the garbage and
    the server's decoder named the two honest holders as liars; now each holder discards
    the shares with a warning naming the dealer, reveals nothing for it, nobody honest is
    dropped or named, and the round completes exactly with the dealer's input."""
    h = Harness(9, 8, neighbors="all")
    _run_with_dealer(h, 2, match=False, bad_for={5, 6})
    for cid in (5, 6):
        assert any("client 2 do not match" in w for w in h.clients[cid].warnings)
    assert_exact(h, set(h.ids))
    assert all(rec.active for rec in h.server.records.values())
    assert not any("5" in w or "6" in w for w in h.server.ctx.warnings)


def test_dealer_whose_shares_all_fail_their_commitment_is_named() -> None:
    """Attack: a dealer sends every holder shares other than those it signed. Each holder
    withholds them (no crash), the dealer's own revealed share fails its commitment, so it
    is dropped and named, and the abort names it (docs/protocol.md: without signed proof,
    which would need a complaint stage before the masked inputs). Before the fix the abort
    named nobody."""
    h = Harness(6, 8, neighbors="all")
    _run_with_dealer(h, 2, match=False)
    for cid in set(h.ids) - {2}:
        assert any("client 2 do not match" in w for w in h.clients[cid].warnings)
    err = h.server.error
    assert isinstance(err, RoundAborted)
    assert "client 2" in err.reason
    assert not h.server.records[2].active
    assert all(h.server.records[c].active for c in set(h.ids) - {2})


def test_unsigned_garbage_shares_are_set_aside_by_the_server() -> None:
    """Attack: a dealer sends two holders garbage shares that match its digests but under no
    valid signature, hoping the round aborts without naming it (or names the holders).
    Holders no longer verify the commitment signatures (issue 14: ``k`` verifications a
    client saved; they check the AEAD and the digests), so both keep and reveal them; the
    server, which verifies the signatures of the shares it would cite, sets those two
    aside, reconstructs from the signed rest and the round completes exactly, naming the
    dealer, never the holders. Fails if :func:`secagg.rounds.unmasking._convict` stops
    filtering on the dealer's signatures (then the cited garbage convicts nobody provably:
    the round aborts with evidence that does not re-verify)."""
    h = Harness(9, 8, neighbors="all")
    _run_with_dealer(h, 2, match=True, bad_for={1, 3}, unsigned_for={1, 3})
    assert h.server.error is None, h.server.error
    assert_exact(h, set(h.ids))
    assert all(rec.active for rec in h.server.records.values())
    (warning,) = [w for w in h.server.ctx.warnings if "set aside" in w]
    assert "client 2 committed" in warning and "holders [1, 3]" in warning
    assert not any("share commitment" in w for c in (1, 3) for w in h.clients[c].warnings)


def test_unsigned_garbage_to_every_holder_aborts_naming_the_dealer() -> None:
    """Attack: as above for every holder, so fewer than ``t`` shares carry the dealer's
    signature. The round aborts naming the dealer (without signed proof, as before when
    the holders discarded such shares) and every honest client stays active. Fails if the
    server cites unsigned shares (its evidence would not re-verify) or blames a holder."""
    h = Harness(6, 8, neighbors="all")
    everyone = set(h.ids)
    _run_with_dealer(h, 2, match=True, unsigned_for=everyone)
    err = h.server.error
    assert isinstance(err, RoundAborted) and h.server.result is None
    assert "client 2" in err.reason and "validly committed" in err.reason
    assert err.evidence is None
    assert all(h.server.records[c].active for c in everyone - {2})


def test_server_altered_share_digests_cost_only_those_shares() -> None:
    """Attack: the server (which cannot read the shares) swaps the digests of one dealer's
    commitment in one holder's delivery, keeping the dealer's signature. The holder's
    digest check, which remains now that it skips the signature, discards the shares with
    a warning naming the dealer and reveals nothing for it: the round completes exactly
    and the honest holder is not dropped as a liar. Fails without the digest check in
    :func:`secagg.client.accept_share` (the holder would reveal a share the server's copy
    of the commitment refuses, and be excluded)."""
    from secagg.messages import ShareDelivery

    h = Harness(9, 8, neighbors="all")
    out = h.stage(h.start())
    out = h.stage(h.to_clients(out))

    def swap(cid: int, msg: Message) -> Message:
        if cid != 4 or not isinstance(msg, ShareDelivery):
            return msg
        commits = tuple((u, bytes(64) + c[64:]) if u == 2 else (u, c) for u, c in msg.commitments)
        return dataclasses.replace(msg, commitments=commits)

    out = h.stage(h.to_clients(out, tamper=swap))
    assert any("client 2 do not match" in w for w in h.clients[4].warnings)
    for _ in range(3):
        out = h.stage(h.to_clients(out))
        if h.server.done:
            break
    assert_exact(h, set(h.ids))
    assert all(rec.active for rec in h.server.records.values())


# --- holders that lie at unmasking ---------------------------------------------------------


def _lie(msg: Message) -> Message:
    assert isinstance(msg, UnmaskShares)

    def bump(pairs: tuple[tuple[int, bytes], ...]) -> tuple[tuple[int, bytes], ...]:
        return tuple(
            (o, shamir.encode_share((shamir.decode_share(s) + 1) % shamir.PRIME)) for o, s in pairs
        )

    return dataclasses.replace(
        msg, seed_shares=bump(msg.seed_shares), key_shares=bump(msg.key_shares)
    )


@pytest.mark.parametrize("liars", [1, 2])
def test_lying_holders_are_blamed_once_and_excluded(
    liars: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: holders reveal wrong shares of every peer at unmasking (with a dropout, so
    key shares too), hoping to stall the round or make the server search subsets. Before
    the fix the liars were only warned about, once per owner, and each owner with a wrong
    share cost an error-correcting decode (a fresh O(n^2) interpolation); now each liar is
    dropped once with a reason naming it, its shares are unused, and the server computes
    one Lagrange basis per secret kind however many holders lie."""
    h = Harness(20, 8, neighbors="all")
    out = h.stage(h.start())
    out = h.stage(h.to_clients(out))
    out = h.stage(h.to_clients(out), silent={9})  # 9 drops before its masked input
    out = h.stage(h.to_clients(out, skip={9}))
    replies = h.to_clients(out, skip={9})
    lying = list(range(1, 1 + liars))
    for cid in lying:
        replies[cid] = [_lie(replies[cid][0])]
    calls: list[int] = []
    real = shamir._scaled_derivatives

    def counted(xs: list[int]) -> list[int]:
        calls.append(len(xs))
        return real(xs)

    monkeypatch.setattr(shamir, "_scaled_derivatives", counted)
    h.stage(replies)
    assert_exact(h, set(h.ids) - {9})
    for cid in lying:
        rec = h.server.records[cid]
        assert not rec.active and rec.dropped_stage is Stage.UNMASKING
        assert "signed commitment" in (rec.reason or "")
    assert not any("wrong shares" in w for w in h.server.ctx.warnings)
    assert len(calls) <= 2  # one basis for the seeds, one for the dropped client's key


def test_reconstruct_each_matches_reconstruct_many_and_flags_inconsistent_sets() -> None:
    """reconstruct_each is reconstruct_many that answers None for a non-secret value."""
    good = [secrets.token_bytes(32) for _ in range(5)]
    tables = shamir.split_many(good, 4, [3, 5, 8, 9, 11])
    assert shamir.reconstruct_each(tables, 4) == shamir.reconstruct_many(tables, 4) == good
    # t = 1: the constant polynomial; PRIME - 1 >= 2^256 is no 32-byte secret.
    top = {1: shamir.encode_share(shamir.PRIME - 1)}
    assert shamir.reconstruct_each([top, {1: tables[0][3]}], 1) == [None, tables[0][3][1:]]
