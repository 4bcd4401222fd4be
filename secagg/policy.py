"""What a client requires of a round, checked by the client itself.

The server chooses a round's parameters and every set the client acts on (roster, survivors,
contributors), so a check that only the server makes protects nobody: a malicious server
picks ``neighbors``/``threshold`` with ``2t <= k + 1``, shows each half of the clients a
different survivor set, and unmasks every input (Bonawitz et al., CCS 2017, section 6; Bell
et al., CCS 2020, section 3). Each client therefore checks

* the round's ``(n, k, t)`` with the *same* bound the server's parameter finder uses,
  :func:`secagg.graph.choose_parameters` with the explicit ``(k, t)``, under the client's own
  targets and assumptions (security and failure bits, tolerated dropout and corrupt
  fractions, adversary model); ``2t > k + 1`` is required whatever the policy says;
* the mode, size, quantization bits, weight cap and layout fingerprint of the round;
* every set the server hands back: roster, survivor set and contributors each hold at least
  ``max(t, min_contributors)`` clients. A sum of two inputs reveals each to the other party,
  so ``min_contributors`` is at least 3.

The bound is evaluated once per distinct ``(n, k, t, targets)`` and cached
(:func:`_graph_check`), so a client pays it once per process, not once per round.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from secagg import graph
from secagg.errors import (
    ConfigurationError,
    InfeasibleParameters,
    PolicyViolation,
    ServerMisbehaviour,
)
from secagg.messages import MAX_BLAME_UPLOADS
from secagg.params import MAX_CLIENTS, MAX_DIM, Mode, RoundParams
from secagg.quantize import MAX_BITS

if TYPE_CHECKING:
    from secagg.dp.policy import DPOffer, DPPolicy

__all__ = [
    "MAX_BLAME_CHECKS",
    "MIN_CONTRIBUTORS",
    "ClientPolicy",
    "check_contributors",
    "check_dp_offer",
    "check_layout",
]

MIN_CONTRIBUTORS = 3
"""Fewest inputs a client lets be summed: with two, each party learns the other's input
from the sum and its own."""

MAX_BLAME_CHECKS = 8
"""Default most uploads a client checks to trace a spoiled hybrid sum: with every check
done twice (:data:`secagg.he_blame.CHECK_COPIES`) it covers rounds of up to ``4h`` clients
with ``h`` key holders rejecting the sum, at 8 of the default budget of 32 decryptions."""


@dataclass(frozen=True)
class ClientPolicy:
    """A client's requirements of a round; the default is the secure one.

    Parameters
    ----------
    security_bits, failure_bits:
        Targets of :func:`secagg.graph.choose_parameters`: an honest input is exposed with
        probability at most ``2^-security_bits``; the round fails for lack of shares with
        probability at most ``2^-failure_bits``.
    dropout, corrupt:
        Fractions of dropouts and corrupt clients the bounds must tolerate.
    adversary:
        ``"active"`` (malicious server, default) or ``"semi-honest"``; the bound of
        :mod:`secagg.graph`. ``2t > k + 1`` is required under both.
    min_contributors:
        Fewest clients in any roster, survivor set or result the client acts on
        (at least :data:`MIN_CONTRIBUTORS`; smaller values are refused).
    min_clients, max_clients:
        Range of the round's roster size ``n``.
    min_bits, max_bits:
        Range of quantization bits.
    max_weight:
        Largest weight cap the client accepts (a huge cap lets one client dominate a mean).
    max_dim:
        Largest vector the client accepts.
    expected_dim:
        When set, the only ``dim`` accepted.
    allowed_modes:
        Modes the client joins.
    max_blame_checks:
        Most uploads of others this client decrypts, one by one, to trace a spoiled hybrid
        sum (each costs one decryption of its CKKS budget; a request for more is refused).
    dp:
        The client's distributed-DP requirement (:class:`secagg.dp.policy.DPPolicy`). When
        set, a round without DP, or whose offer is weaker (budget, clip, rounds, tolerated
        withholders; :func:`secagg.dp.policy.check_offer`), is refused before any message.
        When ``None``, a DP round is accepted (after a structural check of its plan): noise
        the client did not ask for cannot hurt its privacy, it only changes the result.
    """

    security_bits: float = graph.SECURITY_BITS
    failure_bits: float = graph.FAILURE_BITS
    dropout: float = graph.DEFAULT_DROPOUT
    corrupt: float = graph.DEFAULT_CORRUPT
    adversary: graph.Adversary = "active"
    min_contributors: int = MIN_CONTRIBUTORS
    min_clients: int = MIN_CONTRIBUTORS
    max_clients: int = MAX_CLIENTS
    min_bits: int = 1
    max_bits: int = MAX_BITS
    max_weight: int = 1 << 32
    max_dim: int = MAX_DIM
    expected_dim: int | None = None
    allowed_modes: frozenset[Mode] = field(default=frozenset({Mode.MASKED, Mode.HYBRID, Mode.CKKS}))
    max_blame_checks: int = MAX_BLAME_CHECKS
    dp: DPPolicy | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.max_blame_checks <= MAX_BLAME_UPLOADS:
            raise ConfigurationError(
                f"max_blame_checks={self.max_blame_checks} is outside 0..{MAX_BLAME_UPLOADS}"
            )
        if isinstance(self.min_contributors, bool) or self.min_contributors < MIN_CONTRIBUTORS:
            raise ConfigurationError(
                f"min_contributors={self.min_contributors} is below {MIN_CONTRIBUTORS}: a sum"
                " of two inputs reveals each to the other party"
            )
        if self.min_clients < self.min_contributors:
            raise ConfigurationError(
                f"min_clients={self.min_clients} is below min_contributors={self.min_contributors}"
            )
        if not 1 <= self.min_bits <= self.max_bits <= MAX_BITS:
            raise ConfigurationError(
                f"bits range {self.min_bits}..{self.max_bits} is outside 1..{MAX_BITS}"
            )
        if self.max_weight < 1 or self.max_dim < 1:
            raise ConfigurationError("max_weight and max_dim must be positive")
        # Validates the targets and fractions once, with the finder's own checks.
        graph._check_inputs(
            max(self.min_clients, 2),
            self.dropout,
            self.corrupt,
            self.security_bits,
            self.failure_bits,
            self.adversary,
        )

    def check_params(self, params: RoundParams) -> graph.GraphParams | None:
        """Refuse ``params`` unless they meet this policy; return the bound's evaluation
        (``None`` for a ``ckks`` round, which has no graph or Shamir threshold to check).

        Raises
        ------
        PolicyViolation
            Naming the value that missed and the numbers (``n``, ``k``, ``t``, bits).
        """
        n, k, t = params.n_clients, params.degree, params.threshold
        q = params.quant
        if params.mode not in self.allowed_modes:
            raise PolicyViolation(f"round mode {params.mode.name.lower()} is not allowed")
        if not self.min_clients <= n <= self.max_clients:
            raise PolicyViolation(
                f"the round has n={n} clients; the policy accepts"
                f" {self.min_clients}..{self.max_clients}"
            )
        if self.expected_dim is not None and params.dim != self.expected_dim:
            raise PolicyViolation(
                f"the round aggregates dim={params.dim} values, expected {self.expected_dim}"
            )
        if params.dim > self.max_dim:
            raise PolicyViolation(f"dim={params.dim} exceeds the policy's max_dim={self.max_dim}")
        if not self.min_bits <= q.bits <= self.max_bits:
            raise PolicyViolation(
                f"bits={q.bits} is outside the policy's {self.min_bits}..{self.max_bits}"
            )
        if q.max_weight > self.max_weight:
            raise PolicyViolation(
                f"max_weight={q.max_weight} exceeds the policy's {self.max_weight}"
            )
        check_dp_offer(params.dp, self.dp)
        if params.mode is Mode.CKKS:
            # No Shamir sharing and no graph: t only bounds the contributors of the
            # published sum, which check_set enforces before decrypting.
            return None
        return _graph_check(
            n,
            k,
            t,
            self.dropout,
            self.corrupt,
            self.security_bits,
            self.failure_bits,
            self.adversary,
        )

    def check_set(self, what: str, size: int, params: RoundParams) -> None:
        """Refuse a roster, survivor set or contributor set of ``size`` clients: it must
        hold ``max(t, min_contributors)`` to ``n`` clients."""
        need = max(params.threshold, self.min_contributors)
        if not need <= size <= params.n_clients:
            raise PolicyViolation(
                f"{what} has {size} clients; this client needs"
                f" {need}..n={params.n_clients} (t={params.threshold},"
                f" min_contributors={self.min_contributors})"
            )


@lru_cache(maxsize=256)
def _graph_check(
    n: int,
    k: int,
    t: int,
    dropout: float,
    corrupt: float,
    security_bits: float,
    failure_bits: float,
    adversary: graph.Adversary,
) -> graph.GraphParams:
    """The finder's verdict on an explicit ``(n, k, t)``: cached, raising on a miss."""
    ctx = f"n={n}, k={k}, t={t}"
    if 2 * t <= k + 1:
        raise PolicyViolation(
            f"{ctx}: 2t={2 * t} <= k+1={k + 1}, so a malicious server can obtain both the"
            " self-mask and the mask-key shares of a client (split survivor views)"
        )
    try:
        gp = graph.choose_parameters(
            n,
            dropout=dropout,
            corrupt=corrupt,
            security_bits=security_bits,
            failure_bits=failure_bits,
            degree=k,
            threshold=t,
            adversary=adversary,
        )
    except InfeasibleParameters as exc:
        raise PolicyViolation(f"{ctx}: {exc}") from None
    if gp.security_bits < security_bits:
        raise PolicyViolation(
            f"{ctx} gives 2^-{gp.security_bits:.1f} security, below this client's"
            f" 2^-{security_bits:g} (corrupt={corrupt:g}, dropout={dropout:g},"
            f" {adversary} adversary)"
        )
    if gp.failure_bits < failure_bits:
        raise PolicyViolation(
            f"{ctx} gives 2^-{gp.failure_bits:.1f} correctness failure, above this client's"
            f" 2^-{failure_bits:g} (dropout={dropout:g})"
        )
    return gp


def check_dp_offer(offer: DPOffer | None, policy: DPPolicy | None) -> float | None:
    """The client's check of the round's DP offer; the job ``epsilon`` it computed, if any.

    Raises
    ------
    PolicyViolation
        ``policy`` is set and the round has no DP or a weaker offer; or the offer's plan is
        not the one its headline numbers give (either way, before anything is sent).
    """
    if policy is None:
        if offer is not None:
            _dp_structure(offer)
        return None
    if offer is None:
        raise PolicyViolation(
            f"this client requires distributed DP (epsilon <= {policy.max_epsilon:g}, delta "
            f"{policy.delta:g}); the round has none"
        )
    return _dp_verdict(offer, policy)


@lru_cache(maxsize=64)
def _dp_structure(offer: DPOffer) -> None:
    from secagg.dp.xnoise import check_plan

    try:
        check_plan(offer.plan, min_target_variance=1, max_withholders=0)
    except ServerMisbehaviour as exc:
        raise PolicyViolation(f"DP offer refused: {exc}") from None


@lru_cache(maxsize=64)
def _dp_verdict(offer: DPOffer, policy: DPPolicy) -> float:
    """:func:`secagg.dp.policy.check_offer`, cached per (offer, policy) like the graph bound."""
    from secagg.dp.policy import check_offer

    try:
        return check_offer(offer, policy)
    except ServerMisbehaviour as exc:
        raise PolicyViolation(f"DP offer refused: {exc}") from None


def clear_verdict_cache() -> None:
    """Forget the cached bound evaluations (a benchmark measuring the cold check uses it)."""
    _graph_check.cache_clear()
    _dp_structure.cache_clear()
    _dp_verdict.cache_clear()


def check_contributors(
    contributors: tuple[int, ...] | list[int], params: RoundParams, policy: ClientPolicy
) -> None:
    """Before decrypting or unmasking a sum: its contributors are distinct and number
    ``max(t, min_contributors)`` or more."""
    if len(set(contributors)) != len(contributors):
        raise PolicyViolation("the contributor list repeats a client")
    policy.check_set("the contributor set", len(contributors), params)


def check_layout(params: RoundParams, fingerprint: bytes | None) -> None:
    """Refuse an update whose layout fingerprint differs from the round's.

    A round without a fingerprint (``params.layout == b""``) accepts any layout of the right
    length; a client that knows its layout and joins a fingerprinted round must match it.
    """
    from secagg.errors import LayoutMismatch

    if not params.layout or fingerprint is None:
        return
    if not hmac.compare_digest(params.layout, fingerprint):
        raise LayoutMismatch(
            f"the update's layout {fingerprint.hex()[:16]}... differs from the round's"
            f" {params.layout.hex()[:16]}... (names, shapes, dtypes or order); nothing was sent"
        )
