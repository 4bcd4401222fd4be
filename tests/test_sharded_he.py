"""Sharded ``hybrid`` and ``ckks`` rounds (local engine): group ciphertexts summed at the
coordinator with the keyless context (secagg/sharded_he.py, secagg/simulate_sharded.py).

"Exact" here means what it means for a single HE round: every decrypted slot value lies
within ROUNDING_TOLERANCE (0.25) of an integer (checked by ``ckks.decrypt``, which refuses
otherwise) and the rounded lane sums equal the integer lane sums of the contributors'
quantized inputs bit for bit; the float error left is the quantization step only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from secagg import ckks
from secagg.errors import ConfigurationError, MalformedMessage, ServerMisbehaviour
from secagg.groups import check_group_invite, group_round_id, sharded_he_clients
from secagg.params import Mode, RoundParams, make_params
from secagg.policy import ClientPolicy
from secagg.sharded_he import EncryptedGroupSum, GroupCiphertextRefused, add_group_sums
from secagg.simulate import SimulationConfig
from secagg.simulate_sharded import (
    GroupOutcome,
    GroupRound,
    LocalEngine,
    UnsupportedShardedMode,
    simulate_sharded,
)
from secagg.wire import Writer

CFG = SimulationConfig(
    clients=30, dim=12, dropout=0.0, tolerated_dropout=0.01, tolerated_corrupt=0.05, seed=5
)


@pytest.mark.parametrize("mode", ["hybrid", "ckks"])
def test_sharded_he_round_is_exact(mode: str) -> None:
    # three clients drop (before share_keys, masked_input, unmasking): in hybrid the groups
    # they were in add their pairwise masks' removal as a plaintext to the group sum
    cfg = replace(CFG, mode=mode, dropout=0.1, tolerated_dropout=0.3, max_weight=3)
    r = simulate_sharded(cfg, 3)
    assert r["status"] == "completed" and r["exact"] is True, r.get("abort")
    assert r["mode"] == mode and len(r["groups"]) == 3 and not r["partial"]
    assert all(g["status"] == "completed" for g in r["groups"])
    assert r["survivors"] == sum(g["survivors"] for g in r["groups"]) >= 27
    assert r["max_abs_error"] <= r["quantization_step"] * 3 * 30  # weights up to 3
    # the CKKS parameters are sized for the whole round, not one group
    want = 30 if mode == "ckks" else 30 + 3 - 1
    assert r["he"]["he_clients"] == want == sharded_he_clients(Mode.parse(mode), 30, 3)


@pytest.mark.parametrize("mode", ["hybrid", "ckks"])
def test_killed_worker_group_is_aborted_and_the_rest_published(mode: str) -> None:
    cfg = replace(CFG, mode=mode)
    r = simulate_sharded(cfg, 3, LocalEngine(fail=frozenset({1})))
    assert r["status"] == "completed" and r["partial"] is True and r["exact"] is True
    assert r["survivors"] == 20 and r["groups"][1]["status"] == "aborted"
    assert "worker killed" in r["groups"][1]["reason"]
    r = simulate_sharded(cfg, 3, LocalEngine(fail=frozenset({1})), on_group_abort="abort")
    assert r["status"] == "aborted" and "groups [1] aborted" in r["abort"]["reason"]
    r = simulate_sharded(cfg, 3, LocalEngine(fail=frozenset({0, 1, 2})))
    assert r["status"] == "aborted" and "0 contributors" in r["abort"]["reason"]


def test_the_coordinator_sums_with_a_keyless_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator's context is the public one: no secret key in SEAL or TenSEAL, no
    decryptor. Handing it the key holders' context instead is refused outright, so the test
    fails if the coordinator were ever given the secret."""
    import secagg.simulate_sharded as sim

    seen: list[Any] = []
    real = sim.add_group_sums

    def spy(ctx: Any, mode: Mode, sums: Any) -> Any:
        seen.append(ctx)
        return real(ctx, mode, sums)

    monkeypatch.setattr(sim, "add_group_sums", spy)
    r = simulate_sharded(replace(CFG, mode="hybrid"), 3)
    assert r["status"] == "completed" and r["exact"] is True
    assert len(seen) == 1
    ctx = seen[0]
    assert type(ctx) is ckks.ServerContext and not ctx._ts.is_private()
    assert not hasattr(ctx, "_decryptor") and not hasattr(ctx, "_encryptor")

    # the coordinator given the secret context: refused before anything is added
    def given_secret(ctx: Any, mode: Mode, sums: Any) -> Any:
        params = ctx.params
        secret = ckks.load_secret_context(ckks.make_secret_context(params), params)
        return real(secret, mode, sums)

    monkeypatch.setattr(sim, "add_group_sums", given_secret)
    with pytest.raises(ConfigurationError, match="never hold a secret key"):
        simulate_sharded(replace(CFG, mode="hybrid"), 3)


def _contexts(params: RoundParams) -> tuple[ckks.SecretContext, ckks.ServerContext]:
    secret = ckks.make_secret_context(params.he)
    return (
        ckks.load_secret_context(secret, params.he),
        ckks.load_server_context(ckks.make_public_context(secret), params.he),
    )


def _group_sum(secret: ckks.SecretContext, group: int, values: int, epoch: bytes) -> Any:
    he = secret.params
    cts = ckks.sum_ciphertexts(
        secret, [ckks.encrypt(secret, np.full(he.n_slots, values, dtype=np.uint64))]
    )
    return EncryptedGroupSum(group, epoch, 1, tuple(cts))


def test_group_ciphertexts_under_another_context_are_refused() -> None:
    """Attack: a worker returns its group's "sum" under another CKKS key (it claims that
    key's epoch) or under other parameters (claiming the round's epoch). The coordinator
    refuses it naming the group, in one line, before adding anything. Without the epoch
    check the first would be added and only the key holders' decryption would fail."""
    params = replace(make_params(12, 4, mode="ckks"), he_clients=12)
    secret, server = _contexts(params)
    fp = server.epoch.fingerprint
    good = [_group_sum(secret, g, 7, fp) for g in (0, 2)]
    cts, count = add_group_sums(server, Mode.CKKS, good)
    assert count == 2
    out = ckks.decrypt(secret, cts)
    assert np.array_equal(out, np.full(params.he.n_slots, 14, dtype=np.uint64))

    other_key, _ = _contexts(params)
    bad = _group_sum(other_key, 1, 7, other_key.epoch.fingerprint)
    with pytest.raises(GroupCiphertextRefused, match="group 1 summed under CKKS key") as e:
        add_group_sums(server, Mode.CKKS, [*good, bad])
    assert e.value.group == 1 and "\n" not in str(e.value)

    other = replace(make_params(12, 4000, mode="ckks"), he_clients=12)  # another N
    assert other.he.poly_modulus_degree != params.he.poly_modulus_degree
    other_secret, _ = _contexts(other)
    forged = _group_sum(other_secret, 1, 7, fp)
    forged = replace(forged, ciphertexts=forged.ciphertexts[:1])
    with pytest.raises(GroupCiphertextRefused, match="group 1's ciphertexts do not match") as e:
        add_group_sums(server, Mode.CKKS, [*good, forged])
    assert "\n" not in str(e.value)
    with pytest.raises(GroupCiphertextRefused, match="group 1 claims 12 contributors"):
        add_group_sums(server, Mode.CKKS, [*good, replace(good[0], group=1, contributors=12)])


class _TamperingEngine(LocalEngine):
    """Runs the groups, then group 1's worker swaps its result for a sum under another key."""

    def run_groups(self, specs: Any) -> dict[int, bytes | str]:
        out = super().run_groups(specs)
        raw = out[1]
        assert isinstance(raw, bytes)
        o = GroupOutcome.decode(raw)
        params = RoundParams.decode(_spec_params(specs[1]))
        other, _ = _contexts(params)
        swapped = _group_sum(other, 1, 1, other.epoch.fingerprint).encode()
        blob = o.encrypted.encode()
        assert raw.endswith(blob)
        out[1] = raw[: len(raw) - len(blob) - 4] + Writer().var(swapped).getvalue()
        return out


def _spec_params(spec: bytes) -> bytes:
    from secagg.simulate_sharded import GroupSpec

    return GroupSpec.decode(spec).params


def test_a_refused_group_result_is_an_aborted_group() -> None:
    """The coordinator validates what each worker returns: group 1's ciphertext under
    another key is refused, recorded as an aborted group with the reason, and the policy
    publishes the exact sum of the other two."""
    r = simulate_sharded(replace(CFG, mode="ckks"), 3, _TamperingEngine())
    assert r["groups"][1]["status"] == "aborted"
    assert "result refused: group 1 summed under CKKS key" in r["groups"][1]["reason"]
    assert r["status"] == "completed" and r["partial"] is True and r["exact"] is True
    assert r["survivors"] == 20


def test_group_round_sized_for_one_group_is_refused_by_the_client() -> None:
    """Attack: the coordinator sizes a group round's CKKS parameters for the group alone
    (he_clients = 0: lane headroom and carries for 10 clients), so the sum of the three
    group ciphertexts could overflow a lane and decrypt to a wrong total. Every client
    recomputes the total from the transcript and refuses; it failed before the check in
    check_group_invite."""
    from secagg.simulate_sharded import _group_params, _join

    cfg = replace(CFG, mode="hybrid")
    coord, _, _, _ = _join(cfg, 3, list(range(1, 31)), 3)
    asg = coord.assignment
    assert asg is not None
    members = asg.groups[0]
    policy = ClientPolicy(dropout=0.01, corrupt=0.05)
    rid = group_round_id(asg.seed, 0)
    good = _group_params(cfg, len(members), rid, 32)
    assert check_group_invite(asg, members[0], good, members, policy) == members
    for he_clients in (len(members), 30):
        small = replace(good, he_clients=he_clients)
        with pytest.raises(ServerMisbehaviour, match="need at least 32"):
            check_group_invite(asg, members[0], small, members, policy)


def test_he_clients_travels_in_the_round_parameters() -> None:
    """``he_clients`` is bound into the parameters' digest (so into every session id);
    encodings without it are unchanged, and a malformed section is refused."""
    base = make_params(10, 4, mode="hybrid")
    assert RoundParams.decode(base.encode()) == base
    sized = replace(base, he_clients=32)
    assert RoundParams.decode(sized.encode()) == sized
    assert sized.encode().startswith(base.encode()) and sized.digest() != base.digest()
    assert sized.he.n_clients == 32 and base.he.n_clients == 10
    with pytest.raises(MalformedMessage):
        RoundParams.decode(sized.encode() + b"\x00")
    with pytest.raises(MalformedMessage):
        RoundParams.decode(base.encode() + b"\x02\x00\x00\x00\x00")
    with pytest.raises(MalformedMessage):  # he_clients below n
        RoundParams.decode(base.encode() + b"\x02\x00\x00\x00\x05")
    with pytest.raises(ConfigurationError):
        replace(make_params(10, 4), he_clients=32)  # masked has no CKKS parameters


def test_group_round_withholds_the_group_ciphertext_from_its_clients() -> None:
    """The group's encrypted sum goes to the coordinator only: no key holder of the group
    decrypts (or is charged for) the group sum."""
    import secagg.simulate_sharded as sim

    seen: list[GroupRound] = []

    class Keep(LocalEngine):
        def run_groups(self, specs: Any) -> dict[int, bytes | str]:
            out: dict[int, bytes | str] = {}
            for g, spec in specs.items():
                rnd = sim.GroupRound(spec)
                out[g] = rnd.run()
                seen.append(rnd)
            return out

    r = simulate_sharded(replace(CFG, mode="ckks"), 3, Keep())
    assert r["status"] == "completed" and r["exact"] is True
    for rnd in seen:
        for c in rnd.clients.values():
            he = c._ctx.he
            assert he is not None and he.ledger.spent(he.epoch) == 0


def test_spoil_and_dp_stay_single_round_only() -> None:
    with pytest.raises(UnsupportedShardedMode, match="single rounds only"):
        simulate_sharded(replace(CFG, mode="hybrid", spoil=(1,)), 3)
    with pytest.raises(UnsupportedShardedMode, match="single rounds only"):
        simulate_sharded(replace(CFG, mode="hybrid", dp_epsilon=1.0), 3)


def test_cli_simulate_sharded_he_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from secagg.service.cli import main

    args = ["simulate", "--clients", "24", "--dim", "4", "--dropout", "0", "--json"]
    args += ["--tolerate-dropout", "0.01", "--tolerate-corrupt", "0.05"]
    for mode in ("hybrid", "ckks"):
        assert main([*args, "--engine", "local", "--groups", "3", "--mode", mode]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["mode"] == mode and len(r["groups"]) == 3 and r["exact"] is True
        assert r["he"]["he_clients"] == sharded_he_clients(Mode.parse(mode), 24, 3)
