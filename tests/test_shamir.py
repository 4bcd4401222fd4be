"""Tests for :mod:`secagg.shamir`: correctness, privacy, robustness, malformed input."""

from __future__ import annotations

import contextlib
import itertools
import random
import secrets

import numpy as np
import pytest
from Crypto.Math import Primality
from Crypto.Protocol.SecretSharing import Shamir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secagg import shamir
from secagg.errors import ConfigurationError, ReconstructionError
from secagg.shamir import (
    MAX_X,
    PRIME,
    SECRET_BYTES,
    SHARE_BYTES,
    decode_share,
    encode_share,
    lagrange_at_zero,
    reconstruct,
    reconstruct_many,
    reconstruct_verified,
    split,
    split_many,
)

# The cases are cheap (well under 10 ms each): run several times the profile's example count.
SETTINGS = settings(
    max_examples=4 * settings().max_examples,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

secret_st = st.binary(min_size=SECRET_BYTES, max_size=SECRET_BYTES)
ids_st = st.integers(min_value=1, max_value=MAX_X)


# --- test-local reference arithmetic (naive, independent of the module) ------------------


def interpolate_at(points: list[tuple[int, int]], z: int) -> int:
    """Value at ``z`` of the polynomial of degree < len(points) through ``points``."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * (z - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total += yi * num * pow(den, -1, PRIME)
    return total % PRIME


def interpolate_coeffs(points: list[tuple[int, int]]) -> list[int]:
    """Coefficients (lowest first) of the polynomial of degree < len(points) through them."""
    out = [0] * len(points)
    for i, (xi, yi) in enumerate(points):
        basis = [1]
        den = 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                basis = [
                    (a - xj * b) % PRIME for a, b in zip([0, *basis], [*basis, 0], strict=True)
                ]
                den = den * (xi - xj) % PRIME
        scale = yi * pow(den, -1, PRIME) % PRIME
        out = [(o + scale * b) % PRIME for o, b in zip(out, basis, strict=True)]
    return out


def horner(coeffs: list[int], z: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * z + c) % PRIME
    return acc


class Check:
    """A ``check`` callback that accepts one secret and records every candidate."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.calls: list[bytes] = []

    def __call__(self, candidate: bytes) -> bool:
        self.calls.append(candidate)
        return candidate == self.secret


def as_int(secret: bytes) -> int:
    return int.from_bytes(secret, "big")


def corrupt(share: bytes) -> bytes:
    """A different, still well-formed share."""
    return encode_share((decode_share(share) + 1) % PRIME)


@st.composite
def sharings(draw: st.DrawFn, max_n: int = 10, min_t: int = 1) -> tuple[bytes, int, list[int]]:
    n = draw(st.integers(min_value=min_t, max_value=max_n))
    t = draw(st.integers(min_value=min_t, max_value=n))
    xs = draw(st.lists(ids_st, min_size=n, max_size=n, unique=True))
    return draw(secret_st), t, xs


# --- constants ---------------------------------------------------------------------------


def test_prime_is_prime_and_smallest_above_2_256() -> None:
    rng = random.Random(1)  # deterministic Miller-Rabin bases
    assert Primality.test_probable_prime(PRIME, randfunc=rng.randbytes) == Primality.PROBABLY_PRIME
    assert PRIME == 2**256 + 297
    assert all(
        Primality.test_probable_prime(2**256 + k, randfunc=rng.randbytes)
        != Primality.PROBABLY_PRIME
        for k in range(1, 297, 2)
    )


def test_sizes_fit() -> None:
    assert 2 ** (8 * SECRET_BYTES) < PRIME < 2 ** (8 * SHARE_BYTES)
    assert (PRIME.bit_length() + 7) // 8 == SHARE_BYTES
    assert MAX_X == 2**32 - 1
    assert MAX_X < PRIME


# --- encoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 2**256, PRIME - 1])
def test_share_encoding_round_trip(value: int) -> None:
    data = encode_share(value)
    assert len(data) == SHARE_BYTES
    assert data == value.to_bytes(SHARE_BYTES, "big")
    assert decode_share(data) == value


@pytest.mark.parametrize(
    "data",
    [b"", bytes(SHARE_BYTES - 1), bytes(SHARE_BYTES + 1), PRIME.to_bytes(33, "big"), b"\xff" * 33],
)
def test_decode_share_rejects(data: bytes) -> None:
    with pytest.raises(ReconstructionError):
        decode_share(data)


def test_decode_share_rejects_non_bytes() -> None:
    with pytest.raises(ReconstructionError):
        decode_share("x" * SHARE_BYTES)  # type: ignore[arg-type]
    with pytest.raises(ReconstructionError):
        decode_share(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-1, PRIME, 2**264, True])
def test_encode_share_rejects(value: int) -> None:
    with pytest.raises(ConfigurationError):
        encode_share(value)


# --- correctness -------------------------------------------------------------------------


@SETTINGS
@given(sharings(), st.data())
def test_any_t_of_n_reconstruct(case: tuple[bytes, int, list[int]], data: st.DataObject) -> None:
    secret, t, xs = case
    shares = split(secret, t, xs)
    assert sorted(shares) == sorted(xs)
    assert all(len(v) == SHARE_BYTES for v in shares.values())
    size = data.draw(st.integers(min_value=t, max_value=len(xs)), label="subset size")
    subset = data.draw(st.permutations(xs), label="order")[:size]
    got = {x: shares[x] for x in subset}
    assert reconstruct(got, t) == secret
    # The shares lie on one polynomial of degree < t whose constant term is the secret.
    points = [(x, decode_share(shares[x])) for x in sorted(subset)[:t]]
    assert interpolate_at(points, 0) == as_int(secret)
    assert all(interpolate_at(points, x) == decode_share(shares[x]) for x in xs)


def test_every_subset_small_case() -> None:
    secret = secrets.token_bytes(32)
    xs = [3, 9, 27, 81, 243, MAX_X]
    shares = split(secret, 3, xs)
    for k in range(3, len(xs) + 1):
        for subset in itertools.combinations(xs, k):
            assert reconstruct({x: shares[x] for x in subset}, 3) == secret


@pytest.mark.parametrize("secret", [bytes(32), b"\xff" * 32, (1).to_bytes(32, "big")])
def test_extreme_secrets_and_ids(secret: bytes) -> None:
    xs = [1, 2, MAX_X - 1, MAX_X]
    for t in range(1, 5):
        assert reconstruct(split(secret, t, xs), t) == secret


def test_threshold_one_shares_are_the_secret() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 1, [5, 6])
    assert set(shares.values()) == {(0).to_bytes(1, "big") + secret}


def test_fresh_randomness_per_secret_and_call() -> None:
    secret = secrets.token_bytes(32)
    xs = list(range(1, 6))
    a, b = split_many([secret, secret], 3, xs)
    c = split(secret, 3, xs)
    assert a != b
    assert a != c
    assert reconstruct(a, 3) == reconstruct(b, 3) == reconstruct(c, 3) == secret


def test_split_many_groups_and_long_polynomials() -> None:
    # More secrets than one packed group, degree well past several deferred reductions.
    sec = [secrets.token_bytes(32) for _ in range(11)]
    xs = random.Random(2).sample(range(MAX_X - 10_000, MAX_X + 1), 40)
    out = split_many(sec, 30, xs)
    assert len(out) == 11
    assert reconstruct_many(out, 30) == sec
    for secret, shares in zip(sec, out, strict=True):
        points = [(x, decode_share(shares[x])) for x in xs[:30]]
        assert all(interpolate_at(points, x) == decode_share(shares[x]) for x in xs[30:])
        assert interpolate_at(points, 0) == as_int(secret)


def test_split_many_empty() -> None:
    assert split_many([], 2, [1, 2]) == []


@SETTINGS
@given(
    st.lists(
        st.lists(st.integers(min_value=PRIME - 5, max_value=PRIME - 1), min_size=1, max_size=40),
        min_size=1,
        max_size=10,
    ),
    st.lists(st.integers(min_value=MAX_X - 50, max_value=MAX_X), min_size=1, max_size=5),
)
def test_packed_horner_worst_case(raw: list[list[int]], zs: list[int]) -> None:
    # Largest coefficients at the largest points: the deferred reductions' bounds are tight.
    m = min(len(p) for p in raw)
    polys = [p[:m] for p in raw]
    out = shamir._eval_polys(polys, zs)
    assert out == [[horner(p, z) for z in zs] for p in polys]


def test_result_above_2_256_is_rejected() -> None:
    # f(z) = (PRIME - 1) + 5 z: a field element that is no 32-byte secret.
    shares = {x: encode_share((PRIME - 1 + 5 * x) % PRIME) for x in (1, 2, 3)}
    with pytest.raises(ReconstructionError, match="2\\^256"):
        reconstruct(shares, 2)
    with pytest.raises(ReconstructionError, match="secret 1"):
        reconstruct_many([split(bytes(32), 2, [1, 2]), shares], 2)


# --- privacy -----------------------------------------------------------------------------


@SETTINGS
@given(sharings(max_n=8, min_t=2), secret_st, st.data())
def test_t_minus_1_shares_fit_every_secret(
    case: tuple[bytes, int, list[int]], target: bytes, data: st.DataObject
) -> None:
    secret, t, xs = case
    shares = split(secret, t, xs)
    seen = data.draw(st.permutations(xs), label="order")[: t - 1]
    points = [(x, decode_share(shares[x])) for x in seen]
    # For any target there is exactly one polynomial of degree <= t-1 through the t-1 shares
    # and (0, target): it is a possible sharing of target, so the shares say nothing.
    for candidate in (target, secret, bytes(32), b"\xff" * 32):
        g = interpolate_coeffs([(0, as_int(candidate)), *points])
        assert len(g) == t
        assert g[0] == as_int(candidate)
        assert all(horner(g, x) == y for x, y in points)
        fresh = max(xs) + 1 if max(xs) < MAX_X else min(xs) - 1
        if fresh in xs or fresh < 1:
            continue
        forged = {x: shares[x] for x in seen} | {fresh: encode_share(horner(g, fresh))}
        assert reconstruct(forged, t) == candidate
    # A scheme that leaked (degree < t-1, or coefficients tied to the secret) would give the
    # secret from t-1 shares; interpolating them as if the threshold were t-1 must not.
    leaked = interpolate_at(points, 0)
    assert leaked != as_int(secret)


def test_top_coefficient_is_random() -> None:
    # Degree exactly t-1 (top coefficient non-zero) and different between calls.
    xs = list(range(1, 6))
    tops = set()
    for _ in range(5):
        shares = split(bytes(32), 5, xs)
        coeffs = interpolate_coeffs([(x, decode_share(shares[x])) for x in xs])
        assert coeffs[0] == 0
        assert coeffs[-1] != 0
        tops.add(coeffs[-1])
    assert len(tops) == 5


# --- exactly t shares --------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage", [b"", b"\x00", PRIME.to_bytes(33, "big"), None, "text", b"\x01" * 33]
)
def test_reconstruct_uses_exactly_t_shares(garbage: object) -> None:
    secret = secrets.token_bytes(32)
    xs = list(range(10, 20))
    shares: dict[int, object] = dict(split(secret, 7, xs))
    for x in (17, 18, 19):  # the three largest ids: never used
        shares[x] = garbage
    assert reconstruct(shares, 7) == secret  # type: ignore[arg-type]
    assert reconstruct_many([shares, shares], 7) == [secret, secret]  # type: ignore[list-item]


def test_reconstruct_uses_the_smallest_ids() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 3, [1, 2, 3, 4])
    wrong = dict(shares)
    wrong[1] = corrupt(shares[1])
    assert reconstruct(wrong, 3) != secret
    del wrong[1]
    assert reconstruct(wrong, 3) == secret


def test_too_few_shares() -> None:
    shares = split(secrets.token_bytes(32), 4, [1, 2, 3, 4, 5])
    few = {x: shares[x] for x in (1, 2, 3)}
    with pytest.raises(ReconstructionError, match="fewer than the threshold 4"):
        reconstruct(few, 4)
    with pytest.raises(ReconstructionError, match="secret 0"):
        reconstruct_many([few], 4)
    with pytest.raises(ReconstructionError):
        reconstruct({}, 1)


# --- cross-check with pycryptodome (GF(2^128)) ------------------------------------------


@settings(deadline=None)
@given(
    st.integers(min_value=2, max_value=5),
    st.integers(min_value=0, max_value=3),
    st.binary(min_size=16, max_size=16),
)
def test_cross_check_pycryptodome(k: int, extra: int, secret16: bytes) -> None:
    n = k + extra
    ours = split(bytes(16) + secret16, k, list(range(1, n + 1)))
    theirs = dict(Shamir.split(k, n, secret16))
    assert sorted(theirs) == sorted(ours)
    for subset in itertools.combinations(range(1, n + 1), k):
        assert Shamir.combine([(x, theirs[x]) for x in subset]) == secret16
        assert reconstruct({x: ours[x] for x in subset}, k) == bytes(16) + secret16
    for subset in itertools.combinations(range(1, n + 1), k - 1):
        # Both schemes give a wrong value from k-1 shares (interpolating as if k-1 sufficed).
        assert Shamir.combine([(x, theirs[x]) for x in subset]) != secret16
        got = {x: ours[x] for x in subset}
        with pytest.raises(ReconstructionError):
            reconstruct(got, k)
        with contextlib.suppress(ReconstructionError):  # a wrong value may even be >= 2^256
            assert reconstruct(got, k - 1) != bytes(16) + secret16


# --- Lagrange coefficients ---------------------------------------------------------------


@SETTINGS
@given(st.lists(ids_st, min_size=1, max_size=12, unique=True))
def test_lagrange_at_zero(xs: list[int]) -> None:
    lam = lagrange_at_zero(xs)
    assert sum(lam) % PRIME == 1  # the constant polynomial 1
    for i, xi in enumerate(xs):
        expected = 1
        for xj in xs:
            if xj != xi:
                expected = expected * xj * pow(xj - xi, -1, PRIME) % PRIME
        assert lam[i] == expected
    if len(xs) > 1:  # f(z) = z vanishes at 0
        assert sum(c * x for c, x in zip(lam, xs, strict=True)) % PRIME == 0


@pytest.mark.parametrize("xs", [[], [0, 1], [1, 1], [1, MAX_X + 1], [-3, 2], [1.0, 2]])
def test_lagrange_rejects(xs: list[int]) -> None:
    with pytest.raises(ConfigurationError):
        lagrange_at_zero(xs)


# --- reconstruct_many --------------------------------------------------------------------


def test_reconstruct_many_mixed_point_sets() -> None:
    xs = list(range(100, 112))
    sec = [secrets.token_bytes(32) for _ in range(6)]
    all_shares = split_many(sec, 5, xs)
    tables = []
    for i, shares in enumerate(all_shares):
        keep = xs[i % 3 :]  # three different survivor sets, each used twice
        tables.append({x: shares[x] for x in keep})
    assert reconstruct_many(tables, 5) == sec
    assert reconstruct_many([], 5) == []


def _naive_scaled_derivatives(xs: list[int]) -> list[int]:
    """``x_i prod_{j != i} (x_i - x_j) mod p``, one product at a time (obviously right)."""
    out = []
    for xi in xs:
        v = xi
        for xj in xs:
            if xj != xi:
                v = v * (xi - xj) % PRIME
        out.append(v)
    return out


@settings(max_examples=10, deadline=None)
@given(
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=1, max_value=4),
    st.sampled_from([50, 2**16, MAX_X]),
    st.randoms(use_true_random=False),
)
def test_field_kernel_matches_python(t: int, rows: int, top: int, rnd: random.Random) -> None:
    """The Numba limb kernel gives exactly the Python big-integer denominators, also with
    ids at the ends of the uint32 range (the largest differences and products)."""
    from secagg.kernels import field

    t = min(t, top)
    sets = [sorted(rnd.sample(range(1, top + 1), t)) for _ in range(rows)]
    if t >= 2:
        sets[0] = sorted({1, top, *sets[0][2:]})
        t = len(sets[0])
        sets = [sets[0]] + [sorted(rnd.sample(range(1, top + 1), t)) for _ in range(rows - 1)]
    got = field.scaled_derivatives(np.array(sets, dtype=np.int64))
    assert got == [_naive_scaled_derivatives(xs) for xs in sets]
    assert got == [shamir._scaled_derivatives(xs) for xs in sets]


def test_field_kernel_worst_case_ids() -> None:
    """All ids near 2^32 and near 1: every factor about 2^32, the limb overflow at its
    largest; and the two largest-magnitude differences of the range."""
    from secagg.kernels import field

    sets = [
        [1, 2, 3, MAX_X - 2, MAX_X - 1, MAX_X],
        [1, 2**31, MAX_X, 2**31 + 1, 7, 2**31 - 1],
    ]
    sets = [sorted(xs) for xs in sets]
    assert field.scaled_derivatives(np.array(sets, dtype=np.int64)) == [
        _naive_scaled_derivatives(xs) for xs in sets
    ]


def test_reconstruct_many_kernel_path_with_distinct_holder_sets() -> None:
    """A SecAgg+ server's case: every secret held by a different set of 60 holders among
    ids 1..200 (above the kernel's work threshold), reconstructed exactly; the bases equal
    the Python path's."""
    rnd = random.Random(14)
    t = 60
    sec = [secrets.token_bytes(32) for _ in range(40)]
    tables = []
    for secret in sec:
        holders = sorted(rnd.sample(range(1, 201), t + 5))
        tables.append(split(secret, t, holders))
    assert 40 * t * t >= shamir._KERNEL_MIN_WORK
    assert reconstruct_many(tables, t) == sec
    assert shamir.reconstruct_each(tables, t) == sec
    chosen = [tuple(sorted(tb)[:t]) for tb in tables]
    assert shamir._lagrange_many(chosen) == [shamir._lagrange(xs) for xs in chosen]


# --- robust reconstruction ---------------------------------------------------------------


@SETTINGS
@given(
    st.integers(min_value=1, max_value=20),
    st.integers(min_value=1, max_value=2),
    st.data(),
)
def test_verified_finds_secret_among_t_plus_3(t: int, n_bad: int, data: st.DataObject) -> None:
    xs = data.draw(st.lists(ids_st, min_size=t + 3, max_size=t + 3, unique=True), label="xs")
    secret = secrets.token_bytes(32)
    shares = split(secret, t, xs)
    bad = data.draw(st.permutations(xs), label="bad")[:n_bad]
    for i, x in enumerate(bad):
        how = data.draw(st.sampled_from(["plus1", "random", "short", "big"]), label=f"bad{i}")
        shares[x] = {
            "plus1": corrupt(shares[x]),
            "random": encode_share(secrets.randbelow(PRIME)),
            "short": shares[x][1:],
            "big": PRIME.to_bytes(33, "big"),
        }[how]
    check = Check(secret)
    got, suspects = reconstruct_verified(shares, t, check)
    assert got == secret
    # A corrupted share that happened to stay on the polynomial is no suspect (probability 0
    # for "plus1", negligible for "random").
    assert suspects == frozenset(bad)
    assert len(check.calls) <= 64


def test_verified_no_bad_shares() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 4, range(1, 9))
    check = Check(secret)
    got, suspects = reconstruct_verified(shares, 4, check)
    assert (got, suspects) == (secret, frozenset())
    assert check.calls == [secret]  # the first t shares are tried first


def test_verified_bad_extra_only() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 4, range(1, 9))
    shares[8] = corrupt(shares[8])
    assert reconstruct_verified(shares, 4, lambda s: s == secret) == (secret, frozenset({8}))


def test_verified_blames_shares_that_cancel_in_the_secret() -> None:
    # For xs = 1, 2, 3 the Lagrange coefficients at 0 are 3, -3, 1: adding the same error to
    # shares 1 and 2 leaves the secret right, so the first t shares pass the check with a
    # wrong polynomial. The suspects must still be 1 and 2, not the honest 4, 5, 6.
    secret = secrets.token_bytes(32)
    shares = split(secret, 3, range(1, 7))
    shares[1] = corrupt(shares[1])
    shares[2] = corrupt(shares[2])
    assert reconstruct(shares, 3) == secret
    check = Check(secret)
    assert reconstruct_verified(shares, 3, check) == (secret, frozenset({1, 2}))
    assert check.calls == [secret]


@pytest.mark.parametrize(("t", "n", "n_bad"), [(3, 6, 2), (5, 8, 2), (4, 9, 3), (4, 8, 2)])
def test_verified_every_placement_small_ids(t: int, n: int, n_bad: int) -> None:
    # Small consecutive ids and equal errors make cancellations likely; within
    # (n - t + 1) // 2 wrong shares the secret and the suspects are always exact.
    xs = list(range(1, n + 1))
    for bad in itertools.combinations(xs, n_bad):
        secret = secrets.token_bytes(32)
        shares = split(secret, t, xs)
        for x in bad:
            shares[x] = corrupt(shares[x])
        assert reconstruct_verified(shares, t, Check(secret)) == (secret, frozenset(bad))


def test_verified_many_errors_decoded_at_once() -> None:
    # n = 25, t = 5: Gao's decoder corrects (25 - 5) // 2 = 10 wrong shares in one attempt.
    secret = secrets.token_bytes(32)
    xs = random.Random(3).sample(range(1, MAX_X), 25)
    shares = split(secret, 5, xs)
    bad = sorted(xs)[:10]
    for x in bad:
        shares[x] = encode_share(secrets.randbelow(PRIME))
    check = Check(secret)
    got, suspects = reconstruct_verified(shares, 5, check)
    assert (got, suspects) == (secret, frozenset(bad))
    assert len(check.calls) <= 2


def test_verified_too_many_bad() -> None:
    secret = secrets.token_bytes(32)
    xs = list(range(1, 9))
    shares = split(secret, 5, xs)
    for x in (2, 4, 6, 8):  # only 4 good shares left for t = 5
        shares[x] = corrupt(shares[x])
    with pytest.raises(ReconstructionError, match=r"8 shares .* after \d+ attempts"):
        reconstruct_verified(shares, 5, lambda s: s == secret)


def test_verified_attempt_budget() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 4, range(1, 8))
    shares[1] = corrupt(shares[1])
    shares[2] = corrupt(shares[2])
    check = Check(secret)
    with pytest.raises(ReconstructionError, match="after 2 attempts"):
        reconstruct_verified(shares, 4, check, max_attempts=2)
    assert len(check.calls) <= 2


def test_verified_too_few_well_formed() -> None:
    shares = split(secrets.token_bytes(32), 3, [1, 2, 3, 4])
    shares[1] = b"short"
    shares[2] = b"short"
    with pytest.raises(ReconstructionError, match="2 well-formed shares of 4"):
        reconstruct_verified(shares, 3, lambda s: True)


def test_verified_rejects_bad_arguments() -> None:
    shares = split(secrets.token_bytes(32), 2, [1, 2, 3])
    with pytest.raises(ConfigurationError):
        reconstruct_verified(shares, 0, lambda s: True)
    with pytest.raises(ConfigurationError):
        reconstruct_verified(shares, 2, lambda s: True, max_attempts=0)


# --- malformed input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "threshold", "xs"),
    [
        (bytes(31), 2, [1, 2, 3]),
        (bytes(33), 2, [1, 2, 3]),
        ("a" * 32, 2, [1, 2, 3]),
        (bytes(32), 0, [1, 2, 3]),
        (bytes(32), 4, [1, 2, 3]),
        (bytes(32), -1, [1, 2, 3]),
        (bytes(32), True, [1, 2, 3]),
        (bytes(32), 2.0, [1, 2, 3]),
        (bytes(32), 2, [1, 2, 2]),
        (bytes(32), 2, [0, 1, 2]),
        (bytes(32), 2, [1, 2, MAX_X + 1]),
        (bytes(32), 2, [-1, 1, 2]),
        (bytes(32), 2, [1, 2, "3"]),
        (bytes(32), 2, [True, 2, 3]),
        (bytes(32), 1, []),
    ],
)
def test_split_rejects(secret: bytes, threshold: int, xs: list[int]) -> None:
    with pytest.raises(ConfigurationError):
        split(secret, threshold, xs)
    with pytest.raises(ConfigurationError):
        split_many([bytes(32), secret], threshold, xs)


def test_reconstruct_rejects() -> None:
    shares = split(secrets.token_bytes(32), 2, [1, 2, 3])
    for threshold in (0, -2, True):
        with pytest.raises(ConfigurationError):
            reconstruct(shares, threshold)
        with pytest.raises(ConfigurationError):
            reconstruct_many([shares], threshold)
    bad_values: list[object] = [shares[1][:-1], shares[1] + b"\0", PRIME.to_bytes(33, "big")]
    for value in bad_values:
        with pytest.raises(ReconstructionError):
            reconstruct({**shares, 1: value}, 2)  # type: ignore[dict-item]
    for key in (0, -1, MAX_X + 1):
        with pytest.raises(ReconstructionError, match="share ids"):
            reconstruct({**shares, key: shares[1]}, 2)
    with pytest.raises(ReconstructionError, match="share ids"):
        reconstruct({"1": shares[1], 2: shares[2]}, 2)  # type: ignore[dict-item]
