"""Sharded ``hybrid``/``ckks`` rounds over real gRPC (loopback, port 0, SQLite).

The server is the front door; each of the 3 groups (12 clients) runs an ordinary round of
the mode, the front door adds the group ciphertexts with its keyless context and sends the
encrypted total, which every client decrypts. "Exact": the decrypted total rounds to the
contributors' integer lane sums bit for bit (values within 0.25 of integers, checked by
``ckks.decrypt``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secagg import ckks
from secagg.groups import sharded_he_clients
from secagg.messages import SEND_ORDER, EncryptedInput, Message
from secagg.params import Mode, make_params
from secagg.quantize import lane_values
from secagg.service.client import Policy

from .helpers import Deployment, run_threads
from .test_sharded_grpc import _front

N, G, DIM = 12, 3, 6
POLICY = Policy(allowed_modes=frozenset({"masked", "hybrid", "ckks"}))


@pytest.fixture
def d(deployment: Deployment) -> Deployment:
    """The running server of tests/service/conftest.py, by the short name used here."""
    return deployment


def _contexts(mode: str, max_weight: int = 1) -> tuple[bytes, bytes]:
    """The operator's keygen for a sharded round: CKKS sized for all N plus the groups."""
    he_clients = sharded_he_clients(Mode.parse(mode), N, G)
    base = make_params(N, DIM, mode=mode, max_weight=max_weight)
    he = replace(base, he_clients=he_clients).he
    secret = ckks.make_secret_context(he)
    return secret, ckks.make_public_context(secret)


def _run(
    d: Deployment,
    names: list[str],
    rid: bytes,
    secret: bytes,
    hook: Callable[[int], Callable[[Message], bool] | None] = lambda cid: None,
    contexts: dict[int, ckks.SecretContext] | None = None,
) -> tuple[dict[int, Any], dict[int, np.ndarray[Any, Any]], dict[int, bytes]]:
    """Every client joins and participates; ``contexts`` collects each key holder's loaded
    secret context (its own decryption count)."""
    rng = np.random.default_rng(11)  # test data, no secrets
    xs = {c: rng.uniform(-1, 1, DIM) for c in range(1, N + 1)}
    keys = {c: secrets.token_bytes(32) for c in xs}
    held = contexts if contexts is not None else {}

    def job(cid: int, name: str) -> Callable[[], Any]:
        def go() -> Any:
            with d.client(name, policy=POLICY) as c:
                joined = c.join(rid)
                assert joined.groups == G
                held[cid] = ckks.load_secret_context(secret, joined.params.he)
                return c.participate(
                    joined, xs[cid], 1, rounding_key=keys[cid], on_send=hook(cid),
                    he_context=held[cid],
                )  # fmt: skip

        return go

    out = run_threads({str(i): job(i, n) for i, n in enumerate(names, start=1)})
    return {int(k): v for k, v in out.items()}, xs, keys


def _expected(
    xs: dict[int, Any], keys: dict[int, bytes], ids: Any, max_weight: int = 1
) -> np.ndarray[Any, Any]:
    spec = make_params(N, DIM, max_weight=max_weight).quant
    return sum(lane_values(xs[c], 1, spec, keys[c]) for c in ids)  # type: ignore[return-value]


@pytest.mark.parametrize("mode", ["hybrid", "ckks"])
def test_sharded_he_round_over_grpc_is_exact(d: Deployment, mode: str) -> None:
    names = d.enroll(N)
    secret, server_ctx = _contexts(mode)
    rid = d.create(names, DIM, groups=G, mode=mode, he_context=server_ctx)
    held: dict[int, ckks.SecretContext] = {}
    out, xs, keys = _run(d, names, rid, secret, contexts=held)
    errors = {c: o.error for c, o in out.items() if o.error is not None}
    assert not errors
    want = _expected(xs, keys, range(1, N + 1))
    for o in out.values():
        assert o.result.contributors == tuple(range(1, N + 1))
        assert np.array_equal(o.result.sums, want)
    # one decryption of each key holder's budget: the total; no member saw its group's sum
    # (before the fix every member also decrypted its group's sum: two)
    assert sorted(held) == list(range(1, N + 1))
    assert all(h.decryptions_left == h.epoch.budget - 1 for h in held.values())
    front = _front(d, rid).front
    # the front door published ciphertexts only, summed with a keyless context
    assert front.result is not None and front.result.sums is None and front.result.ciphertexts
    assert type(front.he) is ckks.ServerContext and not front.he._ts.is_private()
    assert [r.completed for r in front.rows] == [True] * G


def test_hybrid_group_below_threshold_aborts_and_the_rest_is_published(d: Deployment) -> None:
    """Two members of group 0 go silent before uploading: group 0 aborts; the other two
    groups' ciphertexts are added and every client of theirs decrypts their exact sum."""
    names = d.enroll(N)
    secret, server_ctx = _contexts("hybrid")
    rid = d.create(names, DIM, groups=G, mode="hybrid", he_context=server_ctx)

    def hook(cid: int) -> Callable[[Message], bool]:
        def on_send(m: Message) -> bool:
            asg = _front(d, rid).front.assignment
            assert asg is not None
            doomed = asg.groups[0][:2]
            return not (cid in doomed and SEND_ORDER[m.TYPE] >= SEND_ORDER[EncryptedInput.TYPE])

        return on_send

    out, xs, keys = _run(d, names, rid, secret, hook)
    front = _front(d, rid).front
    asg = front.assignment
    assert asg is not None
    rest = [c for c in range(1, N + 1) if c not in asg.groups[0]]
    want = _expected(xs, keys, rest)
    for c in rest:
        assert out[c].error is None, out[c].error
        assert out[c].result.contributors == tuple(rest)
        assert np.array_equal(out[c].result.sums, want)
    assert not front.rows[0].completed and front.rows[0].reason
    assert front.partial is True


def test_cli_keygen_groups_and_round_create(
    d: Deployment,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``keygen --ckks --groups G`` sizes the contexts for a sharded round;
    ``round create --groups G --mode hybrid --he-context`` opens it; a context made for a
    single round is refused by the CLI, naming the groups."""
    import json

    from secagg.service.cli import main

    from .helpers import TOKEN

    monkeypatch.setenv("SECAGG_ADMIN_TOKEN", TOKEN)
    names = ",".join(d.enroll(9))
    kg = ["keygen", "--ckks", "--mode", "hybrid", "--clients", "9", "--dim", "4"]
    assert main([*kg, "--groups", "3", "--out", str(tmp_path / "sh")]) == 0
    assert main([*kg, "--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    base = ["round", "create", "--job", "hj", "--participants", names, "--dim", "4"]
    base += ["--mode", "hybrid", "--groups", "3", "--server", d.target]
    assert main([*base, "--he-context", str(tmp_path / "single.ckks-server")]) == 2
    assert "groups 3 (keygen: 1)" in capsys.readouterr().err
    assert main([*base, "--he-context", str(tmp_path / "sh.ckks-server")]) == 0
    rid = bytes.fromhex(json.loads(capsys.readouterr().out)["round_id"])
    front = _front(d, rid)
    assert front.groups == 3 and front.front.he is not None
    assert front.params.he_clients == sharded_he_clients(Mode.HYBRID, 9, 3)
    assert main(["round", "abort", rid.hex(), "--reason", "test", "--server", d.target]) == 0


def test_front_door_refuses_a_group_ciphertext_under_another_key() -> None:
    """Attack: a group's aggregator returns a sum under another CKKS key. The front door's
    keyless check refuses it (key epoch), records the group as aborted with the reason,
    and publishes the other groups' encrypted total, which decrypts to their sum. Without
    the check the total would not decrypt and the whole round would be lost."""
    from secagg.groups import GroupResults
    from secagg.rounds.base import RoundResult
    from secagg.service.sharded import FrontDoorCore, GroupEnd

    he_clients = sharded_he_clients(Mode.CKKS, N, G)
    params = replace(make_params(N, DIM, mode="ckks"), he_clients=he_clients)
    secret_b, public_b = _contexts("ckks")
    secret = ckks.load_secret_context(secret_b, params.he)
    server = ckks.load_server_context(public_b, params.he)
    other_b, _ = _contexts("ckks")
    other = ckks.load_secret_context(other_b, params.he)
    directory = {c: bytes(32) for c in range(1, N + 1)}
    front = FrontDoorCore(
        params, directory, G, on_group_abort="publish", min_group=3, timeout=10.0, now=0.0,
        he=server,
    )  # fmt: skip
    ones = np.ones(params.he.n_slots, dtype=np.uint64)

    def end(g: int, ctx: ckks.SecretContext, ids: tuple[int, ...]) -> GroupEnd:
        cts = ckks.sum_ciphertexts(ctx, [ckks.encrypt(ctx, ones) for _ in ids])
        res = RoundResult(ids, ciphertexts=tuple(cts))
        return GroupEnd(g, 4, res, "", ctx.epoch.fingerprint)

    ends = [
        end(0, secret, (1, 2, 3, 4)),
        end(1, other, (5, 6, 7, 8)),
        end(2, secret, (9, 10, 11, 12)),
    ]
    out = front.finish(ends, 3)
    assert front.rows[1].completed is False and "result refused" in front.rows[1].reason
    assert front.partial is True and front.result is not None
    msg = GroupResults.decode(out[0][1].encode())
    assert msg.completed and msg.contributors == (1, 2, 3, 4, 9, 10, 11, 12) and not msg.sums
    total = ckks.decrypt(secret, msg.ciphertexts)
    assert np.array_equal(total, 8 * ones)


def _fails_with(out: dict[int, Any], text: str) -> None:
    from secagg.errors import ServerMisbehaviour

    for c, o in out.items():
        assert isinstance(o.error, ServerMisbehaviour), (c, o.error)
        assert text in str(o.error), (c, o.error)


@pytest.mark.parametrize("mode", ["hybrid", "ckks"])
def test_a_groups_sum_passed_off_as_the_total_is_refused(
    d: Deployment, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: the front door (the adversary) publishes group 0's encrypted sum as "the
    total" under the full contributor list and group lines, so group 0's sum would be
    revealed to every client. In a weighted round (``max_weight`` 4, every weight 1) the
    decrypted weight lane is 4, not the 12..48 that 12 contributors sum to: every client
    refuses it. Without the weight check the clients accepted group 0's sum as the total."""
    from secagg.service.sharded import FrontDoorCore

    real = FrontDoorCore._add_encrypted

    def only_group_0(self: FrontDoorCore, ends: Any) -> Any:
        ends, _ = real(self, ends)
        first = next(e for e in ends if e.group == 0)
        return ends, tuple(first.result.ciphertexts)

    monkeypatch.setattr(FrontDoorCore, "_add_encrypted", only_group_0)
    names = d.enroll(N)
    secret, server_ctx = _contexts(mode, max_weight=4)
    rid = d.create(names, DIM, groups=G, mode=mode, he_context=server_ctx, max_weight=4)
    out, _, _ = _run(d, names, rid, secret)
    _fails_with(out, "carries weight 4; 12 contributors of weight 1..4 sum to 12..48")


def test_a_total_under_another_key_epoch_is_not_decrypted(
    d: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: the front door labels the encrypted total with another key epoch (a total
    added under another key would burn a decryption of every key holder's budget and fail).
    Every client refuses it before decrypting: its budget is untouched. Without the epoch
    check the clients decrypted it (and accepted it: here the content is the real total)."""
    from secagg.groups import GroupResults
    from secagg.service.sharded import FrontDoorCore

    real = FrontDoorCore._broadcast

    def relabel(self: FrontDoorCore, msg: GroupResults) -> Any:
        return real(self, replace(msg, key_epoch=bytes(16)) if msg.ciphertexts else msg)

    monkeypatch.setattr(FrontDoorCore, "_broadcast", relabel)
    names = d.enroll(N)
    secret, server_ctx = _contexts("ckks")
    rid = d.create(names, DIM, groups=G, mode="ckks", he_context=server_ctx)
    held: dict[int, ckks.SecretContext] = {}
    out, _, _ = _run(d, names, rid, secret, contexts=held)
    _fails_with(out, "added under CKKS key " + "00" * 16)
    assert all(h.decryptions_left == h.epoch.budget for h in held.values())
