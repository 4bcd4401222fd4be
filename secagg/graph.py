"""SecAgg+ neighbour graph and the choice of degree ``k`` and threshold ``t``.

Graph
-----
Clients sit on a ring in a pseudorandom order and each is linked to the ``k/2`` clients on
either side: the Harary graph ``H(k, n)`` (``k`` even) under a uniformly random labelling, as
in fcp's ``SecretSharingHararyGraph``. The order is a Fisher–Yates shuffle of ``sorted(ids)``
driven by the ChaCha20 stream :func:`secagg.prg.keystream_u32` (purpose ``GRAPH``) with
unbiased rejection sampling (see :func:`permutation` for the exact draw rule, which other
implementations must follow bit for bit). ``k >= n - 1`` is the complete graph of classic
SecAgg. Odd ``k < n - 1`` is rejected: ``H(k, n)`` for odd ``k`` needs an extra "diameter"
edge, exists only for even ``n``, and the separation bound below does not cover it. Flower's
``num_shares`` counts the client itself, so Flower's ``num_shares = 2m + 1`` is ``k = 2m``
here (Flower rounds an even ``num_shares`` up to the next odd number).

Client ``u`` Shamir-shares its secrets to its holders ``H(u) = N(u) ∪ {u}`` (``k + 1`` of them)
with threshold ``t``, ``1 <= t <= k + 1``.

Bound
-----
Model: ``c = floor(corrupt * n)`` corrupt clients chosen before the graph seed is known,
``d = floor(dropout * n)`` clients that drop (at any stage after sharing), chosen
independently of the graph; worst case ``C`` and ``D`` disjoint, ``r = c + d`` removed. For an
honest client the labelling makes ``N(u)`` a uniform ``k``-subset of the other ``n - 1``
clients, so its corrupt neighbours follow ``X ~ Hypergeometric(n - 1, c, k)`` exactly; the
union bounds over clients below use exact hypergeometric tails (log-factorials, no normal or
Chernoff approximation).

The three bad events are those of Bell et al., CCS 2020, section 3 (Theorem 3.6), in the form
fcp's ``graph_parameter_finder.cc`` evaluates them:

1. *Separation* -- the honest survivors are disconnected. Honest survivors ``a, b`` in
   different components force a run of ``k/2`` consecutive removed ring positions on both arcs
   between them: two disjoint, non-adjacent runs, ``n (n - k - 1) / 2`` such pairs, each fully
   removed with probability ``C(r, k) / C(n, k)``. ``P_sep = n (n-k-1)/2 · C(r,k)/C(n,k)``.
2. *Threshold* -- the adversary reconstructs an honest client's secrets.

   * ``adversary="active"`` (default; malicious server plus the consistency check of
     Bonawitz et al., CCS 2017): the server may tell some honest holders that ``u``
     survived (they reveal shares of its self-mask seed) and others that it dropped (they
     reveal its mask key); it wins iff both groups, with the ``X`` corrupt holders, reach
     ``t``, i.e. iff ``2t <= k + 1 + X``. For ``k = n - 1`` this is exactly Bonawitz et al.'s
     ``t > (n + n_C) / 2``. ``P_thr = (n - c) · P[X >= 2t - k - 1]``.
   * ``adversary="semi-honest"``: the corrupt holders alone reach ``t``:
     ``P_thr = (n - c) · P[X >= t]``.

   Security failure bound: ``P_sec = P_sep + P_thr <= 2^-security_bits`` (one union bound;
   fcp splits the budget in halves instead).
3. *Correctness* -- some client has fewer than ``t`` surviving holders. A surviving client
   holds its own share; ``Y_m ~ Hypergeometric(n - 1, m, k)`` dropped neighbours.
   ``P_fail = (n - d) · P[Y_d >= k + 2 - t] + d · P[Y_{d-1} >= k + 1 - t] <= 2^-failure_bits``.
   Corrupt clients that withhold shares should be counted in ``dropout``.

Automatic choice: the smallest even ``k`` for which some ``t`` meets both targets; among those
``t``, the one maximising ``min(security margin, correctness margin)`` in bits (ties: the
middle one). If no ``k <= n - 2`` works the complete graph is used, where both events are
deterministic (bits are ``inf`` or ``0``): ``t`` is the middle of ``((n + c)/2, n - d]``
(active) or ``(c, n - d]`` (semi-honest). The search is exact but skips degrees that a
coupling argument proves infeasible (:meth:`_Model.skip`): about 10 ms for ``n = 10^4``.

Caveats: the bounds are per graph draw. The seed hashes every roster member's graph nonce,
committed to before the roster is fixed and revealed after it (``reveal_nonces``,
:func:`secagg.rounds.reveal_nonces.graph_seed`), so neither re-drawing advertised keys
offline nor choosing which advertised clients to keep re-draws it. What is left is aborting
whole rounds after seeing the graph: an adversary that starts ``R`` rounds succeeds with
probability up to ``R · 2^-security_bits`` (docs/threat-model.md, "Neighbour graph"). The
separation bound assumes dropouts are not chosen with knowledge of the graph; a malicious
server that declares chosen clients dropped is not covered by event 1, only by event 2.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Literal

import numpy as np
import numpy.typing as npt

from secagg.errors import ConfigurationError, InfeasibleParameters
from secagg.prg import KEY_BYTES, Purpose, keystream_u32

__all__ = [
    "DEFAULT_CORRUPT",
    "DEFAULT_DROPOUT",
    "FAILURE_BITS",
    "MAX_ID",
    "SECURITY_BITS",
    "Adversary",
    "GraphParams",
    "choose_parameters",
    "neighbours",
    "neighbours_of",
    "permutation",
]

Adversary = Literal["active", "semi-honest"]

DEFAULT_DROPOUT = 0.3
"""Dropout fraction tolerated by default (fcp's parameter-finder tests span 0.05--0.45)."""
DEFAULT_CORRUPT = 0.1
"""Corrupt-client fraction tolerated by default (fcp's tests span 0.05--0.45)."""
SECURITY_BITS = 40
"""Statistical security: bad events at most ``2^-40`` (fcp ``graph_parameter_finder.cc``,
``kSecurityParameter = 40``, the statistical parameter of Bell et al. 2020)."""
FAILURE_BITS = 20
"""Correctness: a round fails for lack of shares with probability at most ``2^-20`` (fcp
``kCorrectnessParameter = 20``)."""
MAX_ID = (1 << 32) - 1
"""Client ids are integers in ``1 .. 2^32 - 1``."""

_LN2 = math.log(2.0)
_U32 = 1 << 32

_FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class GraphParams:
    """Degree and threshold for one round, with the guarantees they achieve.

    Parameters
    ----------
    n:
        Number of clients the choice was made for.
    degree:
        Neighbours per client ``k`` (``n - 1`` for the complete graph).
    threshold:
        Shamir threshold ``t``, counted over the ``k + 1`` holders.
    full:
        ``True`` for the complete graph (classic SecAgg).
    dropout, corrupt:
        Tolerated fractions the bounds were computed for.
    security_bits, failure_bits:
        ``-log2`` of the security and correctness failure bounds (``inf`` when the bad event
        cannot happen under the model, ``0`` when it is certain).
    meets_target:
        Whether both bounds meet the requested targets.
    warnings:
        Human-readable notes on missed targets.
    adversary:
        Threat model of the security bound, ``"active"`` or ``"semi-honest"``.
    """

    n: int
    degree: int
    threshold: int
    full: bool
    dropout: float
    corrupt: float
    security_bits: float
    failure_bits: float
    meets_target: bool
    warnings: tuple[str, ...]
    adversary: Adversary = "active"


# --- graph ---------------------------------------------------------------------------------


def _check_ids(ids: Sequence[int]) -> tuple[int, ...]:
    try:
        order = tuple(sorted(operator.index(i) for i in ids if not isinstance(i, bool)))
    except TypeError:
        raise ConfigurationError("client ids must be integers") from None
    if len(order) != len(ids):
        raise ConfigurationError("client ids must be integers, not booleans")
    if not order:
        raise ConfigurationError("a graph needs at least one client id")
    if order[0] < 1 or order[-1] > MAX_ID:
        raise ConfigurationError(f"client ids must be in 1..{MAX_ID}")
    for a, b in itertools.pairwise(order):
        if a == b:
            raise ConfigurationError(f"client id {a} appears twice")
    return order


@lru_cache(maxsize=8)
def _shuffle(order: tuple[int, ...], seed: bytes) -> tuple[int, ...]:
    n = len(order)
    perm = list(order)
    count = n + 32
    draws = keystream_u32(seed, Purpose.GRAPH, count).tolist()
    pos = 0
    for i in range(n - 1, 0, -1):
        bound = i + 1
        limit = _U32 - _U32 % bound
        while True:
            if pos == count:  # rare: more rejections than slack; the stream is prefix-stable
                count *= 2
                draws = keystream_u32(seed, Purpose.GRAPH, count).tolist()
            r = draws[pos]
            pos += 1
            if r < limit:
                break
        j = r % bound
        perm[i], perm[j] = perm[j], perm[i]
    return tuple(perm)


def permutation(ids: Sequence[int], seed: bytes) -> tuple[int, ...]:
    """Ring order of the clients: a keyed Fisher–Yates shuffle of ``sorted(ids)``.

    Let ``r_0, r_1, ...`` be :func:`secagg.prg.keystream_u32` ``(seed, Purpose.GRAPH)``. For
    ``i = n-1`` down to ``1``: take the next ``r`` until ``r < 2^32 - (2^32 mod (i+1))``
    (rejection makes ``r mod (i+1)`` exactly uniform), then swap positions ``i`` and
    ``r mod (i+1)``.

    Parameters
    ----------
    ids:
        Distinct client ids in ``1 .. 2^32 - 1``, in any order.
    seed:
        32-byte public graph seed.

    Returns
    -------
    tuple[int, ...]
        The ids in ring order (position 0 first).
    """
    if len(seed) != KEY_BYTES:
        raise ConfigurationError(f"graph seed must be {KEY_BYTES} bytes, got {len(seed)}")
    return _shuffle(_check_ids(ids), bytes(seed))


def _check_degree(degree: int, n: int) -> None:
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise ConfigurationError("degree must be an integer")
    if degree >= n - 1:
        return
    if degree < 2:
        raise InfeasibleParameters(f"degree {degree} is below 2 for n={n} clients")
    if degree % 2:
        raise InfeasibleParameters(
            f"degree {degree} is odd; the Harary graph needs an even degree below n-1={n - 1}:"
            f" use degree={degree + 1} (Flower's num_shares={degree + 2} counts the client itself)"
        )


def neighbours(ids: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Neighbour sets of the SecAgg+ graph.

    Parameters
    ----------
    ids:
        Distinct client ids in ``1 .. 2^32 - 1``.
    degree:
        ``k``: even and ``>= 2``, or ``>= len(ids) - 1`` for the complete graph.
    seed:
        32-byte public seed (derived from the session id by the caller).

    Returns
    -------
    dict[int, frozenset[int]]
        ``N(u)`` for every ``u``: symmetric, ``u`` not in ``N(u)``, ``|N(u)| = min(k, n-1)``.
        This holds ``n·k`` entries (about 0.5 s and 300 MB for ``n = 10^4``, ``k = 774``); a
        client needs only its own row, :func:`neighbours_of`.

    Raises
    ------
    ConfigurationError
        Bad ids or seed; :class:`~secagg.errors.InfeasibleParameters` for an odd or too
        small degree.
    """
    if len(seed) != KEY_BYTES:
        raise ConfigurationError(f"graph seed must be {KEY_BYTES} bytes, got {len(seed)}")
    order = _check_ids(ids)
    n = len(order)
    _check_degree(degree, n)
    if degree >= n - 1:
        everyone = frozenset(order)
        return {u: everyone - {u} for u in order}
    ring = _shuffle(order, bytes(seed))
    half = degree // 2
    ext = ring[-half:] + ring + ring[:half]  # position p of ring is p + half here
    return {
        u: frozenset(ext[p : p + half] + ext[p + half + 1 : p + degree + 1])
        for p, u in enumerate(ring)
    }


def neighbours_of(ids: Sequence[int], degree: int, seed: bytes, client: int) -> frozenset[int]:
    """``N(client)`` alone, in ``O(n + k)`` (the shuffle is cached); same graph as
    :func:`neighbours`."""
    if len(seed) != KEY_BYTES:
        raise ConfigurationError(f"graph seed must be {KEY_BYTES} bytes, got {len(seed)}")
    order = _check_ids(ids)
    n = len(order)
    _check_degree(degree, n)
    ring = _shuffle(order, bytes(seed))
    try:
        p = ring.index(client)
    except ValueError:
        raise ConfigurationError(f"client {client} is not among the ids") from None
    if degree >= n - 1:
        return frozenset(order) - {client}
    half = degree // 2
    return frozenset(ring[(p + s) % n] for s in range(-half, half + 1) if s)


# --- bounds --------------------------------------------------------------------------------

_SMALL = 64
_LOG_FACT_SMALL = np.array([math.lgamma(i + 1.0) for i in range(_SMALL)])
_SLACK = 1e-9
"""Bits by which a degree must miss a target before the search skips past it (guards the
proof in :meth:`_Model.skip` against rounding in the last place)."""


def _log_factorial(x: npt.NDArray[np.int64]) -> _FloatArray:
    """``ln(x!)`` elementwise: a table below 64, Stirling's series (error < 1e-17) above."""
    xf = np.maximum(x, _SMALL).astype(np.float64)
    inv = 1.0 / xf
    inv2 = inv * inv
    big = (
        (xf + 0.5) * np.log(xf)
        - xf
        + 0.5 * math.log(2.0 * math.pi)
        + inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 / 1680.0)))
    )
    return np.where(x < _SMALL, _LOG_FACT_SMALL[np.clip(x, 0, _SMALL - 1)], big)


def _ln_choose(a: int, b: int) -> float:
    return math.lgamma(a + 1.0) - math.lgamma(b + 1.0) - math.lgamma(a - b + 1.0)


def _log_upper_tails(total: int, marked: Sequence[int], drawn: int) -> _FloatArray:
    """``ln P[Z_i >= x]``, ``Z_i ~ Hypergeometric(total, marked[i], drawn)``, ``x = 0..drawn+1``.

    Exact pmf from log-factorials, summed from the far tail inwards (``logaddexp``), so tails
    far below ``2^-1000`` keep their relative precision.
    """
    m = np.asarray(marked, dtype=np.int64)[:, None]
    z = np.arange(drawn + 1, dtype=np.int64)[None, :]
    rest = total - m - drawn + z
    inside = (z <= m) & (rest >= 0)
    lf = _log_factorial(np.stack(np.broadcast_arrays(m - z, z, drawn - z, rest)))
    const = _log_factorial(m) + _log_factorial(total - m) - _ln_choose(total, drawn)
    lpmf = np.where(inside, const - lf.sum(axis=0), -np.inf)
    tail = np.logaddexp.accumulate(lpmf[:, ::-1], axis=1)[:, ::-1]
    out = np.full((len(marked), drawn + 2), -np.inf)
    out[:, : drawn + 1] = np.minimum(tail, 0.0)
    return out


def _log_sep(n: int, k: int, removed: int) -> float:
    """``ln`` of the separation bound ``n (n-k-1)/2 · C(r,k)/C(n,k)`` (event 1)."""
    if k >= n - 1 or removed < k:
        return -math.inf
    return math.log(n) + math.log(n - k - 1) - _LN2 + _ln_choose(removed, k) - _ln_choose(n, k)


@dataclass(frozen=True)
class _Bounds:
    """``ln`` of the bounds at one degree ``k``, indexed by ``t - 1`` for ``t = 1..k+1``."""

    thr: _FloatArray
    sep: float
    fail: _FloatArray

    def bits(self) -> tuple[_FloatArray, _FloatArray]:
        sec = -np.logaddexp(self.thr, self.sep) / _LN2
        return np.maximum(sec, 0.0), np.maximum(-self.fail / _LN2, 0.0)


class _Model:
    """The bounds of the module docstring for one ``(n, c, d, adversary)``, cached by ``k``."""

    def __init__(self, n: int, c: int, d: int, adversary: Adversary) -> None:
        self.n, self.c, self.d, self.adversary = n, c, d, adversary
        self._cache: dict[int, _Bounds] = {}

    def at(self, k: int) -> _Bounds:
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        n, c, d = self.n, self.c, self.d
        t = np.arange(1, k + 2)
        tails = _log_upper_tails(n - 1, (c, d, max(d - 1, 0)), k)
        idx = np.maximum(2 * t - k - 1, 0) if self.adversary == "active" else t
        thr = math.log(n - c) + tails[0, idx]
        fail = math.log(n - d) + tails[1, k + 2 - t]
        if d > 0:
            fail = np.logaddexp(fail, math.log(d) + tails[2, k + 1 - t])
        out = _Bounds(thr, _log_sep(n, k, min(n, c + d)), fail)
        self._cache[k] = out
        return out

    def skip(self, k: int, t: int | None, sec_bits: float, fail_bits: float) -> int | None:
        """How many even steps past an infeasible ``k`` are certainly infeasible too.

        Couple degree ``k' = k + 2j`` with ``k`` by growing the uniform neighbour set: the
        corrupt-holder excess ``k + 1 + X`` grows by at least ``2j`` and the surviving
        holders by at most ``2j``, so ``P_thr(k', t) >= P_thr(k, t - j)`` (active; without the
        shift for semi-honest) and ``P_fail(k', t) >= P_fail(k, t - 2j)``; ``P_sep >= 0``. The
        targets then need ``j >= u - v`` where ``u`` is the smallest threshold that is secure
        at ``k`` and ``v`` the largest that is correct. Returns the smallest ``j >= 1`` that
        may work, or ``None`` when no larger degree can (fixed ``t``).
        """
        b = self.at(k)
        sec_ok = np.flatnonzero(-b.thr / _LN2 >= sec_bits - _SLACK)
        fail_ok = np.flatnonzero(-b.fail / _LN2 >= fail_bits - _SLACK)
        u = int(sec_ok[0]) + 1 if sec_ok.size else k + 2  # beyond k + 1: P_thr = 0
        v = int(fail_ok[-1]) + 1 if fail_ok.size else 0  # t <= 0 never fails
        active = self.adversary == "active"
        if t is None:
            gap = u - v
            return max(1, gap if active else -(-gap // 2))
        first = max(1, -(-(t - v) // 2))
        if active:
            return first if first <= t - u else None
        return first if t >= u else None


def _pick(
    sec: _FloatArray, fail: _FloatArray, sec_target: float, fail_target: float
) -> tuple[int, bool]:
    """Index of the ``t`` with the largest worse margin (ties: the middle one); feasible?"""
    margin = np.minimum(sec - sec_target, fail - fail_target)
    best = float(np.max(margin))
    ties = np.flatnonzero(margin == best)
    return int(ties[len(ties) // 2]), best >= 0.0


def _count(rate: float, n: int) -> int:
    # Fraction(str(rate)) reads 0.29 as 29/100, so floor(0.29 * 100) is 29, not 28.
    return math.floor(Fraction(str(rate)) * n)


def _prob(bits: float) -> str:
    return "1" if bits < 0.05 else f"2^-{bits:.1f}"


def choose_parameters(
    n: int,
    *,
    dropout: float = DEFAULT_DROPOUT,
    corrupt: float = DEFAULT_CORRUPT,
    security_bits: float = SECURITY_BITS,
    failure_bits: float = FAILURE_BITS,
    degree: int | None = None,
    threshold: int | None = None,
    adversary: Adversary = "active",
) -> GraphParams:
    """Choose (or check) the degree ``k`` and threshold ``t`` for ``n`` clients.

    Parameters
    ----------
    n:
        Number of clients, ``2 <= n <= 2^32 - 1``.
    dropout, corrupt:
        Fractions of dropouts and corrupt clients to tolerate, each in ``[0, 1)``, sum < 1.
    security_bits, failure_bits:
        Targets: security failure ``<= 2^-security_bits``, correctness failure
        ``<= 2^-failure_bits``.
    degree:
        ``None`` chooses automatically; ``n - 1`` is the complete graph; otherwise even,
        ``2 <= k <= n - 2``.
    threshold:
        ``None`` chooses automatically; otherwise ``1 <= t <= k + 1``.
    adversary:
        ``"active"`` (malicious server, the default) or ``"semi-honest"``; see the module
        docstring.

    Returns
    -------
    GraphParams
        Explicit choices that are valid but miss a target come back with
        ``meets_target=False`` and a warning.

    Raises
    ------
    InfeasibleParameters
        Invalid explicit values, or no ``k`` (up to the complete graph) meets the targets.
    """
    _check_inputs(n, dropout, corrupt, security_bits, failure_bits, adversary)
    c, d = _count(corrupt, n), _count(dropout, n)
    model = _Model(n, c, d, adversary)

    def evaluate(k: int) -> tuple[int, bool, _FloatArray, _FloatArray]:
        sec, fail = model.at(k).bits()
        if threshold is None:
            i, ok = _pick(sec, fail, security_bits, failure_bits)
        else:
            i = threshold - 1
            ok = bool(sec[i] >= security_bits and fail[i] >= failure_bits)
        return i, ok, sec, fail

    def result(k: int) -> GraphParams:
        i, _, sec, fail = evaluate(k)
        t, s, f = i + 1, float(sec[i]), float(fail[i])
        b = model.at(k)
        warnings: list[str] = []
        ctx = f"n={n}, corrupt={corrupt:g}, dropout={dropout:g}, {adversary} adversary"
        if s < security_bits:
            one = _prob(-(float(b.thr[i]) - math.log(n - c)) / _LN2)
            why = ""
            if adversary == "active" and 2 * t <= k + 1:
                why = ": with 2t <= k+1 a malicious server obtains both of its secrets"
            warnings.append(
                f"k={k}, t={t} gives 2^-{s:.1f} security, below the 2^-{security_bits:g}"
                f" target ({ctx}); one honest client is exposed with probability {one}{why}"
            )
        if f < failure_bits:
            one = _prob(-(float(b.fail[i]) - math.log(n)) / _LN2)
            warnings.append(
                f"k={k}, t={t} gives 2^-{f:.1f} correctness failure, above the"
                f" 2^-{failure_bits:g} target ({ctx}); one client lacks t surviving holders"
                f" with probability {one}"
            )
        return GraphParams(
            n=n,
            degree=k,
            threshold=t,
            full=k == n - 1,
            dropout=dropout,
            corrupt=corrupt,
            security_bits=s,
            failure_bits=f,
            meets_target=not warnings,
            warnings=tuple(warnings),
            adversary=adversary,
        )

    if degree is not None:
        _check_degree(degree, n)
        if degree >= n:
            raise InfeasibleParameters(
                f"degree {degree} needs more than n={n} clients; the complete graph is"
                f" degree={n - 1}"
            )
        if threshold is not None:
            _check_threshold(threshold, degree)
        return result(degree)

    if threshold is not None:
        _check_threshold(threshold, n - 1)
    k = _first_degree(n, c + d, security_bits)
    if threshold is not None:
        k = max(k, threshold - 1 + (threshold - 1) % 2)  # smallest even k with t <= k + 1
    last = n - 2 - n % 2  # largest even k below n - 1
    found = _first_feasible(model, evaluate, threshold, k, last, security_bits, failure_bits)
    if found is not None:
        return result(found)
    if evaluate(n - 1)[1]:
        return result(n - 1)
    lo = (n + c) // 2 + 1 if adversary == "active" else c + 1
    what = "no degree" if threshold is None else f"no degree with t={threshold}"
    raise InfeasibleParameters(
        f"{what} meets 2^-{security_bits:g} security and 2^-{failure_bits:g} correctness for"
        f" n={n}, corrupt={corrupt:g} ({c} clients), dropout={dropout:g} ({d} clients),"
        f" {adversary} adversary; even the complete graph needs t in [{lo}, {n - d}]"
    )


def _first_feasible(
    model: _Model,
    evaluate: Callable[[int], tuple[int, bool, _FloatArray, _FloatArray]],
    threshold: int | None,
    start: int,
    last: int,
    sec_bits: float,
    fail_bits: float,
) -> int | None:
    """Smallest even ``k`` in ``[start, last]`` that meets both targets, or ``None``.

    Exact: degrees are skipped only when :meth:`_Model.skip` proves them infeasible.
    """
    k = start
    while k <= last:
        if evaluate(k)[1]:
            return k
        step = model.skip(k, threshold, sec_bits, fail_bits)
        if step is None:
            return None
        k += 2 * step
    return None


def _first_degree(n: int, removed: int, security_bits: float) -> int:
    """Smallest even ``k >= 2`` whose separation bound alone meets the target (it is
    decreasing in ``k``, and a lower bound on the security failure)."""
    goal = -security_bits * _LN2
    k = 2
    while k <= n - 2 and _log_sep(n, k, min(n, removed)) > goal:
        k += 2
    return k


def _check_inputs(
    n: int,
    dropout: float,
    corrupt: float,
    security_bits: float,
    failure_bits: float,
    adversary: str,
) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConfigurationError("n must be an integer")
    if not 2 <= n <= MAX_ID:
        raise InfeasibleParameters(f"n={n} clients: secure aggregation needs 2..{MAX_ID}")
    for name, rate in (("dropout", dropout), ("corrupt", corrupt)):
        if not 0.0 <= rate < 1.0:
            raise InfeasibleParameters(f"{name}={rate} is outside [0, 1)")
    if dropout + corrupt >= 1.0:
        raise InfeasibleParameters(
            f"dropout={dropout:g} + corrupt={corrupt:g} >= 1 leaves no honest survivors"
        )
    for name, bits in (("security_bits", security_bits), ("failure_bits", failure_bits)):
        if not 0.0 < bits < math.inf:
            raise ConfigurationError(f"{name}={bits} must be positive and finite")
    if adversary not in ("active", "semi-honest"):
        raise ConfigurationError(f"adversary={adversary!r}: choose 'active' or 'semi-honest'")


def _check_threshold(threshold: int, degree: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ConfigurationError("threshold must be an integer")
    if not 1 <= threshold <= degree + 1:
        raise InfeasibleParameters(
            f"threshold t={threshold} is outside 1..k+1={degree + 1} (k={degree} neighbours"
            " plus the client itself hold shares)"
        )
