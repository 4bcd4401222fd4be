"""Tests for :mod:`secagg.graph`: the SecAgg+ neighbour graph and the (k, t) choice."""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from itertools import permutations

import numpy as np
import numpy.typing as npt
import pytest
from Crypto.Cipher import ChaCha20
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secagg import graph
from secagg.errors import ConfigurationError, InfeasibleParameters
from secagg.graph import (
    MAX_ID,
    choose_parameters,
    neighbours,
    neighbours_of,
    permutation,
)
from secagg.prg import Purpose

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def seed_of(i: int) -> bytes:
    return hashlib.sha256(b"graph-test" + i.to_bytes(4, "big")).digest()


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[int], int, bytes]:
    ids = draw(st.lists(st.integers(1, MAX_ID), min_size=1, max_size=70, unique=True))
    n = len(ids)
    choices = [*range(2, n - 1, 2), n - 1, n + 3]
    degree = draw(st.sampled_from(choices)) if n > 1 else 0
    seed = draw(st.binary(min_size=32, max_size=32))
    return ids, degree, seed


# --- graph structure -----------------------------------------------------------------------


@SETTINGS
@given(graphs())
def test_symmetric_regular_without_self_loops(case: tuple[list[int], int, bytes]) -> None:
    ids, degree, seed = case
    g = neighbours(ids, degree, seed)
    n = len(ids)
    assert set(g) == set(ids)
    for u, nu in g.items():
        assert u not in nu
        assert len(nu) == min(degree, n - 1)
        assert nu <= set(ids)
        assert all(u in g[v] for v in nu)


@SETTINGS
@given(graphs())
def test_harary_ring_over_the_permutation(case: tuple[list[int], int, bytes]) -> None:
    ids, degree, seed = case
    ring = permutation(ids, seed)
    n = len(ring)
    assert sorted(ring) == sorted(ids)
    g = neighbours(ids, degree, seed)
    for p, u in enumerate(ring):
        if degree >= n - 1:
            want = set(ids) - {u}
        else:
            want = {ring[(p + s) % n] for s in range(-degree // 2, degree // 2 + 1) if s}
        assert g[u] == want
        assert neighbours_of(ids, degree, seed, u) == want


def test_deterministic_and_independent_of_input_order() -> None:
    ids = list(range(100, 160))
    g = neighbours(ids, 6, seed_of(1))
    assert neighbours(list(reversed(ids)), 6, seed_of(1)) == g
    assert neighbours(tuple(ids), 6, bytes(seed_of(1))) == g


def test_different_seeds_give_different_graphs() -> None:
    ids = list(range(1, 41))
    edge_sets = {
        frozenset((u, v) for u, nu in neighbours(ids, 4, seed_of(i)).items() for v in nu)
        for i in range(30)
    }
    assert len(edge_sets) == 30


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_full_graph_when_degree_reaches_n_minus_1(n: int) -> None:
    ids = list(range(5, 5 + n))
    for degree in (n - 1, n, 1000):
        g = neighbours(ids, degree, seed_of(0))
        assert g == {u: frozenset(ids) - {u} for u in ids}


@pytest.mark.parametrize("n", [2, 10, 257])
def test_permutation_follows_the_documented_draw_rule(n: int) -> None:
    # Independent re-implementation straight from RFC 8439 ChaCha20 (pycryptodome): nonce is
    # the GRAPH tag then 11 zero bytes, draws are little-endian u32 words of the keystream.
    seed = seed_of(n)
    raw = ChaCha20.new(key=seed, nonce=bytes([4]) + bytes(11)).encrypt(bytes(4 * (n + 64)))
    draws = iter(int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4))
    perm = list(range(1000, 1000 + n))
    for i in range(n - 1, 0, -1):
        r = next(draws)
        while r >= 2**32 - 2**32 % (i + 1):
            r = next(draws)
        j = r % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    assert permutation(list(range(1000, 1000 + n)), seed) == tuple(perm)


def test_first_position_is_uniform() -> None:
    # Each of 6 ids lands first ~1/6 of the time over 3000 fixed seeds (deterministic test).
    ids = [3, 17, 99, 1000, 2**31, MAX_ID]
    draws = 3000
    counts = Counter(permutation(ids, seed_of(i))[0] for i in range(draws))
    expected = draws / len(ids)
    chi2 = sum((counts[u] - expected) ** 2 / expected for u in ids)
    assert chi2 < 30.0  # 5 degrees of freedom: P[chi2 > 30] ~ 1.5e-5


def test_whole_permutation_is_uniform() -> None:
    ids = [1, 2, 3]
    draws = 3000
    counts = Counter(permutation(ids, seed_of(10_000 + i)) for i in range(draws))
    assert set(counts) == set(permutations(ids))
    expected = draws / 6
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 30.0


@pytest.fixture
def fake_stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Replace the graph keystream by a list the test fills in (prefix-stable like ChaCha20)."""
    stream: list[int] = []

    def keystream_u32(key: bytes, purpose: Purpose, count: int) -> npt.NDArray[np.uint32]:
        assert purpose == Purpose.GRAPH
        assert len(stream) >= count
        return np.asarray(stream[:count], dtype=np.uint32)

    graph._shuffle.cache_clear()
    monkeypatch.setattr(graph, "keystream_u32", keystream_u32)
    yield stream
    graph._shuffle.cache_clear()


def test_rejection_sampling_discards_biased_draws(fake_stream: list[int]) -> None:
    # i=2 (bound 3): 2^32 - 1 >= 2^32 - (2^32 mod 3) is rejected, then 4 -> j=1.
    # i=1 (bound 2): every draw is accepted, 7 -> j=1. Result: [a, b, c] -> [a, c, b].
    fake_stream.extend([2**32 - 1, 4, 7] + [0] * 64)
    assert permutation([10, 20, 30], bytes(32)) == (10, 30, 20)


def test_rejection_sampling_refills_the_stream(fake_stream: list[int]) -> None:
    # More rejections than the initial n + 32 draws: the shuffle reads further.
    fake_stream.extend([2**32 - 1] * 40 + [5, 0] + [0] * 200)
    assert permutation([10, 20, 30], bytes(32)) == (20, 10, 30)


@pytest.mark.parametrize(
    ("ids", "degree", "seed", "match"),
    [
        ([1, 2, 2, 3], 2, bytes(32), "appears twice"),
        ([0, 1, 2, 3], 2, bytes(32), "1..4294967295"),
        ([1, 2, 2**32], 2, bytes(32), "1..4294967295"),
        ([1, 2, True], 2, bytes(32), "integers"),
        ([1, 2, 3.0], 2, bytes(32), "integers"),
        ([], 2, bytes(32), "at least one"),
        ([1, 2, 3], 2, bytes(31), "32 bytes"),
    ],
)
def test_neighbours_rejects_bad_input(ids: list[int], degree: int, seed: bytes, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        neighbours(ids, degree, seed)


def test_neighbours_rejects_odd_or_tiny_degree() -> None:
    ids = list(range(1, 11))
    with pytest.raises(InfeasibleParameters, match=r"odd.*degree=4.*num_shares=5"):
        neighbours(ids, 3, bytes(32))
    with pytest.raises(InfeasibleParameters, match="below 2"):
        neighbours(ids, 0, bytes(32))
    assert len(neighbours(list(range(1, 11)), 9, bytes(32))[1]) == 9  # odd n-1: full graph
    with pytest.raises(ConfigurationError, match="not among"):
        neighbours_of(ids, 4, bytes(32), 11)


# --- choosing k and t ----------------------------------------------------------------------


def _hyper_tail(total: int, marked: int, drawn: int, x: int) -> Fraction:
    x = max(x, 0)
    hits = sum(
        math.comb(marked, z) * math.comb(total - marked, drawn - z)
        for z in range(x, min(marked, drawn) + 1)
    )
    return Fraction(hits, math.comb(total, drawn))


def _bits(p: Fraction) -> float:
    p = min(p, Fraction(1))
    return math.inf if p == 0 else math.log2(p.denominator) - math.log2(p.numerator)


def _exact(n: int, k: int, t: int, c: int, d: int, active: bool) -> tuple[float, float]:
    """The module's three bounds, recomputed with exact integer arithmetic."""
    thr = (n - c) * _hyper_tail(n - 1, c, k, 2 * t - k - 1 if active else t)
    sep = Fraction(0)
    if k < n - 1:
        sep = Fraction(n * (n - k - 1), 2) * Fraction(math.comb(c + d, k), math.comb(n, k))
    fail = (n - d) * _hyper_tail(n - 1, d, k, k + 2 - t)
    if d:
        fail += d * _hyper_tail(n - 1, d - 1, k, k + 1 - t)
    return _bits(thr + sep), _bits(fail)


DEFAULT_TABLE = {  # n: (k, t) with the defaults (active adversary, 0.3 dropout, 0.1 corrupt)
    10: (8, 6),
    50: (36, 22),
    100: (70, 41),
    500: (272, 162),
    1000: (410, 245),
    10000: (774, 463),
}


@pytest.mark.parametrize(("n", "kt"), DEFAULT_TABLE.items())
def test_default_table(n: int, kt: tuple[int, int]) -> None:
    p = choose_parameters(n)
    assert (p.degree, p.threshold) == kt
    assert p.meets_target and not p.warnings
    assert p.security_bits >= 40 and p.failure_bits >= 20
    assert not p.full and p.adversary == "active"
    assert (p.dropout, p.corrupt) == (0.3, 0.1)


@pytest.mark.parametrize(
    ("n", "dropout", "corrupt", "adversary"),
    [
        (100, 0.3, 0.1, "semi-honest"),
        (300, 0.2, 0.05, "active"),
        (400, 0.3, 0.1, "semi-honest"),
        (1000, 0.3, 0.1, "active"),
    ],
)
def test_automatic_choice_meets_independent_exact_bounds(
    n: int, dropout: float, corrupt: float, adversary: graph.Adversary
) -> None:
    p = choose_parameters(n, dropout=dropout, corrupt=corrupt, adversary=adversary)
    c, d = math.floor(corrupt * n + 1e-9), math.floor(dropout * n + 1e-9)
    active = adversary == "active"
    sec, fail = _exact(n, p.degree, p.threshold, c, d, active)
    assert sec >= 40 and fail >= 20
    assert p.security_bits == pytest.approx(sec, rel=1e-8)
    assert p.failure_bits == pytest.approx(fail, rel=1e-8)
    if n <= 400:  # minimality: the next smaller even degree has no good threshold
        k = p.degree - 2
        for t in range(1, k + 2):
            s, f = _exact(n, k, t, c, d, active)
            assert s < 40 or f < 20


@pytest.mark.parametrize("n", [2, 3])
def test_full_graph_for_tiny_n(n: int) -> None:
    p = choose_parameters(n)
    assert p.full and p.degree == n - 1 and p.threshold == n
    assert p.security_bits == math.inf and p.failure_bits == math.inf


@pytest.mark.parametrize(("n", "dropout", "corrupt"), [(5, 0.3, 0.2), (21, 0.45, 0.05)])
def test_full_graph_when_no_sparse_degree_works(n: int, dropout: float, corrupt: float) -> None:
    p = choose_parameters(n, dropout=dropout, corrupt=corrupt)
    assert p.full and p.degree == n - 1 and p.meets_target


@pytest.mark.parametrize("n", [10, 37, 100, 1000])
def test_full_graph_threshold_rule(n: int) -> None:
    c, d = n // 10, 3 * n // 10
    lo, hi = (n + c) // 2 + 1, n - d  # Bonawitz et al. 2017: (n + n_C)/2 < t <= n - n_D
    p = choose_parameters(n, degree=n - 1)
    assert p.full and lo <= p.threshold <= hi
    for t in range(max(1, lo - 3), min(n, hi + 3) + 1):
        q = choose_parameters(n, degree=n - 1, threshold=t)
        assert q.meets_target == (lo <= t <= hi)
        assert q.security_bits == (math.inf if t >= lo else 0.0)
        assert q.failure_bits == (math.inf if t <= hi else 0.0)
        semi = choose_parameters(n, degree=n - 1, threshold=t, adversary="semi-honest")
        assert semi.security_bits == (math.inf if t > c else 0.0)


@pytest.mark.parametrize("n", [100, 2000])
def test_more_dropout_or_corruption_never_lowers_the_degree(n: int) -> None:
    for adversary in ("active", "semi-honest"):
        ks = [
            choose_parameters(n, dropout=x, adversary=adversary).degree
            for x in (0.0, 0.05, 0.1, 0.2, 0.3, 0.4)
        ]
        assert ks == sorted(ks)
        ks = [
            choose_parameters(n, corrupt=x, adversary=adversary).degree
            for x in (0.0, 0.01, 0.05, 0.1, 0.2)
        ]
        assert ks == sorted(ks)


def test_semi_honest_needs_a_smaller_degree() -> None:
    assert choose_parameters(10000, adversary="semi-honest").degree < 150
    assert choose_parameters(10000).degree > 500


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 3000),
    dropout=st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.4]),
    corrupt=st.sampled_from([0.0, 0.02, 0.1, 0.3]),
    adversary=st.sampled_from(["active", "semi-honest"]),
)
def test_automatic_choice_is_consistent(
    n: int, dropout: float, corrupt: float, adversary: graph.Adversary
) -> None:
    try:
        p = choose_parameters(n, dropout=dropout, corrupt=corrupt, adversary=adversary)
    except InfeasibleParameters:
        return
    assert p.meets_target and p.security_bits >= 40 and p.failure_bits >= 20
    assert 1 <= p.threshold <= p.degree + 1
    assert p.full == (p.degree == n - 1)
    assert p.full or p.degree % 2 == 0
    again = choose_parameters(
        n,
        dropout=dropout,
        corrupt=corrupt,
        adversary=adversary,
        degree=p.degree,
        threshold=p.threshold,
    )
    assert again == p
    fixed_t = choose_parameters(
        n, dropout=dropout, corrupt=corrupt, adversary=adversary, threshold=p.threshold
    )
    assert fixed_t.degree <= p.degree and fixed_t.meets_target


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 1}, r"n=1 clients"),
        ({"n": 100, "dropout": 0.5, "corrupt": 0.5}, r"dropout=0\.5 \+ corrupt=0\.5"),
        ({"n": 100, "dropout": 1.0}, r"dropout=1\.0 is outside"),
        ({"n": 100, "corrupt": -0.1}, r"corrupt=-0\.1"),
        ({"n": 100, "degree": 3, "threshold": 2}, r"degree 3 is odd.*degree=4"),
        ({"n": 100, "degree": 100}, r"degree 100 .*n=100.*degree=99"),
        ({"n": 100, "degree": 0}, r"degree 0 is below 2"),
        ({"n": 100, "degree": 4, "threshold": 6}, r"t=6 .*k\+1=5"),
        ({"n": 100, "degree": 4, "threshold": 0}, r"t=0 "),
        ({"n": 100, "threshold": 101}, r"t=101 "),
        ({"n": 100, "threshold": 2}, r"no degree with t=2 .*n=100.*t in \[56, 70\]"),
        (
            {"n": 10, "dropout": 0.6, "corrupt": 0.3},
            r"corrupt=0\.3 \(3 clients\), dropout=0\.6 \(6 clients\).*t in \[7, 4\]",
        ),
    ],
)
def test_infeasible_inputs_explain_themselves(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InfeasibleParameters, match=match):
        choose_parameters(**kwargs)  # type: ignore[arg-type]


def test_bad_types_and_targets() -> None:
    with pytest.raises(ConfigurationError):
        choose_parameters(100, security_bits=0)
    with pytest.raises(ConfigurationError):
        choose_parameters(100, failure_bits=math.inf)
    with pytest.raises(ConfigurationError, match="adversary"):
        choose_parameters(100, adversary="lazy")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        choose_parameters(100.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("adversary", ["active", "semi-honest"])
def test_explicit_choice_below_target_is_flagged(adversary: graph.Adversary) -> None:
    # Flower's example (num_shares=3, reconstruction_threshold=2) is k=2, t=2 here.
    for k in (2, 4):
        p = choose_parameters(100, degree=k, threshold=2, adversary=adversary)
        assert (p.degree, p.threshold, p.full) == (k, 2, False)
        assert not p.meets_target
        assert p.security_bits < 40
        assert any(f"k={k}, t=2 gives" in w and "below the 2^-40 target" in w for w in p.warnings)
        assert all("n=100" in w and adversary in w for w in p.warnings)
    active = choose_parameters(100, degree=4, threshold=2).warnings[0]
    assert "exposed with probability 1: with 2t <= k+1" in active


@pytest.mark.parametrize(
    ("n", "adversary", "threshold"),
    [
        (120, "active", None),
        (600, "active", None),
        (600, "semi-honest", None),
        (300, "active", 120),
        (600, "semi-honest", 40),
    ],
)
def test_automatic_degree_is_the_smallest_that_works(
    n: int, adversary: graph.Adversary, threshold: int | None
) -> None:
    # Brute force through the public API: an explicit degree gets its best threshold, so it
    # meets the target iff some threshold does.
    p = choose_parameters(n, adversary=adversary, threshold=threshold)
    assert p.meets_target
    for k in range(2, p.degree, 2):
        if threshold is None or threshold <= k + 1:
            q = choose_parameters(n, adversary=adversary, degree=k, threshold=threshold)
            assert not q.meets_target, k


def test_explicit_degree_gets_the_best_threshold() -> None:
    auto = choose_parameters(1000)
    p = choose_parameters(1000, degree=auto.degree)
    assert p == auto
    wide = choose_parameters(1000, degree=auto.degree + 100)
    assert wide.meets_target and wide.security_bits >= 40 and wide.failure_bits >= 20
    weak = choose_parameters(1000, degree=auto.degree, threshold=auto.threshold - 30)
    assert not weak.meets_target and weak.failure_bits >= 20
    assert len(weak.warnings) == 1 and "security" in weak.warnings[0]


def test_rates_are_read_as_decimals() -> None:
    assert graph._count(0.29, 100) == 29  # float 0.29 * 100 is 28.999999999999996
    assert graph._count(0.1, 30) == 3


def test_choice_is_fast() -> None:
    choose_parameters(10000)  # warm up numpy
    start = time.perf_counter()
    choose_parameters(10000)
    choose_parameters(10000, adversary="semi-honest")
    assert time.perf_counter() - start < 0.25  # about 15 ms here; generous for shared CPUs
