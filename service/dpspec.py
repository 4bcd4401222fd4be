"""The DP settings of a service round or job (``--dp-*`` flags, ``dp_json``): one typed form.

An operator asks for a budget, not for noise: ``(epsilon, delta)`` over ``rounds`` rounds at
clip norm ``clip``, tolerating ``max_withholders`` contributors that add no noise. The
coordinator calibrates each round for its own ``n`` and threshold
(:func:`secagg.dp.calibration.calibrate`, :meth:`DPSpec.offer`) and the job's ledger
(:mod:`secagg.service.privacy`) admits and charges it against ``(epsilon, delta)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from secagg.dp.policy import DPOffer
from secagg.dp.xnoise import DEFAULT_MAX_EXCESS
from secagg.errors import ConfigurationError

__all__ = ["DP_KEYS", "DPSpec"]

DP_KEYS = (
    "epsilon",
    "delta",
    "rounds",
    "clip",
    "max_withholders",
    "max_excess",
    "sampling_rate",
)
"""The fields of :class:`DPSpec` (the keys of its JSON object)."""

DEFAULT_DELTA = 1e-5
"""``delta`` when the JSON leaves it out (the CLI's ``--dp-delta`` default)."""


@dataclass(frozen=True)
class DPSpec:
    """A round's or job's DP budget; validated on construction (one-line errors).

    Attributes
    ----------
    epsilon, delta:
        The budget of the whole job (RDP accountant at ``delta``).
    rounds:
        Rounds the budget is split over (each round is calibrated for ``epsilon / rounds``
        in zCDP terms, :func:`secagg.dp.accountant.rho_for_epsilon`).
    clip:
        L2 clip norm of each update.
    max_withholders:
        ``w``: contributors counted as adding no noise (docs/dp.md, trust assumption 2).
    max_excess:
        XNoise level spacing ``xi``.
    sampling_rate:
        Client sampling rate ``q`` the accountant assumes (1: every site in every round).
    """

    epsilon: float
    delta: float
    rounds: int
    clip: float
    max_withholders: int = 0
    max_excess: float = DEFAULT_MAX_EXCESS
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigurationError(f"dp {name} must be a finite number, got {v!r}")
            return float(v)

        for name in ("epsilon", "delta", "clip", "max_excess", "sampling_rate"):
            object.__setattr__(self, name, num(name))
        for name in ("rounds", "max_withholders"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    object.__setattr__(self, name, int(v))
                else:
                    raise ConfigurationError(f"dp {name} must be an integer, got {v!r}")
        if self.epsilon <= 0:
            raise ConfigurationError(f"dp epsilon must be > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigurationError(f"dp delta must be in (0, 1), got {self.delta}")
        if self.rounds < 1:
            raise ConfigurationError(f"dp rounds must be >= 1, got {self.rounds}")
        if self.clip <= 0:
            raise ConfigurationError(f"dp clip must be > 0, got {self.clip}")
        if self.max_withholders < 0:
            raise ConfigurationError(f"dp max_withholders must be >= 0, got {self.max_withholders}")
        if not 0 < self.max_excess < 1:
            raise ConfigurationError(f"dp max_excess must be in (0, 1), got {self.max_excess}")
        if not 0 < self.sampling_rate <= 1:
            raise ConfigurationError(
                f"dp sampling_rate must be in (0, 1], got {self.sampling_rate}"
            )

    @classmethod
    def from_json(
        cls,
        doc: Mapping[str, Any] | DPSpec,
        *,
        rounds: int | None = None,
        clip: float | None = None,
    ) -> DPSpec:
        """Parse a JSON object; ``rounds`` and ``clip`` fill those keys when absent (a job's
        round count and clip), ``delta`` defaults to ``1e-5``.

        Raises
        ------
        ConfigurationError
            An unknown or missing key, or a value out of range (one line naming it).
        """
        if isinstance(doc, DPSpec):
            return doc
        if not isinstance(doc, Mapping):
            raise ConfigurationError("dp must be a JSON object")
        unknown = sorted(set(doc) - set(DP_KEYS))
        if unknown:
            raise ConfigurationError(f"unknown dp keys {unknown} (known: {', '.join(DP_KEYS)})")
        values: dict[str, Any] = {"delta": DEFAULT_DELTA, **dict(doc)}
        if "rounds" not in values and rounds is not None:
            values["rounds"] = rounds
        if "clip" not in values and clip is not None:
            values["clip"] = clip
        missing = [k for k in ("epsilon", "rounds", "clip") if k not in values]
        if missing:
            raise ConfigurationError(f"dp needs {', '.join(missing)}")
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def offer(self, n_clients: int, threshold: int, dim: int) -> DPOffer:
        """The offer of a round of ``n_clients`` with threshold ``threshold``, calibrated
        for this budget (:func:`secagg.dp.calibration.calibrate`).

        Raises
        ------
        InfeasibleParameters
            No noise plan or ring width meets the budget for this round.
        """
        from secagg.dp.calibration import calibrate

        cal = calibrate(
            self.epsilon,
            self.delta,
            self.rounds,
            n_clients=n_clients,
            min_survivors=threshold,
            dim=dim,
            clip=self.clip,
            max_withholders=self.max_withholders,
            max_excess=self.max_excess,
            sampling_rate=self.sampling_rate,
        )
        return DPOffer.from_calibration(cal)
