"""Group assignment of sharded rounds (secagg/groups.py) and the local sharded engine."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.errors import ConfigurationError, PolicyViolation, ServerMisbehaviour
from secagg.groups import (
    AssignmentAborted,
    GroupCoordinator,
    GroupJoinClient,
    JoinRoster,
    NonceOpen,
    NonceOpens,
    assign,
    assignment_seed,
    check_group_invite,
    group_round_id,
    join_commitment,
    verify_transcript,
)
from secagg.keys import IdentityKey
from secagg.params import make_params
from secagg.policy import ClientPolicy
from secagg.prg import Purpose, keystream_bytes
from secagg.simulate import SimulationConfig
from secagg.simulate_sharded import LocalEngine, UnsupportedShardedMode, simulate_sharded

RID = bytes(range(16))
POLICY = ClientPolicy(dropout=0.01, corrupt=0.05)


def _stream(label: bytes, n: int) -> list[bytes]:
    """n fixed 32-byte values from a keyed ChaCha20 stream (reproducible test randomness)."""
    key = hashlib.sha256(b"test/" + label).digest()
    data = keystream_bytes(key, Purpose.GRAPH, 32 * n)
    return [data[32 * i : 32 * i + 32] for i in range(n)]


def _keys(n: int, label: bytes = b"keys") -> dict[int, IdentityKey]:
    return {c: IdentityKey(k) for c, k in zip(range(1, n + 1), _stream(label, n), strict=True)}


def _run_join(n: int, groups: int, *, nonces: dict[int, bytes] | None = None):  # type: ignore[no-untyped-def]
    keys = _keys(n)
    directory = {c: k.public for c, k in keys.items()}
    coord = GroupCoordinator(RID, groups, directory)
    clients = {
        c: GroupJoinClient(c, keys[c], RID, groups, directory, nonce=(nonces or {}).get(c))
        for c in keys
    }
    out = []
    for c, cl in clients.items():
        out += coord.receive(c, cl.start(), 0.0)
    opens = [(c, clients[c].receive_roster(d)) for c, d in out]
    out = []
    for c, d in opens:
        out += coord.receive(c, d, 0.0)
    assignments = {c: clients[c].receive_opens(d) for c, d in out}
    return coord, clients, assignments, directory


def test_assignment_is_balanced_and_every_client_computes_the_same() -> None:
    coord, _clients, assignments, _ = _run_join(103, 10)
    asg = coord.assignment
    assert asg is not None
    sizes = [len(g) for g in asg.groups]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103
    assert sorted(c for g in asg.groups for c in g) == list(range(1, 104))
    assert all(a == asg for a in assignments.values())
    # Reproducible from the transcript alone: the seed is the hash of the roster and nonces.
    roster = JoinRoster.decode(coord.roster_bytes)
    opens = NonceOpens.decode(coord.opens_bytes)
    seed = assignment_seed(roster.digest(), [o.nonce for o in opens.opens])
    assert seed == asg.seed
    assert assign(tuple(range(1, 104)), 10, seed) == asg.groups


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), data=st.data(), seed=st.binary(min_size=32, max_size=32))
def test_assign_partitions_into_balanced_groups(n: int, data: st.DataObject, seed: bytes) -> None:
    groups = data.draw(st.integers(1, n))
    ids = tuple(range(5, 5 + 3 * n, 3))
    out = assign(ids, groups, seed)
    assert len(out) == groups
    assert sorted(c for g in out for c in g) == list(ids)
    assert {len(g) for g in out} <= {n // groups, -(-n // groups)}
    assert out == assign(ids, groups, seed)


def test_assign_refuses_more_groups_than_clients() -> None:
    with pytest.raises(ConfigurationError, match="groups=5"):
        assign((1, 2, 3), 5, bytes(32))


def test_missing_opening_aborts_naming_the_client() -> None:
    """A roster member that withholds its opening (the last opener who dislikes the
    outcome) aborts the assignment, named: no subset of openings is ever used."""
    keys = _keys(12)
    directory = {c: k.public for c, k in keys.items()}
    coord = GroupCoordinator(RID, 3, directory, timeout=5.0)
    clients = {c: GroupJoinClient(c, keys[c], RID, 3, directory) for c in keys}
    out = []
    for c, cl in clients.items():
        out += coord.receive(c, cl.start(), 0.0)
    for c, d in out:
        if c != 7:
            coord.receive(c, clients[c].receive_roster(d), 1.0)
    assert coord.assignment is None
    coord.tick(10.0)
    assert isinstance(coord.error, AssignmentAborted)
    assert "clients [7]" in coord.error.reason


def test_too_few_joiners_abort() -> None:
    keys = _keys(8)
    directory = {c: k.public for c, k in keys.items()}
    coord = GroupCoordinator(RID, 3, directory, min_group=3, timeout=5.0)
    assert coord.tick(6.0) == []
    assert isinstance(coord.error, AssignmentAborted)
    assert "0 clients joined" in coord.error.reason


def _predicted_seed(roster_hash: bytes, n: int, own_nonce: bytes) -> bytes:
    """The best seed the attacker can compute when it joins: the honest nonces are hidden
    behind their commitments, so it puts zeros in their place. If the seed ignored the
    nonces (a seed fixed by the roster alone), this would be the real seed."""
    return assignment_seed(roster_hash, [own_nonce] + [bytes(32)] * (n - 1))


def test_grinding_keys_and_nonce_does_not_steer_the_group() -> None:
    """Attack: a client (the last to join, id 1) sees every other commitment, then grinds
    16 (identity key, nonce) candidates and joins with the one that lands it in group 0 under
    any seed it can compute at that time (``_predicted_seed``). Under a seed fixed by the
    roster alone that prediction is the real seed and it wins in nearly every trial (the
    test fails when assignment_seed drops the nonces); under the
    commit-reveal seed it lands in group 0 at the base rate 1/G, because the honest nonces
    are hidden behind their commitments until the roster is closed.

    Statistics: 200 trials, G=4, so the success count is Binomial(200, 1/4) (mean 50,
    sd 6.1) when the attack fails; the bound 75 is 4.1 sd above the mean (false alarm
    below 1e-4). All randomness is a keyed ChaCha20 stream, so the test is deterministic.
    """
    n, groups, trials, candidates = 20, 4, 200, 16
    honest_keys = _keys(n, b"honest")
    honest = [c for c in honest_keys if c != 1]
    wins = naive_wins = 0
    landed = [0] * groups
    for trial in range(trials):
        t = trial.to_bytes(4, "big")
        honest_nonces = dict(zip(honest, _stream(b"nonce" + t, len(honest)), strict=True))
        entries_h = {}
        for c in honest:
            commit = join_commitment(RID, c, honest_nonces[c])
            cl = GroupJoinClient(c, honest_keys[c], RID, groups, {}, nonce=honest_nonces[c])
            entries_h[c] = cl.sent
            assert commit in cl.sent
        best = None
        cand_keys = _stream(b"cand-key" + t, candidates)
        cand_nonces = _stream(b"cand-nonce" + t, candidates)
        for k, nonce in zip(cand_keys, cand_nonces, strict=True):
            me = GroupJoinClient(1, IdentityKey(k), RID, groups, {}, nonce=nonce)
            roster = _roster({**entries_h, 1: me.sent}, groups)
            naive = assign(
                tuple(range(1, n + 1)), groups, _predicted_seed(roster.digest(), n, nonce)
            )
            if 1 in naive[0]:
                best = (me, roster)
                break
        if best is None:
            me = GroupJoinClient(
                1, IdentityKey(cand_keys[0]), RID, groups, {}, nonce=cand_nonces[0]
            )
            best = (me, _roster({**entries_h, 1: me.sent}, groups))
        me, roster = best
        pred = _predicted_seed(roster.digest(), n, me.nonce)
        naive_wins += 1 in assign(tuple(range(1, n + 1)), groups, pred)[0]
        nonces = {**honest_nonces, 1: me.nonce}
        seed = assignment_seed(roster.digest(), [nonces[c] for c in range(1, n + 1)])
        real = assign(tuple(range(1, n + 1)), groups, seed)
        g = next(i for i, members in enumerate(real) if 1 in members)
        landed[g] += 1
        wins += g == 0
    assert naive_wins >= 190  # the attacker almost always finds a candidate it predicts wins
    assert wins <= 75, landed  # and is back at the base rate 1/G against commit-reveal
    assert min(landed) >= 25, landed  # every group gets its share of the attacker's trials


def _roster(sent: dict[int, bytes], groups: int) -> JoinRoster:
    from secagg.groups import JoinCommit

    return JoinRoster(RID, groups, tuple(JoinCommit.decode(sent[c]) for c in sorted(sent)))


def _invite(asg, cid, groups):  # type: ignore[no-untyped-def]
    g = asg.group_of(cid)
    members = asg.groups[g]
    params = make_params(len(members), 8, dropout=0.01, corrupt=0.05)
    return g, members, replace(params, round_id=group_round_id(asg.seed, g))


def test_honest_group_invite_is_accepted() -> None:
    _coord, _, assignments, _ = _run_join(60, 3)
    _g, members, params = _invite(assignments[5], 5, 3)
    assert check_group_invite(assignments[5], 5, params, members, POLICY) == members


def test_wrong_grouping_from_the_coordinator_is_refused() -> None:
    """Attack: the coordinator (or an aggregator) hands a client a group round whose roster
    is not the group the coin toss assigned: a member swapped for a client of its choice.
    Without check_group_invite's roster comparison the client would join it."""
    _, _, assignments, _ = _run_join(60, 3)
    asg = assignments[5]
    g, members, params = _invite(asg, 5, 3)
    other = next(c for c in asg.groups[(g + 1) % 3])
    swapped = [*[m for m in members if m != next(m for m in members if m != 5)], other]
    with pytest.raises(ServerMisbehaviour, match="differs from the assignment"):
        check_group_invite(asg, 5, params, swapped, POLICY)
    with pytest.raises(ServerMisbehaviour, match="differs from the assignment"):
        check_group_invite(asg, 5, params, list(members)[:-1], POLICY)


def test_group_round_of_another_assignment_is_refused() -> None:
    """Attack: replaying a group round (round id) made for another assignment."""
    _, _, assignments, _ = _run_join(60, 3)
    asg = assignments[5]
    g, members, params = _invite(asg, 5, 3)
    stale = replace(params, round_id=group_round_id(bytes(32), g))
    with pytest.raises(ServerMisbehaviour, match="round id"):
        check_group_invite(asg, 5, stale, members, POLICY)


def test_group_below_min_contributors_is_refused_by_the_client() -> None:
    """Attack: the coordinator picks G so large that groups fall below the client's
    min_contributors (a sum of few inputs reveals them). The client's own policy refuses
    the group round; nothing the coordinator checks is relied on."""
    _, _, assignments, _ = _run_join(40, 10)  # groups of 4
    asg = assignments[3]
    _g, members, params = _invite(asg, 3, 10)
    strict = ClientPolicy(dropout=0.01, corrupt=0.05, min_contributors=5, min_clients=5)
    with pytest.raises(PolicyViolation, match="n=4"):
        check_group_invite(asg, 3, params, members, strict)


def test_forged_opening_is_refused() -> None:
    """Attack: the coordinator replaces one client's nonce after seeing the others (to pick
    the seed). The nonce no longer opens the commitment fixed in the roster: refused."""
    coord, clients, _, directory = _run_join(30, 3)
    opens = NonceOpens.decode(coord.opens_bytes)
    o = opens.opens[4]
    forged = NonceOpen(o.round_id, o.sender, o.roster_hash, bytes(32), o.signature)
    bad = NonceOpens(
        opens.round_id, opens.roster_hash, (*opens.opens[:4], forged, *opens.opens[5:])
    )
    cl = clients[1]
    with pytest.raises(ServerMisbehaviour, match="does not open its commitment"):
        verify_transcript(1, cl.nonce, cl.sent, coord.roster_bytes, bad.encode(), directory)
    dropped = NonceOpens(opens.round_id, opens.roster_hash, opens.opens[1:])
    with pytest.raises(ServerMisbehaviour, match="exactly the roster"):
        verify_transcript(1, cl.nonce, cl.sent, coord.roster_bytes, dropped.encode(), directory)


def test_roster_without_own_commitment_is_refused() -> None:
    """Attack: the coordinator swaps a client's commitment for one of its own making."""
    coord, clients, _, directory = _run_join(30, 3)
    roster = JoinRoster.decode(coord.roster_bytes)
    other = GroupJoinClient(2, _keys(30)[2], RID, 3, directory)
    entries = tuple(
        JoinRoster.decode(_roster({2: other.sent}, 3).encode()).entries[0] if e.sender == 2 else e
        for e in roster.entries
    )
    bad = JoinRoster(RID, 3, entries).encode()
    with pytest.raises(ServerMisbehaviour, match="as sent"):
        GroupJoinClient(2, _keys(30)[2], RID, 3, directory).receive_roster(bad)
    with pytest.raises(ServerMisbehaviour, match="as sent"):
        clients[2].receive_roster(bad)  # before it opens its nonce
    left_out = JoinRoster(RID, 3, tuple(e for e in roster.entries if e.sender != 2)).encode()
    with pytest.raises(ServerMisbehaviour, match="as sent"):
        clients[2].receive_roster(left_out)


# ---------------------------------------------------------------- local sharded engine

CFG = SimulationConfig(
    clients=60, dim=8, dropout=0.0, tolerated_dropout=0.01, tolerated_corrupt=0.05
)


def test_local_sharded_round_is_exact() -> None:
    r = simulate_sharded(CFG, 3)
    assert r["status"] == "completed" and r["exact"] is True and r["survivors"] == 60
    assert r["engine"] == "local" and r["workers"] == 1
    assert [g["size"] for g in r["groups"]] == [20, 20, 20]
    assert all(g["status"] == "completed" and g["survivors"] == 20 for g in r["groups"])


def test_failed_group_is_recorded_and_the_rest_published() -> None:
    r = simulate_sharded(CFG, 3, LocalEngine(fail=frozenset({1})))
    assert r["status"] == "completed" and r["partial"] is True and r["exact"] is True
    assert r["survivors"] == 40
    assert r["groups"][1]["status"] == "aborted"
    assert "worker killed" in r["groups"][1]["reason"]


def test_policy_abort_on_any_group_abort() -> None:
    r = simulate_sharded(CFG, 3, LocalEngine(fail=frozenset({2})), on_group_abort="abort")
    assert r["status"] == "aborted" and "groups [2] aborted" in r["abort"]["reason"]


def test_no_sum_below_min_contributors() -> None:
    r = simulate_sharded(CFG, 3, LocalEngine(fail=frozenset({0, 1, 2})))
    assert r["status"] == "aborted" and "0 contributors" in r["abort"]["reason"]


def test_dp_sharded_is_refused_with_a_typed_error() -> None:
    # hybrid/ckks are sharded now (tests/test_sharded_he.py); DP stays single-round only
    with pytest.raises(UnsupportedShardedMode, match="single rounds only"):
        simulate_sharded(replace(CFG, dp_epsilon=1.0), 3)


def test_cli_engine_local_json_and_flag_errors(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from secagg.service.cli import main

    args = ["simulate", "--clients", "30", "--dim", "4", "--dropout", "0", "--json"]
    args += ["--tolerate-dropout", "0.01", "--tolerate-corrupt", "0.05"]
    assert main([*args, "--engine", "local", "--groups", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["engine"] == "local" and len(r["groups"]) == 3 and r["exact"] is True
    assert main([*args, "--groups", "3"]) == 2  # --groups without --engine


def test_engine_ray_without_ray_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from secagg.service.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    args = ["simulate", "--clients", "30", "--dim", "4", "--engine", "ray", "--groups", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'secagg[ray]'" in err[0]


def test_wrong_member_list_is_refused_by_the_clients_inside_the_group_round() -> None:
    """Attack: the coordinator hands an aggregator group 0 with one member swapped for a
    client of group 1. Every simulated client, in the group round itself, recomputes its
    group from the transcript and refuses; the group round gets no message and aborts, so
    no sum of this grouping exists. Without the clients' checks (verify_transcript,
    check_group_invite) it would complete."""
    from secagg.simulate_sharded import (
        GroupOutcome,
        GroupRound,
        GroupSpec,
        Member,
        _group_params,
        _join,
    )

    coord, clients, keys, _ = _join(CFG, 3, list(range(1, 61)), 3)
    asg = coord.assignment
    assert asg is not None
    wrong = [*asg.groups[0][1:], asg.groups[1][0]]
    params = _group_params(CFG, len(wrong), group_round_id(asg.seed, 0))
    members = tuple(
        Member(c, keys[c].public, keys[c].private_bytes, clients[c].nonce, clients[c].sent, 1, 255)
        for c in wrong
    )
    spec = GroupSpec(
        0, params.encode(), coord.roster_bytes, coord.opens_bytes, 10.0, 0, 0.01, 0.05, 3, members
    )
    rnd = GroupRound(spec.encode())
    assert set(rnd.refused) == set(wrong)
    # the member left out is absent from the group's directory, the intruder's own group
    # is not this one: each client names what the coordinator got wrong
    assert all(why.startswith("ServerMisbehaviour") for why in rnd.refused.values())
    out = GroupOutcome.decode(rnd.run())
    assert not out.completed and out.contributors == ()
