"""Blame in a hybrid round over real gRPC on loopback, with secret-context files whose
decryption budgets persist in their ledgers (the SDK's path form of ``he_context``)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secagg import ckks
from secagg import client as core_client
from secagg.errors import DecryptionBudgetExhausted, RoundAborted
from secagg.messages import EncryptedInput, encrypted_input_payload
from secagg.params import make_params
from secagg.prg import StreamMask
from secagg.server import StageTimeouts
from secagg.service.client import Policy

from .helpers import Deployment, run_threads

DEADLINES = StageTimeouts.uniform(20.0)
BAD = 2


def _secret_files(tmp_path: Path, n: int, dim: int) -> tuple[list[Path], bytes]:
    """One secret-context file per client (mode 0600) with a fresh ledger beside it."""
    he = make_params(n, dim, mode="hybrid").he
    secret = ckks.make_secret_context(he, decryption_budget=16)
    public = ckks.make_public_context(secret)
    epoch = ckks.load_server_context(public, he).epoch
    paths = []
    for c in range(1, n + 1):
        p = tmp_path / f"c{c}.ckks-secret"
        p.write_bytes(secret)
        p.chmod(0o600)
        ckks.FileLedger(ckks.ledger_path_for(p)).reset(epoch)
        paths.append(p)
    return paths, public


def test_grpc_hybrid_round_names_an_out_of_range_sender(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: over the real service, client 2 uploads signed ciphertexts of out-of-range
    slots. Before the fix the server published the spoiled sum, every key holder failed
    to decrypt it and the round was recorded as completed with nobody named. Now the
    clients reject it, check the uploads the server forwards and the round aborts naming
    client 2 (its dropout reason too); each holder's decryptions are in its file ledger."""
    n, dim = 5, 200
    names = deployment.enroll(n)
    paths, public = _secret_files(tmp_path, n, dim)
    rid = deployment.create(names, dim, DEADLINES, mode="hybrid", he_context=public)
    honest = core_client.encrypted_input

    def spoiled(c: Any, session_id: bytes, masks: list[StreamMask]) -> EncryptedInput:
        msg = honest(c, session_id, masks)
        if c.cid != BAD:
            return msg
        he, sk = c.params.he, c.he
        huge = np.zeros(he.n_ciphertexts * he.slots_per_ciphertext)
        huge[: he.n_slots] = 2.0**he.slot_sum_bits - 1
        k = he.slots_per_ciphertext
        cts = tuple(
            sk._dump(sk._encryptor.encrypt_symmetric(sk._encode(huge[i * k : (i + 1) * k])))
            for i in range(he.n_ciphertexts)
        )
        sig = c.identity.sign(encrypted_input_payload(session_id, c.cid, cts))
        return EncryptedInput(msg.round_id, c.cid, session_id, cts, sig)

    monkeypatch.setattr(core_client, "encrypted_input", spoiled)
    policy = Policy(allowed_modes=frozenset({"hybrid"}))
    xs = {c: np.full(dim, 0.25) for c in range(1, n + 1)}

    def job(cid: int) -> Any:
        with deployment.client(names[cid - 1], policy=policy) as cl:
            joined = cl.join(rid)
            return cl.participate(
                joined, xs[cid], 1, rounding_key=secrets.token_bytes(32), he_context=paths[cid - 1]
            )

    out = run_threads({str(c): (lambda c=c: job(c)) for c in xs})
    assert all(o.result is None for o in out.values())
    for c in (1, 3, 4, 5):
        err = out[str(c)].error
        assert isinstance(err, RoundAborted), err
        assert "clients [2]" in err.reason
    assert deployment.admin is not None
    st = deployment.admin.wait(rid)
    assert st.status == "aborted" and st.abort_stage == "blame"
    assert "clients [2]" in st.abort_reason
    (drop,) = [d for d in st.dropouts if d.client_id == BAD]
    assert "does not decrypt to in-range lanes" in drop.reason
    he = make_params(n, dim, mode="hybrid").he
    spent = [16 - ckks.open_secret_context(p, he).decryptions_left for p in paths]
    assert sum(spent) == n + 2 * n  # the sum once each, then every upload twice


def test_sdk_path_context_keeps_the_budget_across_rounds(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Attack: the server runs round after round to spend more decryptions than a key
    holder's budget allows. Given context bytes, the SDK loaded a fresh context (and a fresh
    count) each call, so the budget never held across rounds. Given the path, the count
    lives in the ledger file: with a budget of 1, the second round is refused before
    anything is sent (DecryptionBudgetExhausted)."""
    n, dim = 3, 40
    names = deployment.enroll(n)
    he = make_params(n, dim, mode="hybrid").he
    secret = ckks.make_secret_context(he, decryption_budget=1)
    public = ckks.make_public_context(secret)
    epoch = ckks.load_server_context(public, he).epoch
    paths = []
    for c in range(1, n + 1):
        p = tmp_path / f"b{c}.ckks-secret"
        p.write_bytes(secret)
        p.chmod(0o600)
        ckks.FileLedger(ckks.ledger_path_for(p)).reset(epoch)
        paths.append(p)
    policy = Policy(allowed_modes=frozenset({"hybrid"}))

    def round_with(he_context: Any) -> dict[str, Any]:
        rid = deployment.create(names, dim, DEADLINES, mode="hybrid", he_context=public)

        def job(cid: int) -> Any:
            with deployment.client(names[cid - 1], policy=policy) as cl:
                return cl.aggregate(rid, np.full(dim, 0.5), he_context=he_context(cid))

        return run_threads({str(c): (lambda c=c: job(c)) for c in range(1, n + 1)})

    first = round_with(lambda c: paths[c - 1])
    assert all(o.result is not None for o in first.values()), first
    second = round_with(lambda c: paths[c - 1])
    assert all(isinstance(o.error, DecryptionBudgetExhausted) for o in second.values()), second
    # the bytes form counts for one call only: the budget does not hold (documented)
    third = round_with(lambda c: secret)
    assert all(o.result is not None for o in third.values()), third
