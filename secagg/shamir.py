"""Shamir secret sharing (Shamir 1979) over the prime field GF(p), p = 2^256 + 297.

Used for the two per-client secrets of SecAgg (Bonawitz et al. 2017, section 4): the
self-mask seed and the X25519 mask private key, both 32 bytes. Every 32-byte string is one
field element, so a secret is the constant term of a random polynomial of degree ``t - 1``
and a share is that polynomial evaluated at the holder's participant id.

Wire format: a share is its field element as :data:`SHARE_BYTES` big-endian bytes.

Speed notes (pure Python integers; the interpreter loops over coefficients or points, never
over both):

* evaluation is Horner's rule run for all points at once (one list comprehension per
  coefficient), with the secrets of one call packed side by side into 512-bit slots of a
  single integer, so one multiplication by ``x`` serves every secret (this shares the powers
  of ``x`` across secrets without storing a Vandermonde matrix, and multiplies by 32-bit ``x``
  instead of 256-bit powers); reduction modulo p is deferred and done with the identity
  ``2^256 = -297 (mod p)`` every 7 steps;
* Lagrange denominators are formed column by column for all points at once and inverted
  together with Montgomery's trick (one modular inversion per batch of point sets); a large
  batch of point sets (a SecAgg+ server's one holder set per client) forms them in the
  Numba kernel of :mod:`secagg.kernels.field`, exact fixed-width limb arithmetic, every set
  in parallel;
* :func:`reconstruct_verified` decodes with Gao's Reed-Solomon decoder (Gao 2003, "A new
  algorithm for decoding Reed-Solomon codes"), which corrects up to ``(n - t) // 2`` wrong
  shares, before falling back to erasure guesses and pseudo-random subsets.
"""

from __future__ import annotations

import itertools
import operator
import random
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import SupportsIndex

from secagg.errors import ConfigurationError, ReconstructionError

__all__ = [
    "MAX_X",
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "decode_share",
    "decode_shares",
    "encode_share",
    "lagrange_at_zero",
    "reconstruct",
    "reconstruct_each",
    "reconstruct_many",
    "reconstruct_verified",
    "split",
    "split_many",
]

PRIME: int = 2**256 + 297
"""Field modulus: the smallest prime above 2^256 (Miller-Rabin + Lucas, checked in tests)."""

SECRET_BYTES = 32
"""Secret size: ChaCha20 seeds (RFC 8439 section 2.3) and X25519 keys (RFC 7748 section 5)."""

SHARE_BYTES = 33
"""Share size: a field element below 2^257, big-endian, ceil(257 / 8) = 33 bytes."""

MAX_X = 2**32 - 1
"""Largest evaluation point: participant ids are unsigned 32-bit integers."""

_FOLD = 297
"""``2^256 = -_FOLD (mod PRIME)``: the partial reduction used between Horner steps."""

_LOW = 2**256 - 1
"""Mask of a slot's low 256 bits; with 512-bit slots it also masks the high half after >> 256."""

_SLOT = 512
"""Bits per packed slot. A slot below 2^258 grows at most 32 bits per Horner step (x < 2^32),
so after ``_REDUCE_EVERY`` = 7 steps it is below 2^482 < 2^512: no carry between slots."""

_REDUCE_EVERY = 7
"""Horner steps between partial reductions: after 7 steps the high half h < 2^226 and
297 h < p, so ``low + p - 297 h`` is non-negative and below 2^258 (see :func:`_eval_polys`)."""

_GROUP = 8
"""Secrets packed into one integer per evaluation point."""

_SEED_LABEL = b"secagg/v1/shamir/subsets"
"""Seed prefix of the (non-secret) generator that picks subsets in reconstruct_verified."""


# --- encoding ---------------------------------------------------------------------------


def encode_share(value: int) -> bytes:
    """Encode a field element as a share.

    Parameters
    ----------
    value:
        Integer in ``[0, PRIME)``.

    Returns
    -------
    bytes
        :data:`SHARE_BYTES` big-endian bytes.

    Raises
    ------
    ConfigurationError
        If ``value`` is not an integer in range.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < PRIME:
        raise ConfigurationError("share value must be an integer in [0, PRIME)")
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """Decode a share to its field element.

    Parameters
    ----------
    data:
        :data:`SHARE_BYTES` big-endian bytes.

    Returns
    -------
    int
        The value, in ``[0, PRIME)``.

    Raises
    ------
    ReconstructionError
        On a wrong length, a value ``>= PRIME`` or a non-bytes argument.
    """
    return _decode_values([data])[0]


def decode_shares(values: Sequence[bytes]) -> list[int]:
    """Decode many shares at once (C-level loops), raising as :func:`decode_share` does."""
    return _decode_values(values)


def _decode_values(values: Sequence[bytes]) -> list[int]:
    """Decode many shares at once (C-level loops); see :func:`decode_share`."""
    try:
        if values and set(map(len, values)) != {SHARE_BYTES}:
            raise ReconstructionError(f"a share is not {SHARE_BYTES} bytes long")
        if not set(map(type, values)) <= {bytes, bytearray}:
            raise ReconstructionError("a share is not bytes")
    except TypeError:
        raise ReconstructionError("a share is not bytes") from None
    ints = [int.from_bytes(v, "big") for v in values]
    if ints and max(ints) >= PRIME:
        raise ReconstructionError("a share value is not below PRIME")
    return ints


def _secret_bytes(value: int) -> bytes:
    """Turn a reconstructed field element into a secret, rejecting values >= 2^256."""
    if value >> (8 * SECRET_BYTES):
        raise ReconstructionError("reconstructed value is not a 32-byte secret (>= 2^256)")
    return value.to_bytes(SECRET_BYTES, "big")


# --- argument checks --------------------------------------------------------------------


def _as_x(x: SupportsIndex) -> int:
    """Normalise one evaluation point (any ``__index__`` integer except bool)."""
    if isinstance(x, bool):
        raise TypeError("bool is not a participant id")
    return operator.index(x)


def _check_points(xs: Sequence[int]) -> list[int]:
    """Validate evaluation points: integers in ``1..MAX_X``, pairwise distinct."""
    try:
        points = [_as_x(x) for x in xs]
    except TypeError:
        raise ConfigurationError("evaluation points must be integers") from None
    if points and (min(points) < 1 or max(points) > MAX_X):
        raise ConfigurationError(f"evaluation points must lie in 1..{MAX_X}")
    if len(set(points)) != len(points):
        raise ConfigurationError("evaluation points must be distinct")
    return points


def _check_threshold(threshold: int) -> int:
    """Validate a threshold on its own (``>= 1``); callers compare it with the point count."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ConfigurationError(f"threshold must be an integer >= 1, got {threshold!r}")
    return threshold


def _share_points(shares: Mapping[int, bytes]) -> tuple[list[int], Mapping[int, bytes]]:
    """Sorted, validated share ids and a mapping keyed by plain ``int``."""
    if set(map(type, shares)) <= {int}:
        xs = sorted(shares)
        table = shares
    else:
        plain: dict[int, bytes] = {}
        try:
            for key, value in shares.items():
                plain[_as_x(key)] = value
        except TypeError:
            raise ReconstructionError("share ids must be integers") from None
        if len(plain) != len(shares):
            raise ReconstructionError("share ids must be distinct")
        xs = sorted(plain)
        table = plain
    if xs and (xs[0] < 1 or xs[-1] > MAX_X):
        raise ReconstructionError(f"share ids must lie in 1..{MAX_X}")
    return xs, table


# --- field and polynomial helpers -------------------------------------------------------


def _batch_inverse(values: Sequence[int]) -> list[int]:
    """Inverses of non-zero field elements with one exponentiation (Montgomery's trick)."""
    prefix = [1] * len(values)
    acc = 1
    for i, v in enumerate(values):
        prefix[i] = acc
        acc = acc * v % PRIME
    inv = pow(acc, -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


def _scaled_derivatives(xs: Sequence[int]) -> list[int]:
    """``x_i * prod_{j != i} (x_i - x_j) mod p`` for all i (O(n^2), one column per step)."""
    acc = list(xs)
    for j, xj in enumerate(xs):
        keep = acc[j]
        acc = [a * (x - xj) for a, x in zip(acc, xs, strict=True)]
        acc[j] = keep
        if j % _REDUCE_EVERY == _REDUCE_EVERY - 1:
            acc = [a % PRIME for a in acc]
    return [a % PRIME for a in acc]


def _lagrange(xs: Sequence[int]) -> list[int]:
    """Lagrange coefficients at zero for validated, distinct, non-zero ``xs``.

    ``l_i(0) = prod_{j != i} x_j / (x_j - x_i) = (-1)^(n-1) N / (x_i prod_{j != i}(x_i - x_j))``
    with ``N = prod_j x_j``.
    """
    inv = _batch_inverse(_scaled_derivatives(xs))
    n_prod = 1
    for x in xs:
        n_prod = n_prod * x % PRIME
    if len(xs) % 2 == 0:
        n_prod = PRIME - n_prod
    return [n_prod * v % PRIME for v in inv]


_KERNEL_MIN_WORK = 1 << 17
"""Point-difference products (``sets x t^2``) from which :func:`_lagrange_many` hands the
denominators to the Numba kernel (:mod:`secagg.kernels.field`); below it, thread start-up
costs more than Python's ``O(t^2)`` big-integer loop."""


def _lagrange_many(sets: Sequence[Sequence[int]]) -> list[list[int]]:
    """:func:`_lagrange` of many validated point sets, with one modular inversion in all.

    Large batches of equal-size sets form their denominators ``x_i prod (x_i - x_j)`` in the
    Numba kernel of :mod:`secagg.kernels.field` (exact, the same values as
    :func:`_scaled_derivatives`), all sets in parallel: a SecAgg+ server reconstructs one
    secret per client from that client's own holders, so no two sets need be alike.
    """
    if not sets:
        return []
    sizes = {len(xs) for xs in sets}
    work = sum(len(xs) ** 2 for xs in sets)
    if len(sizes) == 1 and work >= _KERNEL_MIN_WORK:
        import numpy as np

        from secagg.kernels import field

        derivs = field.scaled_derivatives(np.array(sets, dtype=np.int64))
    else:
        derivs = [_scaled_derivatives(xs) for xs in sets]
    flat = _batch_inverse([v for row in derivs for v in row])
    out: list[list[int]] = []
    at = 0
    for xs in sets:
        n_prod = 1
        for x in xs:
            n_prod = n_prod * x % PRIME
        if len(xs) % 2 == 0:
            n_prod = PRIME - n_prod
        out.append([n_prod * v % PRIME for v in flat[at : at + len(xs)]])
        at += len(xs)
    return out


def _eval_polys(polys: Sequence[Sequence[int]], zs: Sequence[int]) -> list[list[int]]:
    """Evaluate polynomials at many points.

    Parameters
    ----------
    polys:
        Coefficient lists, lowest degree first, all of the same length ``m >= 1``, entries in
        ``[0, PRIME)``.
    zs:
        Points in ``[0, 2^32)``.

    Returns
    -------
    list[list[int]]
        ``out[i][k] = polys[i](zs[k]) mod PRIME``.

    Notes
    -----
    Up to ``_GROUP`` polynomials share one integer per point, slot ``i`` at bit ``512 i``.
    Invariant: every slot is non-negative and below 2^258 after a reduction, hence below
    2^482 before the next one; the fold ``low + p - 297 * high`` keeps each slot's residue
    modulo p and brings it back below 2^256 + p < 2^258.
    """
    out: list[list[int]] = []
    n_coeffs = len(polys[0]) if polys else 0
    for start in range(0, len(polys), _GROUP):
        group = polys[start : start + _GROUP]
        width = len(group)
        shifts = [_SLOT * i for i in range(width)]
        packed = [
            sum(c << s for c, s in zip(column, shifts, strict=True))
            for column in zip(*group, strict=True)
        ]
        low = sum(_LOW << s for s in shifts)
        fold = sum(PRIME << s for s in shifts)
        acc = [packed[-1]] * len(zs)
        for step in range(1, n_coeffs):
            c = packed[n_coeffs - 1 - step]
            acc = [a * z + c for a, z in zip(acc, zs, strict=True)]
            if step % _REDUCE_EVERY == 0:
                acc = [(a & low) + fold - ((a >> 256) & low) * _FOLD for a in acc]
        slot = (1 << _SLOT) - 1
        out.extend([((a >> s) & slot) % PRIME for a in acc] for s in shifts)
    return out


def _trim(poly: list[int]) -> list[int]:
    """Drop zero leading coefficients (the zero polynomial is ``[]``)."""
    while poly and not poly[-1]:
        poly.pop()
    return poly


def _poly_from_roots(xs: Sequence[int]) -> list[int]:
    """Coefficients of ``prod_j (z - x_j)``, lowest degree first."""
    coeffs = [1]
    for step, x in enumerate(xs, 1):
        coeffs = [a - x * b for a, b in zip([0, *coeffs], [*coeffs, 0], strict=True)]
        if step % _REDUCE_EVERY == 0:
            coeffs = [c % PRIME for c in coeffs]
    return [c % PRIME for c in coeffs]


def _interpolate(xs: Sequence[int], ys: Sequence[int], roots: Sequence[int]) -> list[int]:
    """Coefficients (length n) of the polynomial of degree < n through ``(xs, ys)``.

    ``f = sum_i y_i w_i L(z) / (z - x_i)`` with ``L = prod (z - x_j)`` (``roots``) and
    barycentric weights ``w_i = 1 / L'(x_i)``; the quotients ``L / (z - x_i)`` are built by
    synthetic division one degree at a time for all ``i`` together.
    """
    n = len(xs)
    inv = _batch_inverse(_scaled_derivatives(xs))
    c = [y * x % PRIME * v % PRIME for x, y, v in zip(xs, ys, inv, strict=True)]
    f = [0] * n
    column = [1] * n
    f[n - 1] = sum(c) % PRIME
    for step, k in enumerate(range(n - 1, 0, -1), 1):
        lk = roots[k]
        column = [lk + x * q for x, q in zip(xs, column, strict=True)]
        if step % _REDUCE_EVERY == 0:
            column = [q % PRIME for q in column]
        f[k - 1] = sum(map(operator.mul, c, column)) % PRIME
    return f


def _poly_divmod(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    """Quotient and remainder of trimmed polynomials, ``b`` non-zero."""
    db = len(b) - 1
    if len(a) - 1 < db:
        return [], list(a)
    inv_lead = pow(b[-1], -1, PRIME)
    rem = list(a)
    body = b[:db]
    quot = [0] * (len(a) - db)
    for i in range(len(a) - 1 - db, -1, -1):
        coef = rem[i + db] * inv_lead % PRIME
        quot[i] = coef
        if coef:
            rem[i : i + db] = [
                (r - coef * v) % PRIME for r, v in zip(rem[i : i + db], body, strict=True)
            ]
    return _trim(quot), _trim(rem[:db])


def _poly_mul(a: list[int], b: list[int]) -> list[int]:
    """Product of two polynomials (schoolbook over the shorter operand)."""
    if not a or not b:
        return []
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    out = [0] * (len(a) + len(b) - 1)
    span = len(long_)
    for i, s in enumerate(short):
        if s:
            out[i : i + span] = [o + s * v for o, v in zip(out[i : i + span], long_, strict=True)]
    return _trim([o % PRIME for o in out])


def _poly_sub(a: list[int], b: list[int]) -> list[int]:
    """Difference of two polynomials."""
    size = max(len(a), len(b))
    a2 = a + [0] * (size - len(a))
    b2 = b + [0] * (size - len(b))
    return _trim([(u - v) % PRIME for u, v in zip(a2, b2, strict=True)])


def _decode(xs: Sequence[int], ys: Sequence[int], k: int) -> list[int] | None:
    """Gao's Reed-Solomon decoder (Gao 2003, algorithm 1).

    Finds the polynomial of degree < k through all but at most ``(n - k) // 2`` of the points.
    With more wrong points it returns ``None`` or some other polynomial: callers verify.

    Returns
    -------
    list[int] | None
        ``k`` coefficients, lowest degree first.
    """
    n = len(xs)
    g0 = _poly_from_roots(xs)
    g1 = _trim(_interpolate(xs, ys, g0))
    r0, r1 = g0, g1
    v0: list[int] = []
    v1 = [1]
    # Partial extended Euclid until deg(r1) < (n + k) / 2.
    while 2 * (len(r1) - 1) >= n + k:
        q, r = _poly_divmod(r0, r1)
        r0, r1 = r1, r
        v0, v1 = v1, _poly_sub(v0, _poly_mul(q, v1))
    f, rem = _poly_divmod(r1, v1)
    if rem or len(f) > k:
        return None
    return f + [0] * (k - len(f))


# --- sharing ----------------------------------------------------------------------------


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Split one 32-byte secret into shares at the points ``xs``.

    Parameters
    ----------
    secret:
        :data:`SECRET_BYTES` bytes; the polynomial's constant term, read big-endian.
    threshold:
        Shares needed to reconstruct: the polynomial has degree ``threshold - 1``.
    xs:
        Distinct evaluation points (participant ids) in ``1..MAX_X``.

    Returns
    -------
    dict[int, bytes]
        ``{x: share}`` for every ``x`` in ``xs``, shares :data:`SHARE_BYTES` long.

    Raises
    ------
    ConfigurationError
        On a secret of the wrong size, a threshold outside ``1..len(xs)`` or bad points.
    """
    return split_many([secret], threshold, xs)[0]


def split_many(
    secrets_: Sequence[bytes], threshold: int, xs: Sequence[int]
) -> list[dict[int, bytes]]:
    """Split several secrets to the same points with the same threshold.

    Each secret gets its own independent random polynomial (coefficients drawn with
    :func:`secrets.randbelow`); the evaluation work per point is shared across secrets.

    Parameters
    ----------
    secrets_:
        Secrets of :data:`SECRET_BYTES` bytes each.
    threshold:
        Shares needed to reconstruct each secret.
    xs:
        Distinct evaluation points in ``1..MAX_X``.

    Returns
    -------
    list[dict[int, bytes]]
        One ``{x: share}`` mapping per secret, in order.

    Raises
    ------
    ConfigurationError
        As for :func:`split`.
    """
    points = _check_points(xs)
    t = _check_threshold(threshold)
    if t > len(points):
        raise ConfigurationError(f"threshold {t} exceeds the number of points {len(points)}")
    polys: list[list[int]] = []
    for secret in secrets_:
        if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_BYTES:
            raise ConfigurationError(f"a secret must be {SECRET_BYTES} bytes")
        coeffs = [int.from_bytes(secret, "big")]
        coeffs.extend(secrets.randbelow(PRIME) for _ in range(t - 1))
        polys.append(coeffs)
    if not polys:
        return []
    return [
        dict(zip(points, [v.to_bytes(SHARE_BYTES, "big") for v in values], strict=True))
        for values in _eval_polys(polys, points)
    ]


# --- reconstruction ---------------------------------------------------------------------


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Lagrange coefficients at zero for a point set.

    Parameters
    ----------
    xs:
        Distinct points in ``1..MAX_X`` (at least one).

    Returns
    -------
    list[int]
        ``l_i(0) mod PRIME`` in the order of ``xs``: ``f(0) = sum_i l_i(0) f(x_i)`` for every
        polynomial ``f`` of degree ``< len(xs)``.

    Raises
    ------
    ConfigurationError
        On an empty, repeated or out-of-range point.
    """
    points = _check_points(xs)
    if not points:
        raise ConfigurationError("need at least one point")
    return _lagrange(points)


def _chosen(shares: Mapping[int, bytes], t: int) -> tuple[tuple[int, ...], list[int]]:
    """The first ``t`` share ids by ascending x and their decoded values."""
    xs, table = _share_points(shares)
    if len(xs) < t:
        raise ReconstructionError(f"{len(xs)} shares, fewer than the threshold {t}")
    chosen = tuple(xs[:t])
    return chosen, _decode_values(list(map(table.__getitem__, chosen)))


def reconstruct(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Reconstruct a secret from exactly ``threshold`` shares.

    Parameters
    ----------
    shares:
        ``{x: share}``; the ``threshold`` smallest ids are used and the others are ignored
        (not even decoded).
    threshold:
        The threshold the secret was split with.

    Returns
    -------
    bytes
        The :data:`SECRET_BYTES`-byte secret.

    Raises
    ------
    ConfigurationError
        If ``threshold < 1``.
    ReconstructionError
        On fewer than ``threshold`` shares, a malformed used share or id, or a result that is
        not a 32-byte value (which means the shares are wrong).
    """
    t = _check_threshold(threshold)
    chosen, ys = _chosen(shares, t)
    return _secret_bytes(sum(map(operator.mul, _lagrange(chosen), ys)) % PRIME)


def reconstruct_many(shares: Sequence[Mapping[int, bytes]], threshold: int) -> list[bytes]:
    """Reconstruct many secrets, each as :func:`reconstruct` does.

    Lagrange coefficients are computed once per distinct chosen point set, all sets in one
    batch (:func:`_lagrange_many`), so secrets whose shares come from the same holders cost
    one dot product each.

    Parameters
    ----------
    shares:
        One ``{x: share}`` mapping per secret.
    threshold:
        The common threshold.

    Returns
    -------
    list[bytes]
        The secrets, in order.

    Raises
    ------
    ConfigurationError, ReconstructionError
        As for :func:`reconstruct`; the message names the failing secret's index.
    """
    t = _check_threshold(threshold)
    picked = _pick_all(shares, t)
    bases = _bases([chosen for chosen, _ in picked])
    out: list[bytes] = []
    for index, (chosen, ys) in enumerate(picked):
        try:
            out.append(_secret_bytes(sum(map(operator.mul, bases[chosen], ys)) % PRIME))
        except ReconstructionError as exc:
            raise ReconstructionError(f"secret {index}: {exc}") from None
    return out


def _pick_all(
    shares: Sequence[Mapping[int, bytes]], t: int
) -> list[tuple[tuple[int, ...], list[int]]]:
    """:func:`_chosen` of every mapping, naming the failing one's index."""
    picked = []
    for index, table in enumerate(shares):
        try:
            picked.append(_chosen(table, t))
        except ReconstructionError as exc:
            raise ReconstructionError(f"secret {index}: {exc}") from None
    return picked


def _bases(sets: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """Lagrange coefficients at zero of each distinct point set (one batch)."""
    distinct = list(dict.fromkeys(sets))
    return dict(zip(distinct, _lagrange_many(distinct), strict=True))


def reconstruct_each(shares: Sequence[Mapping[int, bytes]], threshold: int) -> list[bytes | None]:
    """:func:`reconstruct_many` that answers ``None`` for a secret whose first ``threshold``
    shares combine to a value that is no 32-byte secret, instead of raising.

    For shares already checked against their dealer's commitments: the caller blames the
    dealer of a ``None``. Cost: one Lagrange basis per distinct point set (O(t^2)) and one
    dot product (O(t)) per secret, so secrets held by the same holders cost O(t) each.

    Raises
    ------
    ConfigurationError, ReconstructionError
        If ``threshold < 1``, or a mapping has fewer than ``threshold`` shares or a malformed
        one (the message names its index).
    """
    t = _check_threshold(threshold)
    picked = _pick_all(shares, t)
    bases = _bases([chosen for chosen, _ in picked])
    out: list[bytes | None] = []
    for chosen, ys in picked:
        value = sum(map(operator.mul, bases[chosen], ys)) % PRIME
        out.append(None if value >> (8 * SECRET_BYTES) else value.to_bytes(SECRET_BYTES, "big"))
    return out


def _candidates(n: int, t: int) -> Iterator[tuple[int, ...]]:
    """Index sets to decode, cheapest and most promising first (may repeat; caller dedups).

    With ``e = n - t`` spare shares, decoding after erasing ``j`` shares that are all wrong
    corrects ``floor((e + j) / 2)`` wrong shares in total, so only erasure counts with ``e + j``
    even gain anything over ``j - 1``. Order:

    1. the first ``t`` (what :func:`reconstruct` uses);
    2. all ``n``: Gao corrects up to ``e // 2`` wrong shares;
    3. if ``e`` is odd, each single share erased;
    4. alternately, erasure sets of the next useful sizes in lexicographic order (every
       ``t``-subset once ``j = e``) and pseudo-random ``t``-subsets (fixed seed).
    """
    everything = tuple(range(n))
    spare = n - t
    yield everything[:t]
    if spare == 0:
        return
    yield everything

    def erasures(j: int) -> Iterator[tuple[int, ...]]:
        for gone in itertools.combinations(everything, j):
            dropped = set(gone)
            yield tuple(i for i in everything if i not in dropped)

    if spare % 2:
        yield from erasures(1)
    later = itertools.chain.from_iterable(
        erasures(j) for j in range(2, spare + 1) if (spare + j) % 2 == 0
    )
    # Not a secret: only picks which shares to try, reproducibly.
    rng = random.Random(_SEED_LABEL + n.to_bytes(8, "big") + t.to_bytes(8, "big"))  # noqa: S311
    for subset, _ in itertools.zip_longest(later, range(4 * n)):
        if subset is not None:
            yield subset
        yield tuple(sorted(rng.sample(everything, t)))


def _blame(xs: Sequence[int], ys: Sequence[int], coeffs: list[int], t: int) -> set[int]:
    """Ids whose shares are off the sharing polynomial, given a verified secret ``coeffs[0]``.

    The polynomial that produced the secret may not be the sharing polynomial: wrong shares
    can cancel in the constant term. With the secret known, the sharing polynomial is
    ``s + z q(z)``, ``deg q < t - 1``: a code with minimum distance ``n - t + 2``, so one
    polynomial within ``(n - t + 1) // 2`` disagreements is the only one; otherwise decode
    ``q`` from ``(y - s) / x`` with Gao's decoder.
    """
    values = _eval_polys([coeffs], xs)[0]
    bad = {x for x, y, v in zip(xs, ys, values, strict=True) if y != v}
    if len(bad) <= (len(xs) - t + 1) // 2 or t == 1:
        return bad
    secret = coeffs[0]
    inv = _batch_inverse(xs)
    shifted = [(y - secret) * v % PRIME for y, v in zip(ys, inv, strict=True)]
    q = _decode(xs, shifted, t - 1)
    if q is None:
        return bad  # too many wrong shares to single out the sharing polynomial
    values = _eval_polys([[secret, *q]], xs)[0]
    return {x for x, y, v in zip(xs, ys, values, strict=True) if y != v}


def reconstruct_verified(
    shares: Mapping[int, bytes],
    threshold: int,
    check: Callable[[bytes], bool],
    max_attempts: int = 64,
) -> tuple[bytes, frozenset[int]]:
    """Reconstruct a secret that passes ``check`` despite some wrong shares.

    Tries, in order: the first ``threshold`` shares; Gao decoding of all shares (corrects up to
    ``(n - threshold) // 2`` wrong ones); decoding with shares erased (single shares first,
    when that helps); then larger erasure sets alternating with pseudo-random subsets, up to
    ``max_attempts`` decodings. Malformed shares are never used.

    Parameters
    ----------
    shares:
        ``{x: share}``, more than ``threshold`` of them for any robustness.
    threshold:
        The threshold the secret was split with.
    check:
        Returns ``True`` for the right secret (for example: it matches a commitment, or the
        public key derived from it matches the advertised one).
    max_attempts:
        Most candidate decodings to try (each is O(n^2) field operations).

    Returns
    -------
    tuple[bytes, frozenset[int]]
        The secret and the ids whose shares are malformed or off the sharing polynomial.
        Exact while at most ``(n - threshold + 1) // 2`` shares are wrong; beyond that, the
        ids off the polynomial that produced the secret (then no rule can tell which shares
        an adversary holding that many altered).

    Raises
    ------
    ConfigurationError
        If ``threshold < 1`` or ``max_attempts < 1``.
    ReconstructionError
        If fewer than ``threshold`` well-formed shares exist or no candidate passes.
    """
    t = _check_threshold(threshold)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ConfigurationError("max_attempts must be an integer >= 1")
    xs_all, table = _share_points(shares)
    pool: list[int] = []
    ys: list[int] = []
    malformed: set[int] = set()
    for x in xs_all:
        try:
            ys.append(decode_share(table[x]))
            pool.append(x)
        except ReconstructionError:
            malformed.add(x)
    if len(pool) < t:
        raise ReconstructionError(
            f"{len(pool)} well-formed shares of {len(xs_all)}, fewer than the threshold {t}"
        )
    seen: set[tuple[int, ...]] = set()
    attempts = 0
    for subset in _candidates(len(pool), t):
        if attempts >= max_attempts:
            break
        if subset in seen:
            continue
        seen.add(subset)
        attempts += 1
        coeffs = _decode([pool[i] for i in subset], [ys[i] for i in subset], t)
        if coeffs is None or coeffs[0] >> (8 * SECRET_BYTES):
            continue
        secret = coeffs[0].to_bytes(SECRET_BYTES, "big")
        if not check(secret):
            continue
        return secret, frozenset(_blame(pool, ys, coeffs, t) | malformed)
    raise ReconstructionError(
        f"no candidate from {len(xs_all)} shares ({len(malformed)} malformed, threshold {t}) "
        f"passed the check after {attempts} attempts"
    )
