"""Client-side cost of the policy checks (issue 11: "well under 10 ms at n = 1,000").

Each client checks the round's ``(n, k, t)`` with the server's parameter finder
(:meth:`secagg.policy.ClientPolicy.check_params`): once cold (the bound evaluated), then
cached; it checks every set the server returns (``check_set``), and the SDK fingerprints
the update's layout (:func:`secagg.service.tensors.fingerprint`).

Run::

    .venv/bin/python -m pytest benchmarks/bench_policy.py --benchmark-only -s
    SECAGG_BENCH_POLICY_SIZES=10 .venv/bin/python -m pytest benchmarks/bench_policy.py \
        --benchmark-only -s                       # tiny
    .venv/bin/python benchmarks/bench_policy.py [--sizes 100,1000]   # a plain table
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import pytest

from secagg.params import RoundParams, make_params
from secagg.policy import ClientPolicy, clear_verdict_cache
from secagg.service.tensors import fingerprint

SIZES = [int(s) for s in os.environ.get("SECAGG_BENCH_POLICY_SIZES", "100,1000").split(",")]
LEAVES = 100
"""Leaves of the fingerprinted layout (a mid-sized model's state_dict)."""


def _params(n: int) -> RoundParams:
    return make_params(n, 1000)


def _cold(policy: ClientPolicy, params: RoundParams) -> None:
    clear_verdict_cache()
    policy.check_params(params)


def _model() -> dict[str, Any]:
    return {f"layer{i}.weight": np.zeros((64, 64), np.float32) for i in range(LEAVES)}


@pytest.mark.parametrize("n", SIZES)
def test_check_params_cold(benchmark: Any, n: int, machine: str) -> None:
    """First check in a process: the finder's bound at the round's (n, k, t)."""
    params, policy = _params(n), ClientPolicy()
    benchmark(_cold, policy, params)
    benchmark.extra_info.update(machine=machine, n=n, k=params.degree, t=params.threshold)


@pytest.mark.parametrize("n", SIZES)
def test_check_params_cached(benchmark: Any, n: int, machine: str) -> None:
    """Every later round with the same (n, k, t): a cache hit plus the cheap field checks."""
    params, policy = _params(n), ClientPolicy()
    policy.check_params(params)
    benchmark(policy.check_params, params)
    benchmark.extra_info.update(machine=machine, n=n)


@pytest.mark.parametrize("n", SIZES)
def test_check_set(benchmark: Any, n: int, machine: str) -> None:
    """A survivor set of n clients against max(t, min_contributors)."""
    params, policy = _params(n), ClientPolicy()
    benchmark(policy.check_set, "the survivor list", n, params)
    benchmark.extra_info.update(machine=machine, n=n)


def test_layout_fingerprint(benchmark: Any, machine: str) -> None:
    """SHA-256 over names, shapes and dtypes of a 100-leaf state_dict."""
    model = _model()
    benchmark(fingerprint, model)
    benchmark.extra_info.update(machine=machine, leaves=LEAVES)


def _time(fn: Any, *args: Any, repeat: int = 20) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    args = ap.parse_args()
    policy = ClientPolicy()
    print(f"{'n':>6} {'k':>5} {'t':>5} {'cold ms':>9} {'cached us':>10} {'set us':>8}")
    for n in (int(s) for s in args.sizes.split(",")):
        p = _params(n)
        cold = _time(_cold, policy, p, repeat=5)
        warm = _time(policy.check_params, p, repeat=200)
        one = _time(policy.check_set, "the survivor list", n, p, repeat=200)
        print(
            f"{n:>6} {p.degree:>5} {p.threshold:>5} {cold * 1e3:>9.3f} {warm * 1e6:>10.2f}"
            f" {one * 1e6:>8.2f}"
        )
    fp = _time(fingerprint, _model(), repeat=50)
    print(f"layout fingerprint, {LEAVES} leaves: {fp * 1e6:.1f} us")


if __name__ == "__main__":
    main()
