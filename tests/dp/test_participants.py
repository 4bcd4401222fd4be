"""DPClient / DPServer: the sans-I/O pieces the masked round will call.

Seeds are fresh from ``secrets``: the noise check allows 15% relative error on the RMS over
``d' = 2048`` coordinates, about 9.6 standard errors (false-alarm rate far below 1e-6).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

pytest.importorskip("dp_accounting")

from secagg.dp.calibration import calibrate
from secagg.dp.encoding import clip_l2
from secagg.dp.participants import DPClient, DPServer, rotation_key
from secagg.dp.policy import DPOffer, DPPolicy
from secagg.errors import ConfigurationError, ServerMisbehaviour

SESSION = b"\x42" * 32
CAL = calibrate(6.0, 1e-5, 5, n_clients=12, min_survivors=8, dim=2000, clip=1.0)
OFFER = DPOffer(CAL.dim, CAL.clip, CAL.gamma, CAL.beta, CAL.bits, 5, CAL.plan)
POLICY = DPPolicy(max_epsilon=6.0, delta=1e-5, max_rounds=5, max_clip=1.0)


def test_round_trip_with_dropouts() -> None:
    rng = np.random.default_rng(4)  # test data only
    xs = [rng.normal(size=2000) * 0.03 for _ in range(12)]
    clients = [DPClient(OFFER, POLICY, client_id=i, session_id=SESSION) for i in range(12)]
    survivors = list(range(9))  # 25% dropped before upload
    total = sum((clients[i].encode(xs[i]) for i in survivors), np.zeros(1, np.uint64))
    j = clients[0].reveal(survivors, list(range(12)))
    assert all(c.reveal(survivors, list(range(12))) == j for c in clients[:9])
    seeds = {u: [clients[u].shared_seeds[k] for k in j] for u in survivors}
    got = DPServer(OFFER, session_id=SESSION).finish(total, survivors, seeds)
    want = sum(clip_l2(xs[i], 1.0) for i in survivors)
    rms = float(np.sqrt(np.mean((got - want) ** 2)))
    expected = math.sqrt(CAL.plan.residual_variance(9)) / CAL.gamma
    assert abs(rms / expected - 1) < 0.15
    assert len(clients[0].shared_seeds) == CAL.plan.components - 1
    assert "seed" not in repr(clients[0]).lower()


def test_client_refuses_weak_offer_before_drawing_anything() -> None:
    weak = dataclasses.replace(OFFER, rounds=5, gamma=OFFER.gamma * 2)
    with pytest.raises(ServerMisbehaviour):
        DPClient(weak, POLICY, client_id=0, session_id=SESSION)


def test_server_needs_seeds_of_exactly_the_survivors() -> None:
    with pytest.raises(ConfigurationError):
        DPServer(OFFER, session_id=SESSION).finish(np.zeros(2048, np.uint64), [0, 1], {0: []})
    with pytest.raises(ConfigurationError):
        rotation_key(b"short")
    assert rotation_key(SESSION) != rotation_key(b"\x43" * 32)
