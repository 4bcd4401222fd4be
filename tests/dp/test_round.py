"""Distributed DP inside the masked round: policy, wire, and attacks (docs/dp.md).

Each attack test names the attack it catches; each failed before its defence (checked by
removing the defence, see the report in changes/dpround.md).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

pytest.importorskip("dp_accounting")

from secagg.client import SecAggClient
from secagg.dp.calibration import calibrate
from secagg.dp.encoding import clip_l2
from secagg.dp.policy import DPOffer, DPPolicy
from secagg.dp.xnoise import make_plan
from secagg.errors import ConfigurationError, MalformedMessage, PolicyViolation, ServerMisbehaviour
from secagg.messages import (
    ConsistencyRequest,
    Message,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    decode_message,
)
from secagg.params import RoundParams, make_params
from secagg.rounds.base import Stage
from tests.helpers import TEST_POLICY, Harness

N, T, DIM = 10, 7, 60
DP_POLICY = DPPolicy(max_epsilon=3.0, delta=1e-5, max_rounds=10, max_clip=1.0)
POLICY = dataclasses.replace(TEST_POLICY, dp=DP_POLICY)


@functools.cache
def offer(epsilon: float = 3.0, rounds: int = 10) -> DPOffer:
    cal = calibrate(epsilon, 1e-5, rounds, n_clients=N, min_survivors=T, dim=DIM, clip=1.0)
    return DPOffer.from_calibration(cal)


@functools.cache
def binary_offer() -> DPOffer:
    """``xi = 20%``: a binary plan (``m = 2`` removable components); 9 survivors remove
    component 1 and keep component 0, a subset and not a prefix (``offer()`` at ``xi = 5%``
    is the ladder with a level at every survivor count, 4 components against binary's 5)."""
    cal = calibrate(3.0, 1e-5, 10, n_clients=N, min_survivors=T, dim=DIM, clip=1.0, max_excess=0.2)
    return DPOffer.from_calibration(cal)


def harness(dp: DPOffer | None = None, policy: object = POLICY) -> Harness:
    return Harness(N, DIM, neighbors="all", threshold=T, dp=dp or offer(), policy=policy)


def step(h: Harness, silent: dict[str, set[int]] | None = None) -> dict[str, list[Message]]:
    """Run a round, returning every client message by stage name."""
    silent = silent or {}
    seen: dict[str, list[Message]] = {}
    gone: set[int] = set()
    replies = h.start()
    for stage in ("advertise", "share", "masked", "consistency", "unmask", "verdict"):
        gone |= silent.get(stage, set())
        seen[stage] = [m for c, ms in replies.items() if c not in gone for m in ms]
        out = h.stage(replies, silent=gone)
        replies = h.to_clients(out, skip=gone)
        if h.server.done:
            break
    return seen


def test_dp_round_releases_noisy_sum_to_server_and_clients() -> None:
    h = harness()
    step(h, {"masked": {3}})
    res = h.server.result
    assert res is not None, h.server.error
    assert res.dp is not None and res.dp["contributors"] == N - 1
    assert res.dp["removed_components"] == offer().plan.level(N - 1)
    exact = sum(clip_l2(h.xs[c], 1.0) for c in res.contributors)
    assert res.weighted_sum is not None and res.weighted_sum.shape == (DIM,)
    # noise of ~target_std per coordinate: far below 10 std, far above zero
    err = float(np.std(res.weighted_sum - exact))
    assert 0.5 * res.dp["target_std"] < err < 2 * res.dp["target_std"]  # type: ignore[operator]
    for c in res.contributors:
        got = h.clients[c].result
        assert got is not None
        assert np.array_equal(got.sums, res.sums)
        assert np.array_equal(got.weighted_sum, res.weighted_sum)
        assert got.total_weight == N - 1


def test_params_wire_carries_dp_and_old_format_still_parses() -> None:
    dp = make_params(N, DIM, neighbors="all", threshold=T, dp=offer())
    back = RoundParams.decode(dp.encode())
    assert back == dp and back.dp == offer()
    plain = dataclasses.replace(dp, dp=None)
    assert RoundParams.decode(plain.encode()).dp is None  # the pre-DP encoding
    assert plain.digest() != dp.digest()  # the session id binds the offer
    with pytest.raises(MalformedMessage):
        RoundParams.decode(plain.encode() + b"\x02")
    doctored = dp.encode()[:-8] + bytes(8)  # xi = 0.0: no plan has it
    with pytest.raises(MalformedMessage):
        RoundParams.decode(doctored)


def test_dp_messages_round_trip() -> None:
    h = harness()
    seen = step(h)
    for stage in ("share", "unmask"):
        for m in seen[stage]:
            assert isinstance(m, ShareKeys | UnmaskShares)
            assert decode_message(m.encode()) == m
    sk = seen["share"][0]
    assert isinstance(sk, ShareKeys) and sk.dp_components == offer().plan.components - 1
    um = seen["unmask"][0]
    assert isinstance(um, UnmaskShares) and um.dp_shares


def test_dp_only_in_masked_or_hybrid_unweighted_rounds_for_its_own_shape() -> None:
    with pytest.raises(ConfigurationError, match="masked and hybrid rounds only, not ckks"):
        make_params(N, DIM, mode="ckks", neighbors="all", threshold=T, dp=offer())
    with pytest.raises(ConfigurationError, match="unweighted"):
        make_params(N, DIM, neighbors="all", threshold=T, max_weight=10, dp=offer())
    with pytest.raises(ConfigurationError, match="the round has dim"):
        make_params(N, DIM + 1, neighbors="all", threshold=T, dp=offer())
    with pytest.raises(ConfigurationError, match="the round has dim"):
        make_params(N, DIM, neighbors="all", threshold=T + 1, dp=offer())


def test_attack_server_hands_weaker_offer_every_client_refuses_before_sending() -> None:
    """Attack: the server offers less noise than the clients' budget allows (epsilon 30 for a
    budget of 3, or the target variance halved). Every client refuses at construction, so
    it sends nothing (failed before ClientPolicy.check_params called check_offer)."""
    weak = offer(epsilon=30.0)
    halved = dataclasses.replace(offer(), plan=make_plan(offer().plan.target_variance // 2, N, T))
    for bad in (weak, halved):
        params = make_params(N, DIM, neighbors="all", threshold=T, dp=bad)
        h = Harness(N, DIM, neighbors="all", threshold=T)  # identities and directory only
        for c in h.ids:
            with pytest.raises(PolicyViolation, match="epsilon"):
                SecAggClient(c, h.identities[c], params, h.directory, h.xs[c], policy=POLICY)


def test_attack_server_drops_dp_or_stretches_rounds_refused() -> None:
    """Attack: the server runs the round without DP, or claims the job has more rounds than
    the client's policy (budget exhaustion), so the client would be charged past its budget
    (failed before the DP policy check)."""
    plain = make_params(N, DIM, neighbors="all", threshold=T)
    long = make_params(N, DIM, neighbors="all", threshold=T, dp=offer(rounds=11))
    h = Harness(N, DIM, neighbors="all", threshold=T)
    for params, what in ((plain, "requires distributed DP"), (long, "11 rounds")):
        with pytest.raises(PolicyViolation, match=what):
            SecAggClient(1, h.identities[1], params, h.directory, h.xs[1], policy=POLICY)


def test_client_without_dp_policy_joins_a_dp_round() -> None:
    """Documented choice: noise the client did not ask for cannot hurt its privacy."""
    h = harness(policy=TEST_POLICY)
    step(h)
    assert h.server.result is not None and h.server.result.dp is not None


def test_attack_offer_differs_between_clients_session_id_binds_it() -> None:
    """Attack: the server shows half the clients another offer (here: other rounds, still
    within their policy). The params digest binds the offer, so those clients' signed
    advertisements and session id differ and none of them is in the sum (failed before the
    offer was in RoundParams.encode)."""
    h = harness()
    other = make_params(N, DIM, neighbors="all", threshold=T, dp=offer(rounds=5))
    other = dataclasses.replace(other, round_id=h.params.round_id)
    assert other.digest() != h.params.digest()
    split = set(h.ids[N // 2 :])
    for c in split:
        h.clients[c] = SecAggClient(c, h.identities[c], other, h.directory, h.xs[c], policy=POLICY)
    step(h)
    assert h.server.result is None or not set(h.server.result.contributors) & split


@pytest.mark.parametrize("what", ["duplicates", "strangers"])
def test_attack_survivor_set_with_duplicates_or_strangers_refused(what: str) -> None:
    """Attack: the server inflates ``|U|`` with a repeated id or an id outside the roster, so
    that clients would reveal more noise seeds. Clients refuse the set before signing it and
    reveal nothing (failed before the survivor-set checks)."""
    h = harness()
    replies = h.start()
    out = h.stage(replies)
    replies = h.to_clients(out)
    out = h.stage(replies)
    replies = h.to_clients(out)
    out = h.stage(replies)

    def evil(cid: int, m: Message) -> Message:
        assert isinstance(m, ConsistencyRequest)
        extra = (m.survivors[0],) if what == "duplicates" else (N + 5,)
        return dataclasses.replace(m, survivors=tuple(sorted(m.survivors + extra)))

    replies = h.to_clients(out, tamper=evil)
    assert not any(replies.values())
    assert all(isinstance(e, ServerMisbehaviour) for e in h.errors)
    assert all(c.stage is Stage.ABORTED for c in h.clients.values())


def test_attack_server_claims_more_survivors_at_unmasking_refused() -> None:
    """Attack: the server asks for the unmasking of a larger survivor set than the one the
    clients signed (so that ``j`` and the removed noise grow). Each client computes ``j``
    from its own signed ``U`` only; the request itself is refused (failed before the client
    compared the request's survivors with the signed set)."""
    h = harness()
    replies = h.start()
    gone = {9, 10}
    for stage in ("advertise", "share", "masked"):
        out = h.stage(replies, silent=gone if stage == "masked" else set())
        replies = h.to_clients(out, skip=gone if stage == "masked" else set())
    out = h.stage(replies)  # signatures -> unmask requests

    def evil(cid: int, m: Message) -> Message:
        assert isinstance(m, UnmaskRequest)
        return dataclasses.replace(m, alive=tuple(range(1, N + 1)), dropped=())

    replies = h.to_clients(out, skip=gone, tamper=evil)
    assert not any(replies.values())
    assert h.errors and all(isinstance(e, ServerMisbehaviour) for e in h.errors)


@pytest.mark.parametrize(("binary", "gone"), [(False, {9, 10}), (True, {10})])
def test_clients_reveal_exactly_the_components_their_own_U_allows(
    binary: bool, gone: set[int]
) -> None:
    """With ``|U| = 8`` (level plan) or ``|U| = 9`` (binary plan: the bits of
    ``2^m - 1 - x(9)``, a subset, not a prefix) every client reveals shares of exactly the
    components ``plan.removed(|U|)`` of exactly the survivors it holds shares of, and the
    server's own bookkeeping cannot change that (the unmask request has no field to ask for
    more)."""
    o = binary_offer() if binary else offer()
    h = harness(o)
    seen = step(h, {"masked": gone})
    removed = o.plan.removed(N - len(gone))
    assert 0 < len(removed) < o.plan.components - 1
    assert o.plan.ladder is not binary
    if binary:
        assert removed == (1,)  # component 0 is kept
    msgs = [m for m in seen["unmask"] if isinstance(m, UnmaskShares)]
    assert len(msgs) == N - len(gone)
    for m in msgs:
        assert {k for _, k, _ in m.dp_shares} == set(removed)
        assert {o for o, _, _ in m.dp_shares} == {o for o, _ in m.seed_shares}
        assert not {o for o, _, _ in m.dp_shares} & gone
    assert h.server.result is not None and h.server.result.dp is not None


def test_attack_holder_reveals_extra_or_false_dp_shares_is_excluded() -> None:
    """Attack: a holder reveals a share of a component the survivor count does not allow,
    or a DP share that does not match the dealer's signed commitment. The server refuses the
    whole message (the holder is dropped, its shares unused) and the round still completes
    with the right noise (failed before validate_dp_shares)."""
    for how in ("extra", "false"):
        h = harness()
        replies = h.start()
        for _ in ("advertise", "share", "masked", "consistency"):
            replies = h.to_clients(h.stage(replies))
        liar = 1
        (m,) = replies[liar]
        assert isinstance(m, UnmaskShares)
        owner, k, share = m.dp_shares[0]
        if how == "extra":
            bad = (*m.dp_shares, (owner, offer().plan.components - 2, share))
        else:
            flipped = share[:-1] + bytes([share[-1] ^ 1])
            bad = ((owner, k, flipped), *m.dp_shares[1:])
        replies[liar] = [dataclasses.replace(m, dp_shares=bad)]
        h.to_clients(h.stage(replies))
        res = h.server.result
        assert res is not None, h.server.error
        assert h.server.records[liar].dropped_stage is Stage.UNMASKING
        assert res.dp is not None and res.dp["contributors"] == N


def test_attack_holder_reveals_a_kept_component_is_excluded() -> None:
    """Attack: with ``|U| = 9`` (binary plan) a holder reveals, in place of the removed
    component 1, a genuine share of component 0, which 9 survivors KEEP (outside
    ``plan.removed(9)``: a subset, not a prefix, so "any k below the count" is no longer a
    valid check). The server refuses the whole message (the holder is dropped, its shares
    unused) and the round completes with the kept noise (failed when validate_dp_shares only
    bounded ``k``)."""
    plan = binary_offer().plan
    kept = [k for k in plan.kept(N - 1) if k < plan.removable]
    assert kept == [0] and plan.removed(N - 1) == (1,)
    h = harness(binary_offer())
    replies = h.start()
    gone = {10}
    for stage in ("advertise", "share", "masked"):
        silent = gone if stage == "masked" else set()
        replies = h.to_clients(h.stage(replies, silent=silent), skip=silent)
    liar = 1
    held = dict(h.clients[liar]._ctx.dp_peer)  # the liar's genuine shares, kept ones too
    replies = h.to_clients(h.stage(replies, silent=gone), skip=gone)
    (m,) = replies[liar]
    assert isinstance(m, UnmaskShares)
    i = next(i for i, (o, _, _) in enumerate(m.dp_shares) if o != liar)
    owner = m.dp_shares[i][0]
    # a genuine share (it matches the dealer's signed commitment) of a kept component
    fake = (owner, kept[0], held[owner][kept[0]])
    bad = (*m.dp_shares[:i], fake, *m.dp_shares[i + 1 :])
    replies[liar] = [dataclasses.replace(m, dp_shares=bad)]
    h.to_clients(h.stage(replies, silent=gone), skip=gone)
    res = h.server.result
    assert res is not None, h.server.error
    assert h.server.records[liar].dropped_stage is Stage.UNMASKING
    assert res.dp is not None and res.dp["contributors"] == N - 1
    assert res.dp["removed_set"] == list(plan.removed(N - 1))
    assert res.dp["noise_plan"] == "binary" and offer().plan.kind == "ladder"


def test_attack_dealer_withholds_dp_bundle_costs_only_its_shares() -> None:
    """A share delivery whose DP section was stripped is refused by the client (it cannot
    hold the noise shares it must later reveal): ServerMisbehaviour, nothing sent."""
    h = harness()
    replies = h.start()
    replies = h.to_clients(h.stage(replies))
    out = h.stage(replies)

    def strip(cid: int, m: Message) -> Message:
        assert isinstance(m, ShareDelivery)
        return dataclasses.replace(m, dp_components=0, dp_shares=(), dp_commitments=())

    replies = h.to_clients(out, tamper=strip)
    assert not any(replies.values())
    assert all(isinstance(e, ServerMisbehaviour) for e in h.errors)


def test_hybrid_dp_round_key_holders_decode_the_release() -> None:
    """Hybrid: the DP ring values in CKKS lanes of ``b + ceil(log2 n)`` bits; the server
    publishes the removal beside the encrypted sum and every key holder decodes the same
    release (noise of the plan's size, never below target)."""
    h = Harness(N, DIM, mode="hybrid", neighbors="all", threshold=T, dp=offer(), policy=POLICY)
    assert h.params.he.lane_bits == offer().bits + 4  # ceil(log2 10) = 4
    step(h, {"masked": {4}})
    res = h.server.result
    assert res is not None, h.server.error
    assert res.sums is None and res.ciphertexts is not None and res.dp_removal
    assert res.dp is not None and res.dp["contributors"] == N - 1
    exact = sum(clip_l2(h.xs[c], 1.0) for c in res.contributors)
    first = h.clients[res.contributors[0]].result
    assert first is not None
    for c in res.contributors:
        got = h.clients[c].result
        assert got is not None and np.array_equal(got.weighted_sum, first.weighted_sum)
    err = float(np.std(first.weighted_sum - exact))
    assert 0.5 * res.dp["target_std"] < err < 2 * res.dp["target_std"]  # type: ignore[operator]


def test_attack_hybrid_result_with_doctored_removal_length_refused() -> None:
    """A hybrid DP result whose removal is not one packed DP vector is server misbehaviour
    (failed before hybrid_dp_ring checked its length: numpy read past or short)."""
    from secagg.messages import EncryptedResult

    h = Harness(N, DIM, mode="hybrid", neighbors="all", threshold=T, dp=offer(), policy=POLICY)
    replies = h.start()
    for _ in ("advertise", "share", "masked", "consistency"):
        replies = h.to_clients(h.stage(replies))
    out = h.stage(replies)

    def cut(cid: int, m: Message) -> Message:
        assert isinstance(m, EncryptedResult)
        return dataclasses.replace(m, dp_removal=m.dp_removal[:-8])

    h.to_clients(out, tamper=cut)
    assert h.errors and all(isinstance(e, ServerMisbehaviour) for e in h.errors)


def test_sparse_graph_dp_round_reveals_through_neighbours_only() -> None:
    """SecAgg+ graph (k = 8 of 15 peers): noise-seed shares go to the same holders as b_u and
    every survivor's removable seeds are rebuilt from its neighbours' reveals."""
    n, t = 16, 5
    cal = calibrate(3.0, 1e-5, 10, n_clients=n, min_survivors=t, dim=DIM, clip=1.0)
    dp = DPOffer.from_calibration(cal)
    h = Harness(n, DIM, neighbors="8", threshold=t, dp=dp, policy=POLICY)
    assert h.params.degree == 8
    seen = step(h, {"masked": {2, 9}})
    res = h.server.result
    assert res is not None, h.server.error
    assert res.dp is not None and res.dp["removed_components"] == dp.plan.level(n - 2)
    for m in seen["unmask"]:
        assert isinstance(m, UnmaskShares)
        owners = {o for o, _, _ in m.dp_shares}
        assert owners <= h.server.ctx.holders(m.sender) - {2, 9}


def test_with_dp_calibrates_for_the_rounds_own_threshold() -> None:
    base = make_params(N, DIM, neighbors="all", threshold=T)
    from secagg.params import with_dp

    p = with_dp(base, 3.0, 1e-5, 10, clip=1.0)
    assert p.dp == offer() or (p.dp is not None and p.dp.plan == offer().plan)
    assert p.dp is not None and p.dp.plan.min_survivors == base.threshold
    POLICY.check_params(p)


@pytest.mark.parametrize("n", [3, 4])
def test_dp_round_with_t_equal_n_has_no_removable_seeds_and_completes(n: int) -> None:
    """Regression: with ``t = n`` the plan has one component (``L = 0``), so dealers send no
    DP share bundle; every holder used to drop every peer's shares for "came without its DP
    shares" and the round aborted at unmasking ("self-mask seed ... 1 revealed shares")."""
    cal = calibrate(3.0, 1e-5, 10, n_clients=n, min_survivors=n, dim=DIM, clip=1.0)
    dp = DPOffer.from_calibration(cal)
    assert dp.plan.components == 1
    h = Harness(n, DIM, neighbors="all", threshold=n, dp=dp, policy=POLICY)
    step(h)
    res = h.server.result
    assert res is not None, h.server.error
    assert res.dp is not None and res.dp["contributors"] == n
    assert res.dp["removed_components"] == 0
    assert not any(h.clients[c].warnings for c in range(1, n + 1))
    exact = sum(clip_l2(h.xs[c], 1.0) for c in res.contributors)
    assert res.weighted_sum is not None
    err = float(np.std(res.weighted_sum - exact))
    assert 0.5 * res.dp["target_std"] < err < 2 * res.dp["target_std"]  # type: ignore[operator]
