"""Realized noise of the released aggregate of a whole masked DP round, whatever drops.

In-process rounds (``secagg.simulate.run_round``: every message through its encoding) at 0%,
10% and 30% dropout in each stage where a dropout changes the survivor set ``U`` or the set
of share holders (share_keys, masked_input, consistency, unmasking), and one hybrid round
(30% at masked_input; a key holder decrypts and adds the published removal). The residual (released
ring sum, centred, minus ``gamma`` times the exact sum of the clipped, rotated inputs) is the
noise the plan leaves for ``|U|`` plus each contributor's rounding error (variance at most
1/4 per coordinate). Its sample variance over ``d' = 1024`` coordinates has relative standard
error ``sqrt(2 / d') = 4.4%``; each case is tested at 3.89 standard errors (false-alarm rate
1e-4 per case). Noise seeds come from ``secrets``, so each run draws fresh noise.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

pytest.importorskip("dp_accounting")

from secagg import ckks
from secagg.client import decrypt_lane_sums, hybrid_dp_ring
from secagg.dp.calibration import calibrate
from secagg.dp.encoding import centre, clip_l2
from secagg.dp.participants import rotation_key
from secagg.dp.policy import DPOffer, DPPolicy
from secagg.dp.rotation import rotate
from secagg.params import make_params
from secagg.policy import ClientPolicy
from secagg.simulate import DROP_STAGES, run_round

N, T, DIM = 10, 7, 1000
POLICY = ClientPolicy(
    dropout=0.0, corrupt=0.0, dp=DPPolicy(max_epsilon=4.0, delta=1e-5, max_rounds=5, max_clip=1.0)
)


@functools.cache
def offer(xi: float = 0.05) -> DPOffer:
    """``xi = 5%``: the ladder (a level at every survivor count, exact: 4 components against
    the binary plan's 5); ``xi = 20%``: binary, ``m = 2``, and 9 survivors reveal
    component 1 but keep component 0 (a subset, not a prefix)."""
    cal = calibrate(4.0, 1e-5, 5, n_clients=N, min_survivors=T, dim=DIM, clip=1.0, max_excess=xi)
    return DPOffer.from_calibration(cal)


STAGES = ("share", "masked", "consistency", "unmask")
CASES = [(0, "masked", "masked")] + [(k, s, "masked") for k in (1, 3) for s in STAGES]
CASES.append((3, "masked", "hybrid"))


@pytest.mark.parametrize("xi", [0.05, 0.2])
@pytest.mark.parametrize(("dropped", "stage", "mode"), CASES)
def test_released_noise_matches_plan_for_actual_survivors(
    dropped: int, stage: str, mode: str, xi: float
) -> None:
    o = offer(xi)
    assert o.plan.ladder is (xi == 0.05)
    params = make_params(N, DIM, mode=mode, neighbors="all", threshold=T, dp=o)
    he_secret = he_server = None
    if mode == "hybrid":
        secret = ckks.make_secret_context(params.he)
        he_secret = ckks.load_secret_context(secret, params.he)
        he_server = ckks.load_server_context(ckks.make_public_context(secret), params.he)
    rng = np.random.default_rng(dropped * 10 + len(stage))  # test data only
    inputs = {c: rng.normal(0.0, 0.2, DIM) for c in range(1, N + 1)}
    plan = {c: DROP_STAGES[stage] for c in range(N - dropped + 1, N + 1)}
    server, _, _ = run_round(
        params,
        inputs,
        dict.fromkeys(inputs, 1),
        plan,
        policy=POLICY,
        he_secret=he_secret,
        he_server=he_server,
    )
    res = server.result
    assert res is not None, server.error
    s = len(res.contributors)
    assert s == (N - dropped if stage in ("share", "masked") else N)
    assert res.dp is not None and res.dp["contributors"] == s
    key = rotation_key(server.session_id)
    exact = o.gamma * sum(rotate(clip_l2(inputs[c], o.clip), key) for c in res.contributors)
    if he_secret is not None:  # a key holder's view: decrypt, add the published removal
        assert res.ciphertexts is not None
        sums = decrypt_lane_sums(he_secret, params, res.ciphertexts)
        ring = hybrid_dp_ring(params, sums, res.dp_removal)
    else:
        assert res.sums is not None
        ring = res.sums
    residual = centre(ring, o.bits).astype(np.float64) - exact
    d = residual.size
    want = o.plan.residual_variance(s)
    assert want >= o.plan.target_variance  # never below target
    assert want <= o.plan.max_release_ratio * o.plan.target_variance
    var = float(np.mean(residual**2))  # the noise has mean zero
    rounding = s / 4 / want  # at most this much more, from rounding
    assert -3.89 * math.sqrt(2 / d) <= var / want - 1 <= 3.89 * math.sqrt(2 / d) + rounding
