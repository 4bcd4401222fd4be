"""Blame in a live hybrid round (secagg/rounds/blame.py), real TenSEAL, in process.

Each test drives the sans-I/O server and clients through a whole round in which a client
spoils the encrypted sum, a key holder lies, or the server forges what it hands out.
"""

from __future__ import annotations

import dataclasses
import secrets

import numpy as np
import pytest

from secagg import ckks
from secagg.client import SecAggClient
from secagg.errors import (
    DecryptionBudgetExhausted,
    KeyEpochMismatch,
    MalformedMessage,
    ProtocolViolation,
    RoundAborted,
    ServerMisbehaviour,
    UnexpectedMessage,
)
from secagg.messages import (
    BlameRequest,
    BlameVerdict,
    EncryptedInput,
    EncryptedResult,
    Message,
    ResultVerdict,
    blame_verdict_payload,
    decode_message,
    encrypted_input_payload,
)
from secagg.policy import ClientPolicy
from secagg.rounds.base import Stage
from tests.helpers import Harness, Outgoing

N = 5


def _bad_ciphertexts(h: Harness, how: str) -> tuple[bytes, ...]:
    """Ciphertexts no honest client makes: slots far out of range, or another key."""
    he = h.params.he
    assert h.he_secret is not None
    if how == "range":
        huge = np.zeros(he.n_ciphertexts * he.slots_per_ciphertext)
        huge[: he.n_slots] = 2.0**he.slot_sum_bits - 1
        n = he.slots_per_ciphertext
        sk = h.he_secret
        return tuple(
            sk._dump(sk._encryptor.encrypt_symmetric(sk._encode(huge[i * n : (i + 1) * n])))
            for i in range(he.n_ciphertexts)
        )
    foreign = ckks.load_secret_context(ckks.make_secret_context(he), he)
    return tuple(ckks.encrypt(foreign, np.ones(he.n_slots, np.uint64)))


def _to_result(h: Harness, bad: dict[int, str]) -> dict[int, list[Message]]:
    """Run to the clients' verdicts on the result; clients in ``bad`` upload bad
    ciphertexts (signed by themselves: a malicious client, not a forging server)."""
    replies = h.to_clients(h.stage(h.start()))  # advertise (+ reveal) -> encrypted inputs
    replies = h.to_clients(h.stage(replies))
    for cid, how in bad.items():
        (m,) = replies[cid]
        assert isinstance(m, EncryptedInput)
        cts = _bad_ciphertexts(h, how)
        sig = h.identities[cid].sign(encrypted_input_payload(m.session_id, cid, cts))
        replies[cid] = [dataclasses.replace(m, ciphertexts=cts, signature=sig)]
    for _ in ("masked", "consistency", "unmask"):
        replies = h.to_clients(h.stage(replies))
    assert h.server.stage is Stage.RESULT_CHECK
    return replies


def _blame_requests(h: Harness, bad: dict[int, str]) -> Outgoing:
    out = h.stage(_to_result(h, bad))
    assert h.server.stage is Stage.BLAME, h.server.error
    assert out and all(isinstance(m, BlameRequest) for _, m in out)
    return out


def _budgets(h: Harness) -> dict[int, int]:
    left = {}
    for c, cl in h.clients.items():
        he = cl._ctx.he
        assert he is not None
        left[c] = he.decryptions_left
    return left


def test_live_round_names_out_of_range_and_wrong_key_senders() -> None:
    """Attack: two signed clients spoil a live hybrid round's sum, one with out-of-range
    slots, one with ciphertexts under another key. Before the fix every key holder only saw
    the sum fail (ServerMisbehaviour) and the server never learnt of it: no one was named.
    Now the holders reject the sum, check the forwarded uploads (each by two holders, each
    decryption charged) and the round aborts naming exactly clients 2 and 4."""
    h = Harness(N, 200, mode="hybrid")
    out = _blame_requests(h, {2: "range", 4: "key"})
    before = _budgets(h)
    h.stage(h.to_clients(out))
    assert h.server.stage is Stage.ABORTED and h.server.result is None
    err = h.server.error
    assert err is not None and err.stage == "blame"
    assert "clients [2, 4]" in err.reason
    for cid in (2, 4):
        rec = h.server.records[cid]
        assert not rec.active and rec.dropped_stage is Stage.BLAME
        assert rec.reason is not None and "does not decrypt to in-range lanes" in rec.reason
    assert all(h.server.records[c].active for c in (1, 3, 5))
    spent = {c: before[c] - left for c, left in _budgets(h).items()}
    assert sum(spent.values()) == 2 * N  # every upload checked twice, each one charged
    assert all(isinstance(e, RoundAborted) for e in h.errors if e.client_id in (1, 3, 5))


def test_honest_hybrid_round_completes_after_every_verdict() -> None:
    """The extra stage costs an honest round nothing but one small message per client."""
    h = Harness(N, 200, mode="hybrid")
    replies = _to_result(h, {})
    assert all(isinstance(m, ResultVerdict) and m.ok for ms in replies.values() for m in ms)
    assert h.server.result is None  # held back until the key holders accept it
    h.stage(replies)
    assert h.server.stage is Stage.COMPLETED
    np.testing.assert_array_equal(h.result_sums(), h.expected_sums(h.ids))


def test_lying_holder_cannot_frame_an_honest_sender() -> None:
    """Attack: a key holder lies in its (signed) verdict, blaming an honest sender. With a
    single check per upload it would have been named culprit (the design before the fix had
    no agreement rule). Each upload is checked by two holders and a sender is named only
    when both blame it: the lie is contradicted, the honest sender is not dropped, and the
    abort reason names the liar's verdict as disputed; the real culprit is still named."""
    h = Harness(N, 200, mode="hybrid")
    out = _blame_requests(h, {2: "range"})
    replies = h.to_clients(out)
    liar, victim = None, None
    for cid, msgs in replies.items():
        (v,) = msgs
        assert isinstance(v, BlameVerdict)
        honest = [s for s in v.checked if s != 2]
        if liar is None and honest:
            liar, victim = cid, honest[0]
            blamed = tuple(sorted((*v.blamed, (victim, "decrypted values outside [0, 2^M)"))))
            sig = h.identities[cid].sign(
                blame_verdict_payload(v.session_id, cid, v.checked, blamed)
            )
            replies[cid] = [dataclasses.replace(v, blamed=blamed, signature=sig)]
    assert liar is not None and victim is not None
    h.stage(replies)
    err = h.server.error
    assert err is not None
    assert "clients [2]" in err.reason
    assert f"client {victim} is blamed by key holders [{liar}]" in err.reason
    assert h.server.records[victim].active and not h.server.records[2].active
    assert h.server.ctx.blame_verdicts[liar].blamed  # the signed lie is kept as evidence


def test_verdict_not_matching_the_request_is_refused() -> None:
    """A holder's verdict must cover exactly what it was asked and be signed by it."""
    h = Harness(N, 200, mode="hybrid")
    out = _blame_requests(h, {2: "range"})
    replies = h.to_clients(out)
    cid, (v,) = next(iter(replies.items()))
    assert isinstance(v, BlameVerdict)
    with pytest.raises(ProtocolViolation, match="covers clients"):
        h.server.receive(cid, dataclasses.replace(v, checked=v.checked[:1]), h.now)
    h2 = Harness(N, 200, mode="hybrid")
    replies2 = h2.to_clients(_blame_requests(h2, {2: "range"}))
    cid2, (v2,) = next(iter(replies2.items()))
    assert isinstance(v2, BlameVerdict)
    with pytest.raises(ProtocolViolation):
        h2.server.receive(cid2, dataclasses.replace(v2, signature=bytes(64)), h2.now)


def _tampered_request(h: Harness, change: str) -> tuple[int, BlameRequest, SecAggClient]:
    out = _blame_requests(h, {2: "range"})
    holder, req = out[0]
    assert isinstance(req, BlameRequest)
    ups = list(req.uploads)
    if change == "unsigned":
        ups[0] = dataclasses.replace(ups[0], signature=bytes(64))
    elif change == "foreign":  # an upload of another session (a replay), signed there
        other = h.identities[ups[0].sender]
        sid = bytes(32)
        sig = other.sign(encrypted_input_payload(sid, ups[0].sender, ups[0].ciphertexts))
        ups[0] = dataclasses.replace(ups[0], session_id=sid, signature=sig)
    elif change == "altered":  # another client's ciphertexts under this sender's name
        donor = h.server.ctx.uploads[next(c for c in h.ids if c != ups[0].sender)]
        ups[0] = dataclasses.replace(ups[0], ciphertexts=donor.ciphertexts)
    elif change == "own":
        ups[0] = h.server.ctx.uploads[holder]
    elif change == "too_many":
        ups = [h.server.ctx.uploads[c] for c in h.ids if c != holder] * 3
    return holder, dataclasses.replace(req, uploads=tuple(ups)), h.clients[holder]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("unsigned", "not signed"),
        ("foreign", "another session"),
        ("altered", "not signed"),
        ("own", "its own upload"),
        ("too_many", "the policy allows"),
    ],
)
def test_holder_refuses_forged_blame_requests(change: str, match: str) -> None:
    """Attack: the server frames an honest client by handing a key holder an unsigned,
    replayed (foreign session), altered upload, the holder's own upload, or more checks
    than the holder's policy allows (to drain its budget). Before the fix no client
    checked a blame request (there was none). Now the holder aborts with
    ServerMisbehaviour and decrypts nothing."""
    h = Harness(N, 200, mode="hybrid", policy=ClientPolicy(max_blame_checks=4))
    holder, req, client = _tampered_request(h, change)
    before = _budgets(h)[holder]
    with pytest.raises(ServerMisbehaviour, match=match):
        client.receive(req.encode(), h.now)
    assert _budgets(h)[holder] == before
    assert client.stage is Stage.ABORTED


def test_holder_that_accepted_the_sum_refuses_blame_requests() -> None:
    """Attack: with a sum that decrypts, the server asks key holders to decrypt single
    uploads anyway (spending their budgets). A holder only checks uploads after its own
    decryption of the sum failed: one that accepted the sum is done and refuses."""
    h = Harness(N, 200, mode="hybrid")
    _to_result(h, {})
    ups = tuple(h.server.ctx.uploads[c] for c in (2, 3))
    req = BlameRequest(h.params.round_id, 0, h.server.session_id, ups)
    before = _budgets(h)[1]
    with pytest.raises(UnexpectedMessage):
        h.clients[1].receive(req.encode(), h.now)
    assert _budgets(h)[1] == before


def test_holder_refuses_checks_past_its_budget() -> None:
    """A holder whose budget cannot pay for the checks refuses them all, before any
    decryption (DecryptionBudgetExhausted), and sends no verdict."""
    h = Harness(N, 200, mode="hybrid")
    out = _blame_requests(h, {2: "range"})
    holder, req = out[0]
    he = h.clients[holder]._ctx.he
    assert he is not None
    while he.decryptions_left:
        he.charge_decryption()
    with pytest.raises(DecryptionBudgetExhausted):
        h.clients[holder].receive(req.encode(), h.now)


def test_hybrid_client_refuses_a_context_of_another_epoch() -> None:
    """Attack: the server runs a hybrid round under another CKKS key epoch. A client told the
    round's epoch refuses before sending anything (KeyEpochMismatch); and since the hybrid
    session id now binds the epoch's fingerprint, a client holding another epoch's context
    computes another session id and the server refuses its first message after the roster.
    Before the fix the session id ignored the epoch: both went ahead."""
    h = Harness(3, 40, mode="hybrid")
    he = h.params.he
    other = ckks.load_secret_context(ckks.make_secret_context(he, epoch=7), he)
    assert h.he_secret is not None
    with pytest.raises(KeyEpochMismatch, match="epoch 7"):
        SecAggClient(1, h.identities[1], h.params, h.directory, h.xs[1], 1,
                     he_context=other, key_epoch=h.he_secret.epoch.fingerprint)  # fmt: skip
    h.clients[1] = SecAggClient(
        1, h.identities[1], h.params, h.directory, h.xs[1], 1, he_context=other
    )
    out = h.stage(h.start())
    reveals = {c: h.clients[c].receive(m.encode(), h.now) for c, m in out}
    with pytest.raises(ProtocolViolation, match="another session"):
        h.server.receive(1, reveals[1][0].encode(), h.now)
    assert h.server.session_id != h.clients[1]._ctx.session_id
    assert h.clients[2]._ctx.session_id == h.server.session_id


def _codec_samples() -> list[Message]:
    rid, sid = secrets.token_bytes(16), secrets.token_bytes(32)
    up = EncryptedInput(rid, 3, sid, (b"ct-one", b"ct-two"), secrets.token_bytes(64))
    return [
        ResultVerdict(rid, 7, sid, False),
        ResultVerdict(rid, 7, sid, True),
        BlameVerdict(rid, 7, sid, (2, 3), ((3, "decrypted values outside [0, 2^40)"),), bytes(64)),
        BlameRequest(rid, 0, sid, (up, dataclasses.replace(up, sender=4))),
    ]


@pytest.mark.parametrize("msg", _codec_samples(), ids=lambda m: type(m).__name__)
def test_blame_messages_roundtrip_and_refuse_truncation(msg: Message) -> None:
    """The new messages decode to themselves; every truncation or extension is refused."""
    data = msg.encode()
    assert decode_message(data).encode() == data
    for cut in range(len(data)):
        with pytest.raises(MalformedMessage):
            decode_message(data[:cut])
    with pytest.raises(MalformedMessage):
        decode_message(data + b"\x00")


def test_blame_request_refuses_nested_foreign_messages() -> None:
    """A blame request may only carry this round's uploads, not any other message."""
    rid, sid = secrets.token_bytes(16), secrets.token_bytes(32)
    up = EncryptedInput(secrets.token_bytes(16), 3, sid, (b"x",), bytes(64))
    with pytest.raises(MalformedMessage, match="this round's uploads"):
        decode_message(BlameRequest(rid, 0, sid, (up,)).encode())
    bad_flag = bytearray(ResultVerdict(rid, 7, sid, True).encode())
    bad_flag[-1] = 2
    with pytest.raises(MalformedMessage, match="0 or 1"):
        decode_message(bytes(bad_flag))


def test_simulate_hybrid_names_a_spoiling_client() -> None:
    """``secagg simulate --mode hybrid`` runs the blame step in process: a client spoiling
    its upload makes the round abort in stage blame naming it (before: the simulated round
    "completed" with a sum no key holder could decrypt)."""
    from secagg.simulate import SimulationConfig, simulate

    report = simulate(SimulationConfig(clients=6, dim=50, dropout=0.0, mode="hybrid", spoil=(3,)))
    assert report["status"] == "aborted"
    assert report["abort"]["stage"] == "blame"
    assert "clients [3]" in report["abort"]["reason"]
    assert report["blamed"] == [3]
    honest = simulate(SimulationConfig(clients=6, dim=50, dropout=0.2, mode="hybrid"))
    assert honest["status"] == "completed" and honest["exact"]


def test_server_spoiling_the_sum_itself_frames_nobody() -> None:
    """Attack: the server hands out a sum of its own making (here values off integers) to
    push the blame onto some client. Every holder rejects it, every upload is cleared by two
    holders, so nobody is dropped and the abort points at the server's work."""
    h = Harness(N, 200, mode="hybrid")
    he = h.params.he
    assert h.he_secret is not None
    junk = h.he_secret
    k = he.slots_per_ciphertext
    halves = np.full(he.n_ciphertexts * k, 0.5)
    cts = tuple(
        junk._dump(junk._encryptor.encrypt_symmetric(junk._encode(halves[i * k : (i + 1) * k])))
        for i in range(he.n_ciphertexts)
    )

    def spoil(cid: int, m: Message) -> Message:
        if isinstance(m, EncryptedResult):
            return dataclasses.replace(m, ciphertexts=cts)
        return m

    replies = h.to_clients(h.stage(h.start()))
    for _ in ("share", "masked", "consistency"):
        replies = h.to_clients(h.stage(replies))
    replies = h.to_clients(h.stage(replies), tamper=spoil)
    assert all(isinstance(m, ResultVerdict) and not m.ok for ms in replies.values() for m in ms)
    h.stage(h.to_clients(h.stage(replies)))
    err = h.server.error
    assert err is not None and err.stage == "blame"
    assert "the server's work" in err.reason
    assert all(rec.active for rec in h.server.records.values())
