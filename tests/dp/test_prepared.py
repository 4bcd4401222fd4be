"""Noise drawn before the round (docs/dp.md "Speed", lever 4): ``PreparedNoise``.

Each attack test names the attack it catches and failed before its defence (checked by
removing the defence, changes/dpfast.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("dp_accounting")

from secagg.client import SecAggClient
from secagg.dp.calibration import calibrate
from secagg.dp.encoding import clip_l2
from secagg.dp.participants import DPClient, DPServer, PreparedNoise
from secagg.dp.policy import DPOffer
from secagg.dp.rotation import padded_dim
from secagg.dp.xnoise import client_noise, component_key
from secagg.errors import ConfigurationError, RoundAborted, ServerMisbehaviour
from secagg.messages import Abort, Message, ShareDelivery, ShareKeys, decode_message
from tests.dp.test_round import DIM, DP_POLICY, POLICY, N, T, offer, step
from tests.helpers import Harness


def harness(
    prepared: set[int], dp: DPOffer | None = None
) -> tuple[Harness, dict[int, PreparedNoise]]:
    """A DP round whose clients in ``prepared`` bring noise drawn for ``dp`` (default: the
    round's own offer)."""
    h = Harness(N, DIM, neighbors="all", threshold=T, dp=offer(), policy=POLICY)
    made = {}
    for c in prepared:
        made[c] = PreparedNoise(dp or offer(), DP_POLICY)
        h.clients[c] = SecAggClient(
            c, h.identities[c], h.params, h.directory, h.xs[c], h.ws[c],
            rounding_key=h.rounding[c], policy=POLICY, dp_prepared=made[c],
        )  # fmt: skip
    return h, made


def check_release(h: Harness, contributors: int) -> None:
    res = h.server.result
    assert res is not None, h.server.error
    assert res.dp is not None and res.dp["contributors"] == contributors
    exact = sum(clip_l2(h.xs[c], 1.0) for c in res.contributors)
    assert res.weighted_sum is not None
    err = float(np.std(res.weighted_sum - exact))
    # about target_std per coordinate (60 coordinates): a false alarm is far below 1e-6
    assert 0.5 * res.dp["target_std"] < err < 2 * res.dp["target_std"]  # type: ignore[operator]
    for c in res.contributors:
        got = h.clients[c].result
        assert got is not None and np.array_equal(got.weighted_sum, res.weighted_sum)


def test_prepared_noise_is_the_salt_keyed_sum_and_single_use() -> None:
    """Known answer: the prepared vector is ``client_noise`` under the salt-keyed component
    keys of its seeds (what the server regenerates); it can be taken once."""
    p = PreparedNoise(offer(), DP_POLICY)
    assert p.ready and "ready" in repr(p)
    seeds, salt, noise = p.take()
    keys = [component_key(s, b"", 0, k, precompute_salt=salt) for k, s in enumerate(seeds)]
    assert np.array_equal(noise, client_noise(offer().plan, keys, padded_dim(DIM)))
    assert len(salt) == 32 and len(seeds) == offer().plan.components
    assert not p.ready
    with pytest.raises(ConfigurationError, match="already used"):
        p.take()
    again = PreparedNoise(offer(), DP_POLICY).take()
    assert again[1] != salt and again[0][0] != seeds[0]  # fresh seeds and salt each time


def test_dp_client_takes_matching_prepared_noise_and_erases_it() -> None:
    p = PreparedNoise(offer(), DP_POLICY)
    c = DPClient(offer(), DP_POLICY, client_id=1, session_id=bytes(32), prepared=p)
    assert c.prepared and c.salt is not None and not p.ready
    c.encode(np.zeros(DIM))
    with pytest.raises(ConfigurationError, match="already used"):
        c.encode(np.zeros(DIM))


def test_dp_client_falls_back_when_prepared_for_another_offer() -> None:
    """The offer in the round's params must equal the prepared one; otherwise the prepared
    noise is dropped (erased) and the noise drawn in the round, bound to the session."""
    other = dataclasses.replace(offer(), rounds=offer().rounds - 1)
    p = PreparedNoise(other, DP_POLICY)
    c = DPClient(offer(), DP_POLICY, client_id=1, session_id=bytes(32), prepared=p)
    assert not c.prepared and c.salt is None and not p.ready


def test_attack_prepare_for_a_weaker_offer_refused_before_drawing() -> None:
    """Attack: the server announces a weaker next-round plan; the site's policy check runs
    when it prepares, so nothing is drawn for it."""
    weak = DPOffer.from_calibration(
        calibrate(30.0, 1e-5, 10, n_clients=N, min_survivors=T, dim=DIM, clip=1.0)
    )
    with pytest.raises(ServerMisbehaviour):
        PreparedNoise(weak, DP_POLICY)


@pytest.mark.parametrize("prepared", [set(range(1, N + 1)), {1, 2, 5}])
def test_round_with_prepared_noise_and_dropout_removes_salt_keyed_components(
    prepared: set[int],
) -> None:
    """All or some clients prepared; one drops after sharing, so the server removes the
    survivors' excess components, regenerated from the salt-keyed keys (a wrong key would
    leave noise of the removed variance in: the std check fails)."""
    h, made = harness(prepared)
    seen = step(h, {"masked": {3}})
    check_release(h, N - 1)
    assert h.server.result is not None and h.server.result.dp is not None
    assert h.server.result.dp["removed_components"] == offer().plan.level(N - 1)
    assert not any(p.ready for p in made.values())
    salted = {m.sender for m in seen["share"] if isinstance(m, ShareKeys) and m.dp_salt}
    assert salted == prepared


def test_prepared_for_another_offer_round_still_completes() -> None:
    other = dataclasses.replace(offer(), rounds=offer().rounds - 1)
    h, made = harness({1, 2}, dp=other)
    seen = step(h, {"masked": {3}})
    check_release(h, N - 1)
    assert not any(isinstance(m, ShareKeys) and m.dp_salt for m in seen["share"])
    assert not any(p.ready for p in made.values())


def test_attack_server_swaps_a_dealers_salt_holders_refuse_its_shares() -> None:
    """Attack: the server hands holders another salt for dealer 1 (so that its later claims
    about which noise was removed differ from what the dealer signed). The salt is under
    the dealer's signed share commitment: every holder drops dealer 1's shares with a
    warning (failed before the salt was bound into share_commit_payload)."""
    h, _ = harness({1})
    replies = h.start()
    replies = h.to_clients(h.stage(replies))
    out = h.stage(replies)

    def swap(cid: int, m: Message) -> Message:
        assert isinstance(m, ShareDelivery)
        salts = tuple((u, bytes(32) if u == 1 else s) for u, s in m.dp_salts)
        assert salts != m.dp_salts or cid == 1
        return dataclasses.replace(m, dp_salts=salts)

    h.to_clients(out, tamper=swap)
    for c in range(2, N + 1):
        assert any("client 1 is not signed" in w for w in h.clients[c].warnings), c


def test_attack_server_invents_a_salt_for_a_dealer_without_one_refused() -> None:
    """Attack: a salt for a dealer that sent none (or for a stranger) changes the signed
    payload: the holder drops that dealer's shares; a salt of a non-sender is refused."""
    h, _ = harness(set())
    replies = h.start()
    replies = h.to_clients(h.stage(replies))
    out = h.stage(replies)

    def add(cid: int, m: Message) -> Message:
        assert isinstance(m, ShareDelivery)
        return dataclasses.replace(m, dp_salts=((1, bytes(32)),) if cid != 1 else ())

    h.to_clients(out, tamper=add)
    assert any("client 1 is not signed" in w for w in h.clients[2].warnings)


def test_abort_discards_unused_prepared_noise() -> None:
    """A round aborted before ShareKeys took the prepared noise erases it (never reused)."""
    h, made = harness({4})
    h.start()
    with pytest.raises(RoundAborted):
        h.clients[4].receive(Abort(h.params.round_id, 0, "advertise_keys", "too few").encode())
    assert not made[4].ready


def test_salt_wire_round_trip_and_server_release_with_salts() -> None:
    m = ShareKeys(bytes(16), 3, bytes(32), (), (), 1, (), (), b"\x07" * 32)
    assert decode_message(m.encode()) == m
    d = ShareDelivery(bytes(16), 0, bytes(32), (), (), 1, (), (), ((3, b"\x07" * 32),))
    assert decode_message(d.encode()) == d
    assert decode_message(dataclasses.replace(m, dp_salt=b"").encode()).dp_salt == b""


def test_server_release_regenerates_salt_keyed_components_exactly() -> None:
    """Known answer: two prepared clients, zero inputs (so each ring value is its noise),
    both survive: the released sum is exactly the sum of their base components, i.e. the
    server regenerated the removable ones from the signed salts (session-keyed regeneration
    leaves other noise in: failed with ``salts`` ignored)."""
    from secagg.dp.xnoise import component_noise, make_plan

    plan = make_plan(40_000, 2, 1)
    o = dataclasses.replace(offer(), plan=plan)
    sid = bytes(range(32))
    clients = {
        u: DPClient(o, None, client_id=u, session_id=sid, prepared=PreparedNoise(o, None))
        for u in (1, 2)
    }
    total = sum(clients[u].encode(np.zeros(DIM)) for u in (1, 2))
    seeds = {u: clients[u].shared_seeds for u in (1, 2)}
    salts = {u: clients[u].salt or b"" for u in (1, 2)}
    got = DPServer(o, session_id=sid).release(np.asarray(total), [1, 2], seeds, salts=salts)
    base = sum(
        component_noise(
            plan.component_variances[-1],
            component_key(clients[u]._seeds[-1], b"", 0, plan.components - 1,
                          precompute_salt=salts[u]),
            padded_dim(DIM),
        )
        for u in (1, 2)
    )  # fmt: skip
    assert np.array_equal(got, np.asarray(base).astype(np.uint64) & np.uint64((1 << o.bits) - 1))


def test_service_client_prepares_in_the_background_and_hands_out_once() -> None:
    """``Client.prepare_dp`` draws in a thread; the next round with the same offer gets the
    noise once, a round with another offer gets none (and the noise is erased)."""
    from secagg.keys import IdentityKey
    from secagg.service.client import Client, Policy

    c = Client("localhost:9", IdentityKey(), policy=Policy(dp=DP_POLICY), insecure_no_tls=True)
    try:
        with pytest.raises(ConfigurationError, match="offer"):
            c.prepare_dp()
        c.prepare_dp(offer(), wait=True)
        assert c.dp_prepare_seconds is not None
        got = c._take_dp(offer())
        assert got is not None and got.ready
        assert c._take_dp(offer()) is None  # one use
        c.prepare_dp(offer())
        other = dataclasses.replace(offer(), rounds=offer().rounds - 1)
        assert c._take_dp(other) is None
    finally:
        c.close()
