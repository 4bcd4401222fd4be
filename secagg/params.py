"""Public parameters of one aggregation round, and their canonical encoding.

Every client must hold the same :class:`RoundParams`; their SHA-256 digest goes into the
session id, so a client configured differently computes a different session and every
message it exchanges is refused.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from secagg.errors import ConfigurationError, MalformedMessage
from secagg.quantize import QuantSpec
from secagg.wire import Reader, Writer

if TYPE_CHECKING:
    from secagg.dp.policy import DPOffer
    from secagg.he_params import HEParams

__all__ = [
    "LAYOUT_BYTES",
    "MAX_CLIENTS",
    "MAX_DIM",
    "PROTOCOL_VERSION",
    "ROUND_ID_BYTES",
    "Mode",
    "RoundParams",
    "make_params",
    "with_dp",
]

PROTOCOL_VERSION = 2
"""Wire version of every message and of the round parameters. 2 (this release): the
reveal_nonces stage, signed share commitments, the optional DP sections (with the salts of
noise drawn ahead of the round), the chunked DP noise streams, the binary noise plan, the
``he_clients`` section of sharded hybrid/ckks rounds and their group ciphertexts; a peer
speaking 1 is refused when it decodes. None of 2 has been released, so later changes of this
release stay 2."""
ROUND_ID_BYTES = 16
MAX_CLIENTS = 1 << 16
"""Largest roster a round accepts (bounds every list decoded from the wire)."""
MAX_DIM = 1 << 31
"""Largest vector a round accepts."""
LAYOUT_BYTES = 32
"""A layout fingerprint is one SHA-256 digest."""


class Mode(IntEnum):
    """Privacy mode of a round."""

    MASKED = 1
    CKKS = 2
    HYBRID = 3

    @classmethod
    def parse(cls, name: str) -> Mode:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ConfigurationError(
                f"unknown mode {name!r}; choose one of masked, ckks, hybrid"
            ) from None


@dataclass(frozen=True)
class RoundParams:
    """Parameters every participant of a round agrees on.

    Parameters
    ----------
    round_id:
        16 random bytes naming the round.
    mode:
        Privacy mode.
    dim:
        Number of parameters aggregated.
    quant:
        Quantization and packing (clip, bits, roster size, max weight).
    degree:
        Neighbours per client in the SecAgg+ graph (``n - 1`` for the full graph).
    threshold:
        Shamir threshold ``t``: shares held by a client's neighbours and itself needed to
        reconstruct its secrets; also the minimum number of survivors at every stage.
    layout:
        ``b""`` or the 32-byte :data:`LAYOUT_BYTES` fingerprint of the model layout (SHA-256
        over leaf names, shapes, dtypes and order, :func:`secagg.service.tensors.fingerprint`);
        a client whose update has another layout refuses before sending anything
        (:func:`secagg.policy.check_layout`). Encoded as a length byte and the digest.
    dp:
        Distributed DP offer of the round (:class:`secagg.dp.policy.DPOffer`), or ``None``.
        ``masked`` and ``hybrid`` rounds only, unweighted, for exactly this ``dim``, ``n``, ``t``
        (the plan's ``min_survivors`` is the threshold). Encoded after the layout as a
        marker byte and the offer's headline numbers (:func:`encode_dp_offer`); the plan's
        components are recomputed on decoding, never read from the wire. A
        params encoding without it (the format before DP) decodes with ``dp=None``.
    he_clients:
        ``0``, or (a group round of a sharded ``ckks``/``hybrid`` round) the number of
        summands the CKKS parameters are sized for instead of ``n``: the coordinator adds the
        group ciphertexts, so lane headroom, carries and noise must hold for the total
        (:func:`secagg.groups.sharded_he_clients`). Encoded after the DP offer as
        :data:`HE_CLIENTS_MARKER` and a u32; absent when ``0`` (older encodings unchanged).
    """

    round_id: bytes
    mode: Mode
    dim: int
    quant: QuantSpec
    degree: int
    threshold: int
    layout: bytes = b""
    warnings: tuple[str, ...] = field(default=(), compare=False)
    dp: DPOffer | None = None
    he_clients: int = 0

    def __post_init__(self) -> None:
        if len(self.round_id) != ROUND_ID_BYTES:
            raise ConfigurationError(f"round_id must be {ROUND_ID_BYTES} bytes")
        if not 1 <= self.dim <= MAX_DIM:
            raise ConfigurationError(f"dim must be in 1..{MAX_DIM}, got {self.dim}")
        n = self.quant.n_clients
        if not 2 <= n <= MAX_CLIENTS:
            raise ConfigurationError(f"a round needs 2..{MAX_CLIENTS} clients, got {n}")
        if not 1 <= self.degree <= n - 1:
            raise ConfigurationError(f"degree must be in 1..{n - 1}, got {self.degree}")
        if not 1 <= self.threshold <= self.degree + 1:
            raise ConfigurationError(
                f"threshold must be in 1..degree+1={self.degree + 1}, got {self.threshold}"
            )
        if len(self.layout) not in (0, LAYOUT_BYTES):
            raise ConfigurationError(
                f"layout fingerprint must be empty or {LAYOUT_BYTES} bytes, got {len(self.layout)}"
            )
        if self.dp is not None:
            self._check_dp(self.dp)
        if self.he_clients:
            if self.mode is Mode.MASKED or self.dp is not None:
                raise ConfigurationError(
                    "he_clients sizes the CKKS parameters of a sharded ckks/hybrid group round"
                    " without DP"
                )
            if not n <= self.he_clients <= MAX_HE_CLIENTS:
                raise ConfigurationError(
                    f"he_clients must be in n={n}..{MAX_HE_CLIENTS}, got {self.he_clients}"
                )

    def _check_dp(self, dp: DPOffer) -> None:
        """The offer must describe this round: masked, unweighted, same ``dim``, ``n``, ``t``."""
        if self.mode is Mode.CKKS:
            raise ConfigurationError(
                "distributed DP is integrated in masked and hybrid rounds only, not ckks"
                " (docs/dp.md)"
            )
        if self.quant.max_weight != 1:
            raise ConfigurationError(
                f"DP rounds sum clipped updates unweighted; max_weight={self.quant.max_weight}"
            )
        plan = dp.plan
        if (dp.dim, plan.n_clients, plan.min_survivors) != (
            self.dim,
            self.n_clients,
            self.threshold,
        ):
            raise ConfigurationError(
                f"DP offer is for dim={dp.dim}, n={plan.n_clients}, t={plan.min_survivors}; "
                f"the round has dim={self.dim}, n={self.n_clients}, t={self.threshold}"
            )
        if plan.components - 1 > MAX_DP_SEEDS:
            raise ConfigurationError(
                f"DP plan has {plan.components} noise components; at most {MAX_DP_SEEDS + 1}"
            )
        from secagg.dp.packing import dp_lane_bits

        dp_lane_bits(dp.bits, self.n_clients)  # raises when b + ceil(log2 n) > 64

    @property
    def n_clients(self) -> int:
        return self.quant.n_clients

    @property
    def he(self) -> HEParams:
        """CKKS parameters of a ``ckks`` or ``hybrid`` round (derived, not transmitted).

        Raises
        ------
        ConfigurationError
            In a ``masked`` round.
        InfeasibleParameters
            If no 128-bit-secure CKKS set sums the inputs exactly.
        """
        if self.mode is Mode.MASKED:
            raise ConfigurationError("masked rounds have no CKKS parameters")
        q = self.quant
        if self.dp is not None:
            # hybrid DP: the d' ring values mod 2^b in lanes of b + ceil(log2 n) bits
            from secagg.dp.rotation import padded_dim

            return _he_params(q.n_clients, self.dp.bits, padded_dim(self.dim), "hybrid", 1)
        n = self.he_clients or q.n_clients
        return _he_params(n, q.bits, self.dim, self.mode.name.lower(), q.max_weight)

    @property
    def words(self) -> int:
        """Length of a masked vector in uint64 words (the DP lanes' count in DP rounds)."""
        if self.dp is not None:
            from secagg.dp.packing import dp_words

            return dp_words(self.dp, self.n_clients)
        return self.quant.words(self.dim)

    def encode(self) -> bytes:
        q = self.quant
        w = (
            Writer()
            .u8(PROTOCOL_VERSION)
            .fixed(self.round_id, ROUND_ID_BYTES)
            .u8(int(self.mode))
            .u64(self.dim)
            .f64(q.clip)
            .u8(q.bits)
            .u32(q.n_clients)
            .u64(q.max_weight)
            .u32(self.degree)
            .u32(self.threshold)
            .u8(len(self.layout))
            .raw(self.layout)
        )
        if self.dp is not None:
            encode_dp_offer(w, self.dp)
        if self.he_clients:
            w.u8(HE_CLIENTS_MARKER).u32(self.he_clients)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> RoundParams:
        r = Reader(data)
        if r.u8() != PROTOCOL_VERSION:
            raise MalformedMessage("unsupported protocol version")
        round_id = r.fixed(ROUND_ID_BYTES)
        try:
            mode = Mode(r.u8())
        except ValueError:
            raise MalformedMessage("unknown mode") from None
        dim = r.u64()
        clip, bits, n, max_weight = r.f64(), r.u8(), r.u32(), r.u64()
        degree, threshold = r.u32(), r.u32()
        layout = r.fixed(r.u8())
        dp: DPOffer | None = None
        he_clients = 0
        while r.remaining and not he_clients:
            marker = r.u8()
            if marker == DP_MARKER and dp is None:
                dp = _decode_dp_body(r, n, threshold)
            elif marker == HE_CLIENTS_MARKER:
                he_clients = r.u32()
                if not he_clients:
                    raise MalformedMessage("he_clients section with 0 clients")
            else:
                raise MalformedMessage("unknown field after the layout of the round parameters")
        r.end()
        try:
            quant = QuantSpec(clip, bits, n, max_weight)
            return cls(
                round_id, mode, dim, quant, degree, threshold, layout, dp=dp,
                he_clients=he_clients,
            )  # fmt: skip
        except ConfigurationError as exc:
            raise MalformedMessage(f"invalid round parameters: {exc}") from exc

    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding, bound into the session id."""
        return hashlib.sha256(b"secagg/v1/params" + self.encode()).digest()


MAX_DP_SEEDS = 255
"""Most removable noise seeds per client (one byte on the wire, ``messages.ShareKeys``)."""
DP_MARKER = 1
"""Byte that opens the DP offer after the layout (nothing follows the layout without DP)."""
HE_CLIENTS_MARKER = 2
"""Byte that opens the ``he_clients`` section (after the DP offer; sharded HE group rounds)."""
MAX_HE_CLIENTS = 2 * MAX_CLIENTS
"""Largest ``he_clients``: a sharded round's total roster plus one summand per group."""


def encode_dp_offer(w: Writer, dp: DPOffer) -> None:
    """Append ``dp``: marker, dim u64, clip/gamma/beta f64, bits u8, rounds u32, then the
    plan's ``T`` u64, ``n``/``t``/``w`` u32 and ``xi`` f64 (components are recomputed)."""
    p = dp.plan
    w.u8(DP_MARKER).u64(dp.dim).f64(dp.clip).f64(dp.gamma).f64(dp.beta).u8(dp.bits)
    w.u32(dp.rounds).u64(p.target_variance).u32(p.n_clients).u32(p.min_survivors)
    w.u32(p.max_withholders).f64(p.max_excess)


def decode_dp_offer(r: Reader, n_clients: int, threshold: int) -> DPOffer:
    """Inverse of :func:`encode_dp_offer`; the plan is rebuilt with ``make_plan``, only once
    its ``n`` and ``t`` are the round's (the rebuild is three integer formulas).

    Raises
    ------
    MalformedMessage
        For another marker, another ``n`` or ``t``, or numbers no plan has.
    """
    if r.u8() != DP_MARKER:
        raise MalformedMessage("unknown field after the layout of the round parameters")
    return _decode_dp_body(r, n_clients, threshold)


def _decode_dp_body(r: Reader, n_clients: int, threshold: int) -> DPOffer:
    from secagg.dp.policy import DPOffer
    from secagg.dp.xnoise import make_plan
    from secagg.errors import InfeasibleParameters

    dim, clip, gamma, beta, bits = r.u64(), r.f64(), r.f64(), r.f64(), r.u8()
    rounds, target, n, t, w, xi = r.u32(), r.u64(), r.u32(), r.u32(), r.u32(), r.f64()
    if (n, t) != (n_clients, threshold):
        raise MalformedMessage(
            f"DP plan for n={n}, t={t} in a round of n={n_clients}, t={threshold}"
        )
    try:
        plan = make_plan(target, n, t, max_excess=xi, max_withholders=w)
    except (ConfigurationError, InfeasibleParameters) as exc:
        raise MalformedMessage(f"invalid DP noise plan: {exc}") from exc
    return DPOffer(dim, clip, gamma, beta, bits, rounds, plan)


@functools.lru_cache(maxsize=64)
def _he_params(n: int, bits: int, dim: int, mode: str, max_weight: int) -> HEParams:
    from secagg.he_params import select_params

    return select_params(n, bits, dim, "ckks" if mode == "ckks" else "hybrid", max_weight)


def _count(value: int | str, name: str, forms: str) -> int:
    """``value`` as a whole number; a typo (``--neighbors abc``) is a ConfigurationError."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} must be {forms}, got {value!r}") from None


def make_params(
    n_clients: int,
    dim: int,
    *,
    mode: Mode | str = Mode.MASKED,
    clip: float = 8.0,
    bits: int = 16,
    max_weight: int = 1,
    dropout: float | None = None,
    corrupt: float | None = None,
    neighbors: int | str | None = "auto",
    threshold: int | str | None = "auto",
    round_id: bytes | None = None,
    layout: bytes = b"",
    dp: DPOffer | None = None,
) -> RoundParams:
    """Build round parameters, choosing degree and threshold (see :mod:`secagg.graph`).

    ``neighbors`` is ``"auto"``, ``"all"`` (the full graph of classic SecAgg) or a number;
    ``threshold`` is ``"auto"`` or a number. Explicit choices that miss the security target
    are accepted and reported in ``warnings`` (every client's :class:`~secagg.policy.ClientPolicy`
    refuses those that miss its targets). ``layout`` is the model-layout fingerprint;
    ``dp`` the distributed-DP offer (:func:`secagg.dp.calibration.calibrate` then
    :meth:`~secagg.dp.calibration.DPCalibration.offer`, for the ``t`` chosen here).

    Raises
    ------
    InfeasibleParameters
        When no degree and threshold meet the goals, with the reason.
    """
    from secagg import graph

    m = Mode.parse(mode) if isinstance(mode, str) else mode
    degree: int | None
    if neighbors in (None, "auto"):
        degree = None
    elif neighbors == "all":
        degree = n_clients - 1
    else:
        degree = _count(neighbors, "neighbors", "auto, all or a degree")
    thr = None if threshold in (None, "auto") else _count(threshold, "threshold", "auto or t")
    gp = graph.choose_parameters(
        n_clients,
        degree=degree,
        threshold=thr,
        dropout=graph.DEFAULT_DROPOUT if dropout is None else dropout,
        corrupt=graph.DEFAULT_CORRUPT if corrupt is None else corrupt,
    )
    quant = QuantSpec(clip=clip, bits=bits, n_clients=n_clients, max_weight=max_weight)
    params = RoundParams(
        round_id=round_id if round_id is not None else secrets.token_bytes(ROUND_ID_BYTES),
        mode=m,
        dim=dim,
        quant=quant,
        degree=gp.degree,
        threshold=gp.threshold,
        layout=layout,
        warnings=gp.warnings,
        dp=dp,
    )
    if m is not Mode.MASKED:
        _ = params.he  # fail early when no CKKS parameter set fits (the DP shape with dp)
    return params


def with_dp(
    params: RoundParams,
    epsilon: float,
    delta: float,
    rounds: int,
    *,
    clip: float,
    max_withholders: int = 0,
) -> RoundParams:
    """``params`` with a distributed-DP offer calibrated for its ``n``, threshold and ``dim``
    (:func:`secagg.dp.calibration.calibrate`): what a coordinator puts into a DP round.

    Raises
    ------
    ConfigurationError
        For a ckks or weighted round; InfeasibleParameters when no plan meets the budget.
    """
    import dataclasses

    from secagg.dp.calibration import calibrate
    from secagg.dp.policy import DPOffer

    cal = calibrate(
        epsilon,
        delta,
        rounds,
        n_clients=params.n_clients,
        min_survivors=params.threshold,
        dim=params.dim,
        clip=clip,
        max_withholders=max_withholders,
    )
    return dataclasses.replace(params, dp=DPOffer.from_calibration(cal))
