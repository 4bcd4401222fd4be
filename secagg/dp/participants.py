"""Sans-I/O DP participants: what the masked round's client and server call (docs/dp.md).

:class:`DPClient` checks the server's offer against its own policy, draws its noise seeds,
encodes its update into the ring and decides which seed shares to reveal for a survivor set.
:class:`DPServer` removes the survivors' excess components from the unmasked sum and decodes
it. Neither does any I/O; Shamir sharing of :attr:`DPClient.shared_seeds` and the transport
of revealed shares are the round's job.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from secagg.dp.encoding import decode_sum, encode_update, to_ring
from secagg.dp.policy import DPOffer, DPPolicy, check_offer
from secagg.dp.randomness import KeyStream
from secagg.dp.rotation import padded_dim
from secagg.dp.xnoise import (
    PRECOMPUTE_SALT_BYTES,
    check_plan,
    client_noise,
    component_key,
    removal_noise,
)
from secagg.errors import ConfigurationError, ServerMisbehaviour
from secagg.prg import KEY_BYTES, Purpose, derive_key

__all__ = ["DPClient", "DPServer", "PreparedNoise", "rotation_key"]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


def rotation_key(session_id: bytes) -> bytes:
    """The round's public rotation key: HKDF(session id; session id; "dp-rotation").

    Bound to the session id, which is fixed only after every input is committed to the
    round, so the signs are independent of the inputs (the wrap bound's assumption).
    """
    if len(session_id) < KEY_BYTES:
        raise ConfigurationError("session ids are at least 32 bytes")
    return derive_key(session_id, session_id, Purpose.DP_ROTATION)


@functools.lru_cache(maxsize=64)
def _check(offer: DPOffer, policy: DPPolicy | None) -> float | None:
    """The client's check of an offer: its policy, or (no policy) the plan alone.

    A pure function of two frozen values (the RDP accounting takes ~15 ms), so its answers
    are cached: the check when noise is prepared and the one in the round cost one. A
    refusal raises and is never cached."""
    if policy is None:
        check_plan(offer.plan, min_target_variance=1, max_withholders=0)
        return None
    return check_offer(offer, policy)


class PreparedNoise:
    """A client's noise for ONE future round, drawn before the round (docs/dp.md, "Speed").

    The noise does not depend on the input or on the session: with the plan of the next
    round (a job's rounds share ``n``, ``t``, ``T`` and ``dim``) the client checks the offer
    against its policy, draws ``m + 1`` fresh seeds and a fresh salt from :mod:`secrets`,
    and sums its components under the salt-keyed stream keys
    (:func:`secagg.dp.xnoise.component_key` with ``precompute_salt``). The round's
    :class:`DPClient` takes it only if the round's offer equals :attr:`offer`; seeds, salt
    and noise are handed out once and erased (:meth:`take`), or erased by :meth:`discard`.

    Raises
    ------
    ServerMisbehaviour
        At construction, if ``offer`` is weaker than ``policy``.
    """

    __slots__ = ("_noise", "_salt", "_seeds", "epsilon", "offer")

    def __init__(self, offer: DPOffer, policy: DPPolicy | None, *, backend: str = "cpu") -> None:
        self.epsilon = _check(offer, policy)
        self.offer = offer
        plan = offer.plan
        self._seeds: list[bytes] | None = [
            secrets.token_bytes(KEY_BYTES) for _ in range(plan.components)
        ]
        self._salt: bytes | None = secrets.token_bytes(PRECOMPUTE_SALT_BYTES)
        keys = [
            component_key(s, b"", 0, k, precompute_salt=self._salt)
            for k, s in enumerate(self._seeds)
        ]
        self._noise: I64 | None = client_noise(plan, keys, padded_dim(offer.dim), backend=backend)

    def __repr__(self) -> str:
        state = "used" if self._noise is None else "ready"
        return f"PreparedNoise(components={self.offer.plan.components}, {state})"

    @property
    def ready(self) -> bool:
        """Whether the noise is still unused."""
        return self._noise is not None

    def take(self) -> tuple[list[bytes], bytes, I64]:
        """``(seeds, salt, noise)``, once; this object forgets them.

        Raises
        ------
        ConfigurationError
            If they were taken or discarded before (noise is never reused).
        """
        seeds, salt, noise = self._seeds, self._salt, self._noise
        if seeds is None or salt is None or noise is None:
            raise ConfigurationError("prepared DP noise was already used or discarded")
        self._seeds = self._salt = self._noise = None
        return seeds, salt, noise

    def discard(self) -> None:
        """Erase seeds, salt and noise (a round that does not use them, or an abort)."""
        if self._noise is not None:
            self._noise.fill(0)
        self._seeds = self._salt = self._noise = None


class DPClient:
    """One client's DP state for one round.

    ``policy=None`` (a client that did not ask for DP) checks only that the plan is the one
    its headline numbers give; ``epsilon`` is then ``None``.

    ``prepared``: noise drawn before the round (:class:`PreparedNoise`); used when its offer
    equals ``offer`` (then :attr:`salt` is its salt), otherwise discarded and the noise is
    drawn in the round as without it. Either way it is single-use.

    Raises
    ------
    ServerMisbehaviour
        At construction, if the offer is weaker than ``policy``.
    """

    __slots__ = ("_keys", "_noise", "_seeds", "client_id", "epsilon", "offer", "salt",
                 "session_id")  # fmt: skip

    def __init__(
        self,
        offer: DPOffer,
        policy: DPPolicy | None,
        *,
        client_id: int,
        session_id: bytes,
        prepared: PreparedNoise | None = None,
    ) -> None:
        self.epsilon = _check(offer, policy)
        self.offer = offer
        self.client_id = client_id
        self.session_id = session_id
        self._noise: I64 | None = None
        self._keys: list[bytes] = []
        self.salt: bytes | None = None
        """The precompute salt of the prepared noise (``None``: keys bound to the session)."""
        if prepared is not None and prepared.ready and prepared.offer == offer:
            self._seeds, self.salt, self._noise = prepared.take()
            return
        if prepared is not None:
            prepared.discard()
        self._seeds = [secrets.token_bytes(KEY_BYTES) for _ in range(offer.plan.components)]
        self._keys = [component_key(s, session_id, client_id, k) for k, s in enumerate(self._seeds)]

    def __repr__(self) -> str:
        return f"DPClient(client_id={self.client_id}, components={len(self._seeds)})"

    @property
    def shared_seeds(self) -> list[bytes]:
        """Seeds of the removable components ``0 .. m-1``: Shamir-share them with ``b_u``.

        The base component's seed is never exposed.
        """
        return list(self._seeds[:-1])

    def encode(self, x: npt.ArrayLike) -> U64:
        """``(round(gamma H D clip(x)) + noise) mod 2^b``, length ``d'``."""
        o = self.offer
        r = encode_update(
            x,
            clip=o.clip,
            gamma=o.gamma,
            beta=o.beta,
            rotation_key=rotation_key(self.session_id),
            rounding=KeyStream(secrets.token_bytes(KEY_BYTES), Purpose.DP_ROUNDING),
        )
        if self._noise is not None:
            noise, self._noise = self._noise, None
            r += noise
            noise.fill(0)
            return to_ring(r, o.bits)
        if not self._keys:
            raise ConfigurationError("this round's DP noise was already used")
        keys, self._keys = self._keys, []
        return to_ring(r + client_noise(o.plan, keys, padded_dim(o.dim)), o.bits)

    def erase(self) -> None:
        """Forget the noise, its keys and seeds (after the round or on abort)."""
        if self._noise is not None:
            self._noise.fill(0)
        self._noise = None
        self._keys = []
        self._seeds = []

    @property
    def prepared(self) -> bool:
        """Whether this round uses noise drawn before the round."""
        return self.salt is not None

    def reveal(self, survivors: Sequence[int], roster: Sequence[int]) -> tuple[int, ...]:
        """Components ``k`` whose seed shares to reveal for every survivor (checked ``U``).

        ``roster`` is the set the client itself accepted (its checked roster, at most
        ``n``); ``survivors`` must be a duplicate-free subset of it with ``>= t`` members,
        and the components are ``plan.removed(|U|)`` (the bits of ``2^m - 1 - x(|U|)``,
        never the base), whatever the server asks for.

        Raises
        ------
        ServerMisbehaviour
            For duplicates, strangers, a roster over ``n`` or fewer than ``t`` survivors.
        """
        plan, ids = self.offer.plan, set(roster)
        if len(set(survivors)) != len(survivors) or not set(survivors) <= ids:
            raise ServerMisbehaviour("survivor set has duplicates or ids outside the roster")
        if len(ids) > plan.n_clients:
            raise ServerMisbehaviour(f"roster of {len(ids)} > plan's n={plan.n_clients}")
        if len(survivors) < plan.min_survivors:
            raise ServerMisbehaviour(
                f"{len(survivors)} survivors < threshold {plan.min_survivors}: no noise removed"
            )
        return plan.removed(len(survivors))


class DPServer:
    """The server's DP step for one round: remove excess noise, decode."""

    __slots__ = ("offer", "session_id")

    def __init__(self, offer: DPOffer, *, session_id: bytes) -> None:
        self.offer = offer
        self.session_id = session_id

    def finish(
        self,
        total: U64,
        survivors: Sequence[int],
        seeds: Mapping[int, Sequence[bytes]],
        *,
        salts: Mapping[int, bytes] | None = None,
    ) -> npt.NDArray[np.float64]:
        """The released sum of the clipped updates from the unmasked ring sum ``total``.

        ``seeds[u]`` are survivor ``u``'s reconstructed seeds of components
        ``plan.removed(|U|)``, in that order;
        ``salts[u]`` its signed precompute salt if it drew its noise before the round.
        """
        o = self.offer
        return decode_sum(
            self.release(total, survivors, seeds, salts=salts),
            bits=o.bits,
            gamma=o.gamma,
            rotation_key=rotation_key(self.session_id),
            dim=o.dim,
        )

    def release(
        self,
        total: U64,
        survivors: Sequence[int],
        seeds: Mapping[int, Sequence[bytes]],
        *,
        salts: Mapping[int, bytes] | None = None,
    ) -> U64:
        """The released ring sum: ``total`` minus the survivors' removable components, mod
        ``2^b`` (what the server publishes; :meth:`finish` decodes it)."""
        o = self.offer
        s = len(survivors)
        if set(seeds) != set(survivors):
            raise ConfigurationError("need the removable seeds of exactly the survivors")
        salts = salts or {}
        removed = o.plan.removed(s)
        if any(len(seeds[u]) != len(removed) for u in survivors):
            raise ConfigurationError(f"need {len(removed)} removable seeds of every survivor")
        keys = {
            u: [
                component_key(seed, self.session_id, u, k, precompute_salt=salts.get(u))
                for k, seed in zip(removed, seeds[u], strict=True)
            ]
            for u in survivors
        }
        d = padded_dim(o.dim)
        released = np.asarray(total, dtype=np.uint64) - to_ring(
            removal_noise(o.plan, keys, s, d), o.bits
        )
        return to_ring(released.astype(np.int64), o.bits)
