"""Flower's own SecAgg+ settings (``flwr.server.workflow.SecAggPlusWorkflow``) in our terms.

:func:`from_flower_secaggplus` resolves Flower's settings for a round of ``n_clients`` the
way Flower 1.42 does at run time (``secaggplus_workflow.py``, ``setup_stage``), converts them
to :class:`~secagg.service.integrations.flower.SecAggFedAvg` keywords, and checks the result
against a client policy (the default one unless told otherwise): the parameters a site
would refuse are refused here, with the same message, before any round is created.
docs/integrations.md, "Flower's SecAgg+ settings", has the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from secagg.errors import ConfigurationError
from secagg.params import make_params
from secagg.policy import ClientPolicy
from secagg.quantize import MAX_BITS
from secagg.server import StageTimeouts

__all__ = ["SecAggPlusSettings", "from_flower_secaggplus"]

FLOWER_MAX_WEIGHT = 1000.0
FLOWER_CLIPPING_RANGE = 8.0
FLOWER_QUANTIZATION_RANGE = 1 << 22
FLOWER_MODULUS_RANGE = 1 << 32
"""Flower 1.42's defaults (``SecAggPlusWorkflow.__init__``)."""


@dataclass(frozen=True)
class SecAggPlusSettings:
    """Flower SecAgg+ settings resolved for one round size and converted.

    Attributes
    ----------
    n_clients:
        Sampled nodes the settings were resolved for.
    num_shares, reconstruction_threshold:
        Flower's values as its workflow resolves them for ``n_clients`` (integers; shares
        count the client itself).
    degree, threshold:
        Ours: neighbours per client (``num_shares - 1``, not counting the client) and the
        Shamir threshold (the same number as Flower's: both count the client's own share).
    clip, bits, max_weight, deadlines:
        Our quantization (``2**bits - 1 >= quantization_range`` levels, so never coarser
        than Flower's), the weight bound and the stage deadlines.
    notes:
        What behaves differently from Flower's workflow, one line each.
    """

    n_clients: int
    num_shares: int
    reconstruction_threshold: int
    degree: int
    threshold: int
    clip: float
    bits: int
    max_weight: int
    deadlines: StageTimeouts | None
    notes: tuple[str, ...] = field(default=())

    def strategy_kwargs(self) -> dict[str, Any]:
        """Keywords of :class:`SecAggFedAvg` (``neighbors``, ``threshold``, ``clip``, ...)."""
        out: dict[str, Any] = {
            "neighbors": "all" if self.degree == self.n_clients - 1 else str(self.degree),
            "threshold": str(self.threshold),
            "clip": self.clip,
            "bits": self.bits,
            "max_weight": self.max_weight,
        }
        if self.deadlines is not None:
            out["deadlines"] = self.deadlines
        return out

    def run_config(self) -> dict[str, Any]:
        """The same as ``secagg-*`` run-config entries (``[tool.flwr.app.config]``)."""
        out: dict[str, Any] = {
            "secagg-neighbors": self.strategy_kwargs()["neighbors"],
            "secagg-threshold": str(self.threshold),
            "secagg-clip": self.clip,
            "secagg-bits": self.bits,
            "secagg-max-weight": self.max_weight,
        }
        if self.deadlines is not None:
            out["secagg-stage-timeout"] = self.deadlines.advertise_keys
        return out


def _resolve_shares(num_shares: int | float, n: int) -> int:
    """Flower's ``state.num_shares`` for ``n`` sampled nodes (int 1 means 1.0, the fraction)."""
    if isinstance(num_shares, bool) or not isinstance(num_shares, int | float):
        raise ConfigurationError(f"num_shares must be an int or a float, got {num_shares!r}")
    if isinstance(num_shares, int) and num_shares != 1:
        if num_shares <= 2:
            raise ConfigurationError(f"num_shares as an integer must be > 2, got {num_shares}")
        shares = num_shares
    else:
        if not num_shares > 0:
            raise ConfigurationError(f"num_shares as a fraction must be > 0, got {num_shares}")
        shares = round(float(num_shares) * n)
        if shares < n and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = n
    if shares != n and shares % 2 == 0:  # Flower warns and adds one
        shares += 1
    return min(shares, n)


def _resolve_threshold(threshold: int | float, shares: int) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ConfigurationError(
            f"reconstruction_threshold must be an int or a float, got {threshold!r}"
        )
    if isinstance(threshold, int) and threshold != 1:
        if threshold >= shares:
            raise ConfigurationError(
                f"reconstruction_threshold={threshold} must be below num_shares={shares}"
            )
        return threshold
    frac = float(threshold)
    if not 0 < frac <= 1:
        raise ConfigurationError(
            f"reconstruction_threshold as a fraction must be in (0, 1], got {frac}"
        )
    return max(round(frac * shares), 2)


def from_flower_secaggplus(
    num_shares: int | float,
    reconstruction_threshold: int | float,
    *,
    n_clients: int,
    max_weight: float = FLOWER_MAX_WEIGHT,
    clipping_range: float = FLOWER_CLIPPING_RANGE,
    quantization_range: int = FLOWER_QUANTIZATION_RANGE,
    modulus_range: int = FLOWER_MODULUS_RANGE,
    timeout: float | None = None,
    policy: ClientPolicy | None = None,
    allow_insecure: bool = False,
) -> SecAggPlusSettings:
    """Convert ``SecAggPlusWorkflow(num_shares, reconstruction_threshold, ...)`` settings.

    Parameters
    ----------
    num_shares, reconstruction_threshold, max_weight, clipping_range, quantization_range:
        As given to Flower's ``SecAggPlusWorkflow`` (same defaults); so are
        ``modulus_range`` and ``timeout``.
    n_clients:
        Nodes sampled per round (Flower resolves fractions and even share counts against it;
        our policy check needs it).
    policy:
        The client policy to check against (default: :class:`ClientPolicy`, the sites'
        default). A site with a stricter policy refuses more.
    allow_insecure:
        Return settings the policy refuses (with the refusal in ``notes``) instead of
        raising: for comparing with Flower, never for a real round.

    Raises
    ------
    PolicyViolation
        The converted ``(n, k, t)`` or quantization misses the policy (e.g. Flower's example
        ``num_shares=3, reconstruction_threshold=2``: ``2t <= k + 1``).
    ConfigurationError
        A value Flower itself refuses, or that has no counterpart (a ``max_weight`` or
        quantization too large for one 64-bit lane).
    """
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 2:
        raise ConfigurationError(f"n_clients must be an integer >= 2, got {n_clients!r}")
    shares = _resolve_shares(num_shares, n_clients)
    t = _resolve_threshold(reconstruction_threshold, shares)
    if not (math.isfinite(clipping_range) and clipping_range > 0):
        raise ConfigurationError(f"clipping_range must be a positive number, got {clipping_range}")
    if isinstance(quantization_range, bool) or not isinstance(quantization_range, int):
        raise ConfigurationError(
            f"quantization_range must be an integer, got {quantization_range!r}"
        )
    if quantization_range <= 0:
        raise ConfigurationError(f"quantization_range must be > 0, got {quantization_range}")
    if modulus_range <= quantization_range or bin(modulus_range).count("1") != 1:
        raise ConfigurationError(
            f"modulus_range={modulus_range} must be a power of 2 above quantization_range"
        )
    if not (math.isfinite(max_weight) and max_weight > 0):
        raise ConfigurationError(f"max_weight must be a positive number, got {max_weight}")
    bits = quantization_range.bit_length()  # 2**bits - 1 >= quantization_range
    if bits > MAX_BITS:
        raise ConfigurationError(
            f"quantization_range={quantization_range} needs {bits} bits; at most {MAX_BITS}"
        )
    weight = math.ceil(max_weight)
    degree = shares - 1
    notes = [
        f"num_shares={shares} counts the client itself: degree k={degree} neighbours",
        f"reconstruction_threshold={t} is our t (both count the client's own share)",
        f"quantization_range={quantization_range} -> bits={bits} "
        f"({(1 << bits) - 1} levels, never coarser); deltas (trained - global) are clipped, "
        "not the parameters",
        f"modulus_range={modulus_range} has no counterpart: lanes get ceil(log2 n) headroom "
        "bits and masks are mod 2^64, so sums never wrap",
        f"max_weight={max_weight} -> {weight}: a larger num-examples is refused, not wrapped",
    ]
    if n_clients * quantization_range * max_weight >= modulus_range:
        notes.append(
            f"in Flower, {n_clients} clients x quantization_range x max_weight reach "
            f"modulus_range={modulus_range}: its sum can wrap silently"
        )
    deadlines = None if timeout is None else StageTimeouts.uniform(float(timeout))
    if timeout is None:
        notes.append("timeout=None waits forever in Flower; ours keeps its stage deadlines")
    params = make_params(
        n_clients,
        1,
        clip=float(clipping_range),
        bits=bits,
        max_weight=weight,
        neighbors=degree,
        threshold=t,
    )
    try:
        (policy or ClientPolicy()).check_params(params)
    except ConfigurationError as exc:  # PolicyViolation is one
        if not allow_insecure:
            raise
        notes.append(f"REFUSED by the policy: {exc}")
    return SecAggPlusSettings(
        n_clients=n_clients,
        num_shares=shares,
        reconstruction_threshold=t,
        degree=degree,
        threshold=t,
        clip=float(clipping_range),
        bits=bits,
        max_weight=weight,
        deadlines=deadlines,
        notes=tuple(notes),
    )
