"""In-memory DP aggregation of one round (no masking): the arithmetic ``secagg simulate`` reports.

Runs the client pipeline for every contributor, sums mod ``2^b``, removes the survivors'
excess components and decodes, then measures the released noise exactly. It is the DP half
of a round, to be composed with the masked protocol once the client and server carry it
(``docs/dp.md``, "What remains to integrate"); masks cancel mod ``2^b`` and do not change
any figure computed here.

``measured_std`` is the standard deviation over coordinates of (released aggregate - exact
noiseless sum of the clipped, rotated, rounded inputs), divided by ``gamma``: the same units
as ``target_std``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from secagg.dp.calibration import DPCalibration, round_rho
from secagg.dp.encoding import centre, decode_sum, encode_update, to_ring
from secagg.dp.randomness import KeyStream
from secagg.dp.xnoise import client_noise, component_key, removal_noise, revealed_components
from secagg.errors import ConfigurationError
from secagg.prg import Purpose

__all__ = ["DPRoundResult", "run_dp_aggregate"]


class DPRoundResult:
    """Outcome of :func:`run_dp_aggregate`: the decoded sum and the ``dp`` report."""

    __slots__ = ("aggregate", "report")

    def __init__(self, aggregate: npt.NDArray[np.float64], report: dict[str, object]) -> None:
        self.aggregate = aggregate
        self.report = report


def run_dp_aggregate(
    cal: DPCalibration,
    inputs: Sequence[npt.ArrayLike],
    survivors: Sequence[int],
    *,
    session_id: bytes | None = None,
) -> DPRoundResult:
    """Aggregate ``inputs[i]`` for ``i in survivors`` under the calibrated mechanism.

    Every seed is fresh from :mod:`secrets`; the rotation key is derived per call.
    """
    n = cal.plan.n_clients
    if len(inputs) != n:
        raise ConfigurationError(f"calibrated for {n} clients, got {len(inputs)} inputs")
    sid = session_id if session_id is not None else secrets.token_bytes(32)
    rotation_key = secrets.token_bytes(32)
    d = cal.padded_dim
    roster = list(range(n))
    removed = revealed_components(cal.plan, list(survivors), roster)
    total = np.zeros(d, dtype=np.uint64)
    exact = np.zeros(d, dtype=np.int64)
    removable: dict[int, list[bytes]] = {}
    for i in survivors:
        seeds = [secrets.token_bytes(32) for _ in range(cal.plan.components)]
        keys = [component_key(s, sid, i, k) for k, s in enumerate(seeds)]
        r = encode_update(
            inputs[i],
            clip=cal.clip,
            gamma=cal.gamma,
            beta=cal.beta,
            rotation_key=rotation_key,
            rounding=KeyStream(secrets.token_bytes(32), Purpose.DP_ROUNDING),
        )
        exact += r
        total += to_ring(r + client_noise(cal.plan, keys, d), cal.bits)
        removable[i] = [keys[k] for k in removed]
    s = len(survivors)
    total -= to_ring(removal_noise(cal.plan, removable, s, d), cal.bits)
    residual = centre(total, cal.bits) - exact
    aggregate = decode_sum(
        total, bits=cal.bits, gamma=cal.gamma, rotation_key=rotation_key, dim=cal.dim
    )
    released = cal.plan.residual_variance(s)
    report = cal.as_dict()
    report.update(
        {
            "measured_std": float(residual.std()) / cal.gamma,
            "released_std": math.sqrt(released) / cal.gamma,
            "honest_std": math.sqrt(cal.plan.honest_variance(s)) / cal.gamma,
            "contributors": s,
            "removed_components": len(removed),
            "rho_round": round_rho(cal.plan, s, cal.delta2_sq, d),
        }
    )
    return DPRoundResult(aggregate, report)
