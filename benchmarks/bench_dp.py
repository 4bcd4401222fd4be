"""Distributed-DP client cost: exact discrete Gaussian throughput and one client's DP encoding.

pytest-benchmark suite (``make bench`` runs it with the others)::

    pytest benchmarks/bench_dp.py --benchmark-only

Stand-alone table (best of ``--repeat`` runs)::

    python benchmarks/bench_dp.py [--dim 1000000] [--clients 100] [--survivors 70] [--repeat 3]
        [--backend cpu|cuda]

Reported: samples/s of the noise kernel (``secagg.dp.streams.discrete_gaussian_vector``,
Numba, all cores) and of the batched numpy sampler (``secagg.dp.sampling.discrete_gaussian``)
at the calibrated base variance, and the time for one client's pipeline (clip, rotate, round,
all XNoise components, reduce mod 2^b) at ``--dim``, for the plan of ``--clients`` / ``--survivors``
at epsilon 3, delta 1e-5, 100 rounds.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from suite.common import sized

from secagg.dp.calibration import DPCalibration, calibrate
from secagg.dp.encoding import encode_update, to_ring
from secagg.dp.randomness import KeyStream
from secagg.dp.sampling import discrete_gaussian
from secagg.dp.streams import discrete_gaussian_vector
from secagg.dp.xnoise import client_noise
from secagg.prg import Purpose

BENCH_DIM = sized(100_000, 4096)


def _cal(dim: int, n: int, t: int) -> DPCalibration:
    return calibrate(3.0, 1e-5, 100, n_clients=n, min_survivors=t, dim=dim, clip=1.0)


def client_round(cal: DPCalibration, x: np.ndarray) -> np.ndarray:
    """One client's DP work: encode the update, add every noise component, reduce mod 2^b."""
    r = encode_update(
        x,
        clip=cal.clip,
        gamma=cal.gamma,
        beta=cal.beta,
        rotation_key=os.urandom(32),
        rounding=KeyStream(os.urandom(32), Purpose.DP_ROUNDING),
    )
    keys = [os.urandom(32) for _ in range(cal.plan.components)]
    return to_ring(r + client_noise(cal.plan, keys, cal.padded_dim), cal.bits)


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.benchmark(group="dp")
def test_discrete_gaussian_throughput(benchmark: Any) -> None:
    cal = _cal(BENCH_DIM, 100, 70)
    v = cal.plan.component_variances[-1]
    benchmark(lambda: discrete_gaussian_vector(os.urandom(32), v, 100_000))


@pytest.mark.benchmark(group="dp")
def test_dp_client_round(benchmark: Any) -> None:
    cal = _cal(BENCH_DIM, 100, 70)
    x = np.linspace(-1, 1, BENCH_DIM)
    benchmark(lambda: client_round(cal, x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--survivors", type=int, default=70)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="cpu", choices=["cpu", "cuda"], help="noise kernel")
    a = ap.parse_args()
    cal = _cal(a.dim, a.clients, a.survivors)
    v = cal.plan.component_variances[-1]
    count = min(a.dim, 1_000_000)
    discrete_gaussian_vector(os.urandom(32), v, 16, backend=a.backend)  # compile / load cache
    t = _best(
        lambda: discrete_gaussian_vector(os.urandom(32), v, count, backend=a.backend), a.repeat
    )
    print(
        f"noise kernel ({a.backend}) sigma^2={v}: {count / t:,.0f} samples/s ({count} in {t:.3f} s)"
    )
    t = _best(
        lambda: discrete_gaussian(KeyStream(os.urandom(32), Purpose.DP_NOISE), v, count), a.repeat
    )
    print(f"batched numpy sampler: {count / t:,.0f} samples/s ({count} in {t:.3f} s)")
    x = np.linspace(-1, 1, a.dim)
    t = _best(lambda: client_round(cal, x), a.repeat)
    samples = cal.plan.components * cal.padded_dim
    print(
        f"client DP round: dim={a.dim} (d'={cal.padded_dim}), {cal.plan.components} components, "
        f"{cal.bits}-bit ring: {t:.3f} s ({samples / t:,.0f} noise samples/s incl. encoding)"
    )


if __name__ == "__main__":
    main()
