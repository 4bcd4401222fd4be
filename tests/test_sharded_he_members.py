"""What a group member of a sharded ``hybrid``/``ckks`` round sees (secagg/client.py
``group_round``, secagg/he_round.py, secagg/rounds/unmasking.py).

One group round of 4 clients runs in memory (no I/O, fixed clock): its parameters carry
``he_clients`` (sized for a sharded round of 12 clients in 3 groups), so the honest server
sends the members the contributors only and keeps the group's encrypted sum for the
coordinator. A member decrypts nothing in the group round; a server that hands it the
group's sum anyway is refused before any decryption (``GroupResultRefused``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from secagg import ckks
from secagg.client import SecAggClient
from secagg.errors import GroupResultRefused
from secagg.groups import sharded_he_clients
from secagg.he_round import CkksClient, CkksServer
from secagg.keys import IdentityKey
from secagg.messages import EncryptedResult, Message, ResultVerdict
from secagg.params import Mode, RoundParams, make_params
from secagg.quantize import lane_values
from secagg.server import SecAggServer, StageTimeouts

N_TOTAL, G, SIZE, DIM = 12, 3, 4, 6

_CONTEXTS: dict[str, tuple[bytes, bytes]] = {}


def _params(mode: str) -> RoundParams:
    he_clients = sharded_he_clients(Mode.parse(mode), N_TOTAL, G)
    return replace(make_params(SIZE, DIM, mode=mode), he_clients=he_clients)


def _contexts(mode: str) -> tuple[bytes, bytes]:
    if mode not in _CONTEXTS:
        secret = ckks.make_secret_context(_params(mode).he)
        _CONTEXTS[mode] = (secret, ckks.make_public_context(secret))
    return _CONTEXTS[mode]


Tamper = Callable[[Message, Any], Message]


def _group_round(
    mode: str, *, group_round: bool = True, tamper: Tamper | None = None
) -> tuple[Any, dict[int, Any], dict[int, BaseException], ckks.SecretContext, list[Message]]:
    """Run one group round in memory; return the server, the clients, each client's error,
    the members' (shared) secret context and every message the members sent."""
    p = _params(mode)
    secret_b, public_b = _contexts(mode)
    secret = ckks.load_secret_context(secret_b, p.he)
    server_ctx = ckks.load_server_context(public_b, p.he)
    ids = {c: IdentityKey() for c in range(1, SIZE + 1)}
    directory = {c: k.public for c, k in ids.items()}
    rng = np.random.default_rng(3)  # test data, no secrets
    xs = {c: rng.uniform(-1, 1, DIM) for c in ids}
    server: Any
    clients: dict[int, Any] = {}
    if mode == "ckks":
        server = CkksServer(p, directory, server_ctx, timeout=10.0, now=0.0)
        for c in ids:
            clients[c] = CkksClient(
                c, ids[c], p, directory, xs[c], 1, secret, rounding_key=bytes([c]) * 32,
                group_round=group_round,
            )  # fmt: skip
    else:
        server = SecAggServer(
            p, directory, timeouts=StageTimeouts.uniform(10.0), now=0.0, he_context=server_ctx
        )
        for c in ids:
            clients[c] = SecAggClient(
                c, ids[c], p, directory, xs[c], 1, rounding_key=bytes([c]) * 32,
                he_context=secret, group_round=group_round,
            )  # fmt: skip
    errors: dict[int, BaseException] = {}
    sent: list[Message] = []
    pending: list[tuple[int, Message]] = []

    def to_server(cid: int, msgs: list[Message]) -> None:
        for m in msgs:
            sent.append(m)
            pending.extend(server.receive(cid, m.encode(), 0.0))

    for c, client in clients.items():
        to_server(c, client.start(0.0))
    while pending:
        batch, pending[:] = list(pending), []
        for cid, msg in batch:
            if cid in errors:
                continue
            if tamper is not None:
                msg = tamper(msg, server)
            try:
                to_server(cid, clients[cid].receive(msg.encode(), 0.0))
            except GroupResultRefused as exc:
                errors[cid] = exc
    return server, clients, errors, secret, sent


def _expected(mode: str) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(3)
    xs = {c: rng.uniform(-1, 1, DIM) for c in range(1, SIZE + 1)}
    q = _params(mode).quant
    return sum(lane_values(xs[c], 1, q, bytes([c]) * 32) for c in xs)  # type: ignore[return-value]


@pytest.mark.parametrize("mode", ["hybrid", "ckks"])
def test_group_members_get_the_contributors_only(mode: str) -> None:
    """The group round ends for every member with the contributors, no lane sum and no
    decryption (the budget is untouched, no ``ResultVerdict`` is sent); the group's
    encrypted sum stays with the server, for the coordinator, and decrypts to the
    contributors' exact lane sums."""
    server, clients, errors, secret, sent = _group_round(mode)
    assert not errors
    budget = secret.epoch.budget
    assert secret.decryptions_left == budget  # no member decrypted anything
    assert not any(isinstance(m, ResultVerdict) for m in sent)
    for c in clients.values():
        assert c.done and c.result is not None
        assert c.result.contributors == tuple(range(1, SIZE + 1)) and c.result.sums.size == 0
    assert server.done and server.result is not None and server.result.ciphertexts
    p = _params(mode)
    from secagg.client import decrypt_lane_sums

    sums = decrypt_lane_sums(secret, p, server.result.ciphertexts)  # the key holders' view
    assert np.array_equal(sums[: p.quant.values(DIM)], _expected(mode))


def _hand_over_the_sum(msg: Message, server: Any) -> Message:
    if isinstance(msg, EncryptedResult):
        assert server.result is not None
        return replace(msg, ciphertexts=tuple(server.result.ciphertexts))
    return msg


@pytest.mark.parametrize("mode", ["hybrid", "ckks"])
def test_member_refuses_its_groups_encrypted_sum(mode: str) -> None:
    """Attack: the server (the adversary) sends the group's encrypted sum to its members,
    so each would learn its group's sum. Every member refuses it with
    ``GroupResultRefused`` before decrypting (its budget is untouched). Before the fix the
    members decrypted the group's sum as in a single round."""
    _, clients, errors, secret, _ = _group_round(mode, tamper=_hand_over_the_sum)
    assert sorted(errors) == sorted(clients)
    assert all(isinstance(e, GroupResultRefused) for e in errors.values())
    assert "decrypts the total only" in str(next(iter(errors.values())))
    assert secret.decryptions_left == secret.epoch.budget
    assert all(c.result is None for c in clients.values())


def test_group_results_carry_the_totals_key_epoch() -> None:
    """``GroupResults`` encodes the key epoch after the ciphertexts (and only with them):
    a masked result's bytes are unchanged by the new field."""
    from secagg.groups import GroupResults, GroupRow

    rows = (GroupRow(0, 4, 4, True, ""),)
    enc = GroupResults(bytes(16), True, "", "", (1, 2, 3, 4), 0, b"", rows, (b"ct",), b"e" * 16)
    back = GroupResults.decode(enc.encode())
    assert back == enc and back.key_epoch == b"e" * 16
    masked = GroupResults(bytes(16), True, "", "", (1, 2, 3, 4), 4, bytes(8), rows)
    assert replace(masked, key_epoch=b"x").encode() == masked.encode()
    assert GroupResults.decode(masked.encode()).key_epoch == b""
