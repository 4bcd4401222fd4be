"""Client-side policy: every client checks the round's parameters and every set the server
hands back against its own :class:`~secagg.policy.ClientPolicy` (issue 11, items 1 and 2)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import graph, kernels, shamir
from secagg.client import SecAggClient
from secagg.errors import (
    ConfigurationError,
    InfeasibleParameters,
    LayoutMismatch,
    PolicyViolation,
    ServerMisbehaviour,
)
from secagg.keys import AgreementKey, IdentityKey
from secagg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    MaskedInput,
    UnmaskRequest,
    UnmaskShares,
)
from secagg.params import Mode, make_params
from secagg.policy import ClientPolicy, _graph_check
from secagg.prg import Purpose, StreamMask, derive_key
from secagg.rounds.unmasking import pair_sign
from tests.helpers import TEST_POLICY, Harness

# --- the split-view attack (n=6, k=5, t=3) ------------------------------------------------


def _split_view_attack(h: Harness) -> dict[int, np.ndarray[Any, Any]]:
    """Run the split-view attack of issue 11 against ``h``'s clients and return the lane
    values the server recovers for every client.

    The server runs the first three stages honestly, then shows survivor set {1,2,3} to
    clients 1-3 and {4,5,6} to clients 4-6. Each half signs its own set (t=3 signatures),
    reveals self-mask seed shares of its own members and mask-key shares of the other half:
    the server holds t shares of both secrets of every client and strips every mask.
    """
    replies = h.start()
    replies = h.to_clients(h.stage(replies))  # roster -> share keys
    replies = h.to_clients(h.stage(replies))  # share delivery -> masked inputs
    masked = {c: m for c, ms in replies.items() for m in ms if isinstance(m, MaskedInput)}
    assert sorted(masked) == h.ids
    c1 = h.clients[1]._ctx
    rid, sid, roster = c1.rid, c1.session_id, c1.roster
    halves = ((1, 2, 3), (4, 5, 6))
    seed_sh: dict[int, dict[int, bytes]] = {c: {} for c in h.ids}
    key_sh: dict[int, dict[int, bytes]] = {c: {} for c in h.ids}
    for mine, other in (halves, halves[::-1]):
        sigs = []
        for c in mine:
            (sig,) = h.clients[c].receive(ConsistencyRequest(rid, 0, sid, mine))
            assert isinstance(sig, ConsistencySignature)
            sigs.append((c, sig.signature))
        for c in mine:
            (out,) = h.clients[c].receive(UnmaskRequest(rid, 0, sid, mine, other, tuple(sigs)))
            assert isinstance(out, UnmaskShares)
            for owner, s in out.seed_shares:
                seed_sh[owner][c] = s
            for owner, s in out.key_shares:
                key_sh[owner][c] = s
    t = h.params.threshold
    recovered = {}
    for u in h.ids:
        seed, sk = shamir.reconstruct_many([seed_sh[u], key_sh[u]], t)
        masks = [StreamMask(derive_key(seed, sid, Purpose.SELF_MASK, u), Purpose.SELF_MASK, -1)]
        for v in h.ids:
            if v != u:
                shared = AgreementKey(sk).agree(roster[v].mask_pk)
                key = derive_key(shared, sid, Purpose.PAIR_MASK, min(u, v), max(u, v))
                masks.append(StreamMask(key, Purpose.PAIR_MASK, -pair_sign(u, v)))
        acc = masked[u].words.copy()
        kernels.add_masks(acc, masks)
        q = h.params.quant
        recovered[u] = kernels.unpack(acc, q, q.values(h.params.dim))
    return recovered


def test_split_view_attack_unmasks_every_input_without_the_client_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attack of issue 11 as it worked before the client-side check: with the check
    switched off (the code before this fix had none), a server that picks n=6, k=5, t=3
    recovers all six inputs exactly. This documents what the next test defends."""
    monkeypatch.setattr(ClientPolicy, "check_params", lambda self, params: None)
    h = Harness(6, 8, neighbors="all", threshold=3)
    assert h.params.degree == 5 and h.params.threshold == 3 and h.params.warnings
    recovered = _split_view_attack(h)
    for u in h.ids:
        np.testing.assert_array_equal(recovered[u], h.expected_sums([u]))


def test_split_view_parameters_are_refused_by_every_client() -> None:
    """Split-view attack (n=6, k=5, t=3): every honest client refuses the round's parameters
    at construction, before it has produced a single message, so nothing is revealed.
    Failed before the fix: clients accepted the parameters and the attack above worked."""
    params = make_params(6, 8, neighbors="all", threshold=3)
    ids = {c: IdentityKey() for c in range(1, 7)}
    directory = {c: k.public for c, k in ids.items()}
    for c in ids:
        with pytest.raises(PolicyViolation, match=r"n=6, k=5, t=3: 2t=6 <= k\+1=6"):
            SecAggClient(c, ids[c], params, directory, np.zeros(8))


@pytest.mark.parametrize(
    "policy",
    [
        ClientPolicy(),
        TEST_POLICY,
        ClientPolicy(security_bits=1, failure_bits=1, corrupt=0.0, dropout=0.0),
        ClientPolicy(adversary="semi-honest", corrupt=0.0, dropout=0.0),
    ],
)
def test_two_t_above_k_plus_one_is_not_negotiable(policy: ClientPolicy) -> None:
    """Split views need only ``2t <= k + 1``: no policy, however weak its targets, accepts
    it (semi-honest included). Failed before the fix: nothing refused it."""
    with pytest.raises(PolicyViolation, match="2t="):
        policy.check_params(make_params(6, 8, neighbors="all", threshold=3))
    with pytest.raises(PolicyViolation, match="2t="):
        policy.check_params(make_params(40, 8, neighbors=10, threshold=5))


def test_weak_sparse_graph_is_refused_with_numbers() -> None:
    """A server-chosen sparse graph that misses the client's 2^-40 target is refused, and the
    error names n, k, t and the bits. Failed before the fix: only a server-side warning."""
    params = make_params(60, 8, neighbors=10, threshold=6)
    with pytest.raises(PolicyViolation, match=r"n=60, k=10, t=6 gives 2\^-0\.0 security"):
        ClientPolicy().check_params(params)


def test_policy_refuses_mode_size_bits_weight() -> None:
    """Mode, size, bits and weight cap of the round are the client's to accept."""
    p = make_params(10, 100, bits=16, max_weight=1000)
    ClientPolicy().check_params(p)
    for policy, match in [
        (ClientPolicy(allowed_modes=frozenset({Mode.HYBRID})), "mode masked"),
        (ClientPolicy(expected_dim=99), "dim=100"),
        (ClientPolicy(max_dim=50), "max_dim=50"),
        (ClientPolicy(min_bits=20), "bits=16"),
        (ClientPolicy(max_weight=100), "max_weight=1000"),
        (ClientPolicy(min_clients=11), "n=10"),
    ]:
        with pytest.raises(PolicyViolation, match=match):
            policy.check_params(p)


def test_policy_never_admits_fewer_than_three_contributors() -> None:
    """``min_contributors`` below 3 is refused: a sum of two reveals each input."""
    with pytest.raises(ConfigurationError, match="min_contributors=2"):
        ClientPolicy(min_contributors=2)
    with pytest.raises(InfeasibleParameters):
        ClientPolicy(dropout=0.6, corrupt=0.5)


# --- no sum of too few inputs -------------------------------------------------------------


def test_survivor_set_of_two_is_refused_before_signing() -> None:
    """Sum of two: in a 3-client round (t=2, which the finder accepts with no corrupt
    client) the server reports a survivor set of two. Before the fix the two clients signed,
    revealed their shares, and each learnt the other's input from the sum; now each refuses
    before signing."""
    h = Harness(3, 4, neighbors="all", threshold=2, dropout=0.0, corrupt=0.0, policy=TEST_POLICY)
    h.run(drops={"masked": {3}})
    assert h.server.result is None
    refusals = [e for e in h.errors if isinstance(e, PolicyViolation)]
    assert len(refusals) == 2 and all("survivor list has 2" in str(e) for e in refusals)
    assert all(h.clients[c].error is not None for c in (1, 2))


def test_roster_of_two_is_refused_before_sharing() -> None:
    """A roster of two (one advertised client dropped by the server) is refused before any
    share is dealt. Failed before the fix: t=2 rosters of two were accepted."""
    h = Harness(3, 4, neighbors="all", threshold=2, dropout=0.0, corrupt=0.0, policy=TEST_POLICY)
    h.run(drops={"advertise": {3}})
    assert h.server.result is None
    assert any("the roster has 2" in str(e) for e in h.errors)


def test_result_with_too_few_contributors_is_refused() -> None:
    """A result naming two contributors is refused even after signing (defence in depth:
    the contributors must be the signed set and number ``max(t, min_contributors)``)."""
    from secagg.policy import check_contributors

    p = make_params(5, 4, neighbors="all", threshold=3, dropout=0.0, corrupt=0.0)
    with pytest.raises(PolicyViolation, match="contributor set has 2"):
        check_contributors((1, 2), p, TEST_POLICY)
    with pytest.raises(PolicyViolation, match="repeats"):
        check_contributors((1, 1, 2), p, TEST_POLICY)
    check_contributors((1, 2, 3), p, TEST_POLICY)


def test_policy_violation_is_server_misbehaviour() -> None:
    """The refusal ends the client's round like any other server misbehaviour."""
    assert issubclass(PolicyViolation, ServerMisbehaviour)
    assert issubclass(PolicyViolation, ConfigurationError)


# --- layout -------------------------------------------------------------------------------


def test_layout_fingerprint_mismatch_refused_before_sending() -> None:
    """Two sites with the same length but another layout: a client whose fingerprint
    differs from the round's refuses at construction. Failed before the fix: no field."""
    fp, other = bytes(32), bytes([1]) * 32
    p = make_params(5, 4, layout=fp)
    me = IdentityKey()
    SecAggClient(1, me, p, {1: me.public}, np.zeros(4), layout=fp)
    with pytest.raises(LayoutMismatch):
        SecAggClient(1, me, p, {1: me.public}, np.zeros(4), layout=other)


# --- properties ---------------------------------------------------------------------------


@st.composite
def _round(draw: st.DrawFn) -> tuple[int, int, int, float, float]:
    n = draw(st.integers(3, 120))
    full = draw(st.booleans()) or n < 4
    k = n - 1 if full else 2 * draw(st.integers(1, (n - 2) // 2))
    t = draw(st.integers(1, k + 1))
    dropout = draw(st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.3]))
    corrupt = draw(st.sampled_from([0.0, 0.05, 0.1, 0.2]))
    return n, k, t, dropout, corrupt


@settings(max_examples=150, deadline=None)
@given(_round(), st.sampled_from(["active", "semi-honest"]))
def test_client_accepts_exactly_when_finder_targets_met(
    r: tuple[int, int, int, float, float], adversary: str
) -> None:
    """For random (n, k, t, dropout, corrupt) a client accepts exactly when the server's
    parameter finder says both targets are met (and, semi-honest, ``2t > k + 1``)."""
    n, k, t, dropout, corrupt = r
    policy = ClientPolicy(dropout=dropout, corrupt=corrupt, adversary=adversary)  # type: ignore[arg-type]
    gp = graph.choose_parameters(
        n,
        dropout=dropout,
        corrupt=corrupt,
        degree=k,
        threshold=t,
        adversary=adversary,  # type: ignore[arg-type]
    )
    expect = gp.meets_target and 2 * t > k + 1
    if adversary == "active":
        assert expect == gp.meets_target  # the floor is implied by the active bound
    params = make_params(n, 4, neighbors=k, threshold=t, dropout=dropout, corrupt=corrupt)
    try:
        policy.check_params(params)
        accepted = True
    except PolicyViolation:
        accepted = False
    assert accepted == expect


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 400), st.sampled_from([0.0, 0.1, 0.3]), st.sampled_from([0.0, 0.1]))
def test_automatic_parameters_pass_the_same_policy(n: int, dropout: float, corrupt: float) -> None:
    """Parameters the finder chooses automatically are accepted by clients with the same
    assumptions: the check refuses attacks, not honest rounds."""
    try:
        p = make_params(n, 4, dropout=dropout, corrupt=corrupt)
    except InfeasibleParameters:
        return
    ClientPolicy(dropout=dropout, corrupt=corrupt).check_params(p)


def test_check_is_cached() -> None:
    """The bound is evaluated once per distinct (n, k, t, targets)."""
    _graph_check.cache_clear()
    p = make_params(1000, 4)
    for _ in range(3):
        ClientPolicy().check_params(p)
    info = _graph_check.cache_info()
    assert info.misses == 1 and info.hits == 2


def test_ckks_key_holder_refuses_to_decrypt_a_sum_of_two() -> None:
    """Sum of two in ``ckks``: with t=2 and ``publish_after=2`` the server publishes the
    encrypted sum of two uploads. Before the fix a key holder decrypted it (the check was
    ``>= t``) and learnt the other contributor's input; now it refuses before decrypting."""
    from secagg import ckks
    from secagg.he_round import CkksClient, CkksServer
    from secagg.messages import EncryptedResult

    params = make_params(3, 8, mode="ckks", threshold=2, dropout=0.0, corrupt=0.0)
    he = params.he
    secret_bytes = ckks.make_secret_context(he)
    secret = ckks.load_secret_context(secret_bytes, he)
    server_ctx = ckks.load_server_context(ckks.make_public_context(secret_bytes), he)
    ids = {c: IdentityKey() for c in (1, 2, 3)}
    directory = {c: k.public for c, k in ids.items()}
    server = CkksServer(params, directory, server_ctx, publish_after=2)
    clients = {c: CkksClient(c, ids[c], params, directory, np.ones(8), 1, secret) for c in ids}
    out = []
    for c in (1, 2):
        out += server.receive(c, clients[c].start()[0].encode(), 0.0)
    assert server.done
    for c, msg in out:
        assert isinstance(msg, EncryptedResult) and msg.contributors == (1, 2)
        with pytest.raises(PolicyViolation, match="contributor set has 2"):
            clients[c].receive(msg.encode())
        assert clients[c].result is None


def test_sdk_policy_delegates_and_keeps_the_floor() -> None:
    """The SDK ``Policy`` builds the core policy from its fields; it cannot lower the floor."""
    from secagg.service.client import Policy
    from secagg.service.errors import PolicyRefused

    core = Policy(dropout=0.1, corrupt=0.05, allowed_modes=frozenset({"masked"})).core()
    assert (core.dropout, core.corrupt, core.allowed_modes) == (0.1, 0.05, frozenset({Mode.MASKED}))
    assert core.min_contributors == 3 and core.min_clients == 3
    with pytest.raises(PolicyRefused, match="min_contributors=2"):
        Policy(min_contributors=2).core()
