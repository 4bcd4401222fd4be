"""CKKS key holders against an active server: decryption budgets, key epochs, hybrid blame.

Real TenSEAL throughout. Every test here failed before the defence it checks existed (the
budget, the epoch binding and the blame step were absent: the API calls raised ``TypeError``
or ``ImportError``, or the attack went through); each docstring names the attack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from secagg import ckks
from secagg.ckks_budget import FileLedger, KeyEpoch
from secagg.errors import (
    ConfigurationError,
    DecryptionBudgetExhausted,
    DecryptionError,
    KeyEpochMismatch,
    ProtocolViolation,
    ServerMisbehaviour,
)
from secagg.he_blame import assign_checks, check_uploads, keyless_check
from secagg.he_params import HEParams, select_params
from secagg.he_round import CkksClient, CkksServer
from secagg.keys import IdentityKey
from secagg.messages import EncryptedInput, EncryptedResult, Message, encrypted_input_payload
from secagg.params import RoundParams, make_params
from tests.helpers import Harness

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params() -> HEParams:
    return select_params(6, 8, 2_000, "hybrid")


def _ones(p: HEParams) -> list[bytes]:
    sk = ckks.load_secret_context(ckks.make_secret_context(p), p)
    return ckks.encrypt(sk, np.ones(p.n_slots, np.uint64))


# --- decryption budget -------------------------------------------------------------------------


def test_decryption_budget_refuses_past_the_budget(params: HEParams) -> None:
    """Attack: a server replays crafted sums to one key holder, learning one bit of noise per
    accept/abort (IND-CPA-D). Before the fix decryptions were unlimited; now the fourth
    decryption of a budget-3 key is refused before anything is decrypted."""
    secret = ckks.make_secret_context(params, epoch=2, decryption_budget=3)
    sk = ckks.load_secret_context(secret, params)
    assert sk.epoch.epoch == 2 and sk.epoch.budget == 3
    ct = ckks.encrypt(sk, np.ones(params.n_slots, np.uint64))
    for left in (2, 1, 0):
        assert ckks.decrypt(sk, ct)[0] == 1
        assert sk.decryptions_left == left
    with pytest.raises(DecryptionBudgetExhausted, match=r"3 of 3.*--epoch 3"):
        ckks.decrypt(sk, ct)


def test_failed_decryption_is_charged_first(params: HEParams) -> None:
    """Attack: probe with ciphertexts that abort, hoping aborts are free. The charge is made
    before decrypting, so an abort costs as much as an accept (before: no count at all)."""
    sk = ckks.load_secret_context(ckks.make_secret_context(params, decryption_budget=2), params)
    with pytest.raises(DecryptionError):
        ckks.decrypt(sk, _ones(params))  # another key: fails the rounding check
    assert sk.decryptions_left == 1
    with pytest.raises(DecryptionError):
        ckks.decrypt(sk, _ones(params))
    with pytest.raises(DecryptionBudgetExhausted):
        ckks.decrypt(sk, _ones(params))


def test_budget_outside_limits_refused(params: HEParams) -> None:
    """A budget above MAX_DECRYPTION_BUDGET would let the leak approach the security margin."""
    with pytest.raises(ConfigurationError, match="decryption budget"):
        ckks.make_secret_context(params, decryption_budget=ckks.MAX_DECRYPTION_BUDGET + 1)
    with pytest.raises(ConfigurationError, match="decryption budget"):
        ckks.make_secret_context(params, decryption_budget=0)


def test_file_ledger_persists_across_processes(tmp_path: Path, params: HEParams) -> None:
    """Attack: restart the key holder (or run a second process on the same key) to reset an
    in-memory count. The file ledger beside the secret is shared: a decryption made by a
    child process counts here, and the budget holds across both (before: no ledger)."""
    from secagg.service.keyfile import write_ckks_contexts

    secret_path, _ = write_ckks_contexts(tmp_path / "fed", params, decryption_budget=2)
    sk = ckks.open_secret_context(secret_path, params)
    ct = ckks.encrypt(sk, np.full(params.n_slots, 7, np.uint64))
    (tmp_path / "ct.json").write_text(json.dumps([c.hex() for c in ct]))
    child = """
import json, sys
from secagg import ckks
from secagg.he_params import HEParams
p = HEParams.from_json(open(sys.argv[1], "rb").read())
sk = ckks.open_secret_context(sys.argv[2], p)
cts = [bytes.fromhex(c) for c in json.load(open(sys.argv[3]))]
print(int(ckks.decrypt(sk, cts)[0]))
"""
    (tmp_path / "p.json").write_bytes(params.to_json())
    out = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path / "p.json"), str(secret_path),
         str(tmp_path / "ct.json")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "7"
    assert sk.decryptions_left == 1  # the child's decryption is on the shared ledger
    assert ckks.decrypt(sk, ct)[0] == 7
    with pytest.raises(DecryptionBudgetExhausted):
        ckks.decrypt(sk, ct)
    again = ckks.open_secret_context(secret_path, params)  # a fresh load does not reset
    with pytest.raises(DecryptionBudgetExhausted):
        ckks.decrypt(again, ct)
    ledger = json.loads(ckks.ledger_path_for(secret_path).read_text())
    assert ledger["spent"] == 2 and ledger["budget"] == 2
    assert not list(tmp_path.glob("*.tmp*"))  # atomic replace left no temporary file


def test_secret_worker_counts_in_the_file_ledger(tmp_path: Path, params: HEParams) -> None:
    """Attack: restart the key holder's HE worker process to start its count again. With a
    ledger path the worker charges the shared file, so a new worker sees the spent budget
    and the refusal comes back typed (before: no budget at all)."""
    from secagg.service.keyfile import write_ckks_contexts

    secret_path, _ = write_ckks_contexts(tmp_path / "fed", params, decryption_budget=1)
    ledger = ckks.ledger_path_for(secret_path)
    secret = secret_path.read_bytes()
    with ckks.HEWorker(params, secret, role="secret", ledger_path=ledger) as w:
        ct = w.encrypt(np.full(params.n_slots, 3, np.uint64))
        assert w.decrypt(ct)[0] == 3
    with (
        ckks.HEWorker(params, secret, role="secret", ledger_path=ledger) as w,
        pytest.raises(DecryptionBudgetExhausted),
    ):
        w.decrypt(ct)


def _spend_many(path: str, key_id: bytes, tries: int) -> int:
    epoch = KeyEpoch(0, key_id, 16)
    ok = 0
    for _ in range(tries):
        try:
            FileLedger(path).spend(epoch)
            ok += 1
        except DecryptionBudgetExhausted:
            pass
    return ok


def test_file_ledger_never_overspends_under_concurrent_processes(tmp_path: Path) -> None:
    """Attack: several processes on one key race their decryptions so that each reads the
    count before the others write it. The exclusive lock serialises read-check-write: four
    processes trying 10 decryptions each on a budget of 16 get exactly 16 between them."""
    import multiprocessing

    key_id = bytes(range(16))
    path = str(tmp_path / "k.ledger")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        granted = pool.starmap(_spend_many, [(path, key_id, 10)] * 4)
    assert sum(granted) == 16
    assert json.loads(Path(path).read_text())["spent"] == 16


def test_ledger_of_another_key_refused(tmp_path: Path, params: HEParams) -> None:
    """A ledger that counts for another key (a rotated key copied over an old file) must not
    be reused silently: opening refuses with KeyEpochMismatch."""
    from secagg.service.keyfile import write_ckks_contexts

    secret_path, _ = write_ckks_contexts(tmp_path / "fed", params)
    FileLedger(ckks.ledger_path_for(secret_path)).reset(KeyEpoch.fresh(7))
    with pytest.raises(KeyEpochMismatch, match="another CKKS key"):
        ckks.open_secret_context(secret_path, params)


def test_keygen_ckks_writes_epoch_budget_and_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``secagg keygen --ckks --epoch/--decryption-budget``: both files carry the epoch, the
    ledger starts at zero, and a budget past the maximum is refused (exit 2, nothing written)."""
    from secagg.service.cli import main

    args = [
        "keygen",
        "--ckks",
        "--mode",
        "hybrid",
        "--clients",
        "6",
        "--dim",
        "300",
        "--max-weight",
        "1",
    ]
    out = tmp_path / "fed"
    assert main([*args, "--out", str(out), "--decryption-budget", "65"]) == 2
    assert list(tmp_path.iterdir()) == []
    assert main([*args, "--out", str(out), "--epoch", "3", "--decryption-budget", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["key_epoch"]["epoch"] == 3 and doc["key_epoch"]["budget"] == 5
    he = make_params(6, 300, mode="hybrid").he
    sk = ckks.open_secret_context(tmp_path / "fed.ckks-secret", he)
    server = ckks.load_server_context((tmp_path / "fed.ckks-server").read_bytes(), he)
    assert sk.epoch == server.epoch and sk.epoch.epoch == 3
    assert sk.decryptions_left == 5
    assert stat_mode(tmp_path / "fed.ckks-secret.ledger") == 0o600


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


# --- key epochs in ckks rounds ---------------------------------------------------------------


def _ckks_round(n: int = 3) -> tuple[RoundParams, dict[int, IdentityKey], dict[int, bytes]]:
    p = make_params(n, 40, mode="ckks")
    ids = {c: IdentityKey() for c in range(1, n + 1)}
    return p, ids, {c: k.public for c, k in ids.items()}


def test_ckks_client_refuses_a_round_of_another_epoch() -> None:
    """Attack: the server runs a round under an old (or foreign) key epoch to spend a key
    holder's budget on it. A client told the round's epoch refuses a context of another
    epoch (KeyEpochMismatch); the session id binds the epoch, so an honest server refuses
    uploads made under another epoch (a ProtocolViolation) before any decryption (before: accepted,
    and the sum failed only at decryption)."""
    p, ids, directory = _ckks_round()
    he = p.he
    old = ckks.make_secret_context(he, epoch=1)
    new = ckks.make_secret_context(he, epoch=2)
    sk_old = ckks.load_secret_context(old, he)
    server_new = ckks.load_server_context(ckks.make_public_context(new), he)
    with pytest.raises(KeyEpochMismatch, match="epoch 1"):
        CkksClient(1, ids[1], p, directory, np.zeros(40), 1, sk_old,
                   key_epoch=server_new.epoch.fingerprint)  # fmt: skip
    server = CkksServer(p, directory, server_new)
    client = CkksClient(1, ids[1], p, directory, np.zeros(40), 1, sk_old)
    (upload,) = client.start()
    with pytest.raises(ProtocolViolation, match="another session"):
        server.receive(1, upload.encode(), 0.0)


def test_ckks_client_without_budget_sends_nothing() -> None:
    """A key holder whose budget is spent refuses the round at start (nothing uploaded), and
    a result then cannot make it decrypt: DecryptionBudgetExhausted, not a misbehaviour."""
    p, ids, directory = _ckks_round()
    he = p.he
    sk = ckks.load_secret_context(ckks.make_secret_context(he, decryption_budget=1), he)
    probe = ckks.encrypt(sk, np.zeros(he.n_slots, np.uint64))
    ckks.decrypt(sk, probe)
    client = CkksClient(1, ids[1], p, directory, np.zeros(40), 1, sk)
    with pytest.raises(DecryptionBudgetExhausted):
        client.start()


def test_ckks_round_result_charges_each_key_holder_once() -> None:
    """A whole ckks round costs each key holder exactly one decryption of its budget."""
    p, ids, directory = _ckks_round()
    he = p.he
    secret = ckks.make_secret_context(he, decryption_budget=4)
    server = CkksServer(
        p, directory, ckks.load_server_context(ckks.make_public_context(secret), he)
    )
    holders = {c: ckks.load_secret_context(secret, he) for c in ids}
    clients = {
        c: CkksClient(c, ids[c], p, directory, np.full(40, 0.25), 1, holders[c]) for c in ids
    }
    out: list[tuple[int, Message]] = []
    for c, cl in clients.items():
        (m,) = cl.start()
        out += server.receive(c, m.encode(), 0.0)
    assert out and all(isinstance(m, EncryptedResult) for _, m in out)
    for c, m in out:
        clients[c].receive(m.encode(), 0.0)
        assert clients[c].result is not None
    assert all(h.decryptions_left == 3 for h in holders.values())


# --- hybrid blame ----------------------------------------------------------------------------


def _spoiled_hybrid_round(
    bad: dict[int, str],
) -> tuple[Harness, list[EncryptedInput], bytes]:
    """Run a 5-client hybrid round in which the clients in ``bad`` send signed uploads that
    are out of range (``"range"``) or under another key (``"key"``); return the harness,
    every upload as the server received it, and the session id."""
    h = Harness(5, 300, mode="hybrid")
    he = h.params.he
    assert h.he_secret is not None
    foreign = ckks.load_secret_context(ckks.make_secret_context(he), he)
    replies = h.start()
    for _ in ("advertise", "share"):
        replies = h.to_clients(h.stage(replies))
    uploads: list[EncryptedInput] = []
    for cid, msgs in replies.items():
        (m,) = msgs
        assert isinstance(m, EncryptedInput)
        if cid in bad:
            if bad[cid] == "range":  # a slot value no honest client can encrypt
                huge = np.zeros(he.n_ciphertexts * he.slots_per_ciphertext)
                huge[: he.n_slots] = 2.0**he.slot_sum_bits - 1
                n = he.slots_per_ciphertext
                cts = tuple(
                    h.he_secret._dump(
                        h.he_secret._encryptor.encrypt_symmetric(
                            h.he_secret._encode(huge[i * n : (i + 1) * n])
                        )
                    )
                    for i in range(he.n_ciphertexts)
                )
            else:
                cts = tuple(ckks.encrypt(foreign, np.ones(he.n_slots, np.uint64)))
            sig = h.identities[cid].sign(encrypted_input_payload(m.session_id, cid, cts))
            m = EncryptedInput(m.round_id, cid, m.session_id, cts, sig)
            replies[cid] = [m]
        uploads.append(m)
    for _ in ("masked", "consistency", "unmask"):
        replies = h.to_clients(h.stage(replies))
        if h.server.done:
            break
    return h, uploads, uploads[0].session_id


def test_hybrid_blame_names_out_of_range_and_wrong_key_senders() -> None:
    """Attack: a signed client spoils the hybrid sum with an out-of-range upload, another
    with an upload under a foreign key. Every honest key holder sees the sum fail; before the
    fix nobody could say who did it. Now key holders check the forwarded uploads one by one
    (each masked, so only uniform values are seen) and name exactly clients 2 and 4."""
    h, uploads, sid = _spoiled_hybrid_round({2: "range", 4: "key"})
    # Every key holder rejects the sum (it now tells the server, tests/test_hybrid_blame.py).
    assert all(any("does not decrypt" in w for w in h.clients[c].warnings) for c in h.ids)
    assert h.he_secret is not None
    checks = assign_checks([u.sender for u in uploads], [1, 3, 5])
    assert all(holder not in senders for holder, senders in checks.items())
    blamed: dict[int, str] = {}
    for _holder, senders in checks.items():
        mine = [u for u in uploads if u.sender in senders]
        key = h.he_secret.key_holder()
        report = check_uploads(key, h.params, sid, h.directory, mine)
        assert report.checked == tuple(u.sender for u in mine)
        assert key.decryptions_left == key.epoch.budget - len(mine)  # each one charged
        blamed.update(report.blamed)
    assert sorted(blamed) == [2, 4]
    assert "outside [0, 2^" in blamed[2]
    assert "not within" in blamed[4]


def test_hybrid_blame_refuses_forged_or_replayed_uploads() -> None:
    """Attack: the server frames an honest client by altering its upload (or replaying one
    from another session) in the blame request. The key holder verifies every signature over
    its own session id and reports the server, decrypting nothing."""
    h, uploads, sid = _spoiled_hybrid_round({2: "range"})
    assert h.he_secret is not None
    key = h.he_secret.key_holder()
    u = uploads[0]
    forged = EncryptedInput(u.round_id, u.sender, u.session_id, uploads[1].ciphertexts, u.signature)
    with pytest.raises(ServerMisbehaviour, match="not signed"):
        check_uploads(key, h.params, sid, h.directory, [forged])
    with pytest.raises(ServerMisbehaviour, match="another session"):
        check_uploads(key, h.params, bytes(32), h.directory, [u])
    with pytest.raises(ServerMisbehaviour, match="twice"):
        check_uploads(key, h.params, sid, h.directory, [u, u])
    assert key.decryptions_left == key.epoch.budget


def test_hybrid_blame_respects_the_budget() -> None:
    """A server that sends one key holder every upload cannot push it past its budget: the
    check is refused whole, before any decryption."""
    h, uploads, sid = _spoiled_hybrid_round({2: "range"})
    assert h.he_secret is not None
    he = h.params.he
    key = ckks.load_secret_context(ckks.make_secret_context(he, decryption_budget=2), he)
    with pytest.raises(DecryptionBudgetExhausted, match="2 of 2 decryptions left, 5 needed"):
        check_uploads(key, h.params, sid, h.directory, uploads)
    assert key.decryptions_left == 2


def test_ckks_mode_never_decrypts_a_single_upload() -> None:
    """In ckks mode an upload alone is a plain update: the blame check refuses outright."""
    p, _ids, directory = _ckks_round()
    he = p.he
    sk = ckks.load_secret_context(ckks.make_secret_context(he), he)
    with pytest.raises(ConfigurationError, match="plain update"):
        check_uploads(sk, p, bytes(32), directory, [])


def test_keyless_check_names_foreign_context_without_decrypting() -> None:
    """An upload made under other parameters (a foreign context) is named by the server's
    keyless check, before any key holder spends a decryption on it."""
    h = Harness(3, 300, mode="hybrid")
    he = h.params.he
    other = select_params(3, 8, 40_000, "hybrid")
    assert other.poly_modulus_degree != he.poly_modulus_degree or other != he
    foreign = ckks.load_secret_context(ckks.make_secret_context(other), other)
    cts = tuple(ckks.encrypt(foreign, np.ones(other.n_slots, np.uint64))[: he.n_ciphertexts])
    up = EncryptedInput(h.params.round_id, 2, bytes(32), cts, bytes(64))
    assert h.he_secret is not None
    reason = keyless_check(h.he_secret, up)
    assert reason is not None
    good = ckks.encrypt(h.he_secret, np.ones(he.n_slots, np.uint64))
    assert (
        keyless_check(
            h.he_secret, EncryptedInput(up.round_id, 2, up.session_id, tuple(good), up.signature)
        )
        is None
    )
