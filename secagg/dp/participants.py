"""Sans-I/O DP participants: what the masked round's client and server call (docs/dp.md).

:class:`DPClient` checks the server's offer against its own policy, draws its noise seeds,
encodes its update into the ring and decides which seed shares to reveal for a survivor set.
:class:`DPServer` removes the survivors' excess components from the unmasked sum and decodes
it. Neither does any I/O; Shamir sharing of :attr:`DPClient.shared_seeds` and the transport
of revealed shares are the round's job.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from secagg.dp.encoding import decode_sum, encode_update, to_ring
from secagg.dp.policy import DPOffer, DPPolicy, check_offer
from secagg.dp.randomness import KeyStream
from secagg.dp.rotation import padded_dim
from secagg.dp.xnoise import (
    check_plan,
    client_noise,
    component_key,
    removal_noise,
)
from secagg.errors import ConfigurationError, ServerMisbehaviour
from secagg.prg import KEY_BYTES, Purpose, derive_key

__all__ = ["DPClient", "DPServer", "rotation_key"]

U64 = npt.NDArray[np.uint64]


def rotation_key(session_id: bytes) -> bytes:
    """The round's public rotation key: HKDF(session id; session id; "dp-rotation").

    Bound to the session id, which is fixed only after every input is committed to the
    round, so the signs are independent of the inputs (the wrap bound's assumption).
    """
    if len(session_id) < KEY_BYTES:
        raise ConfigurationError("session ids are at least 32 bytes")
    return derive_key(session_id, session_id, Purpose.DP_ROTATION)


class DPClient:
    """One client's DP state for one round.

    ``policy=None`` (a client that did not ask for DP) checks only that the plan is the one
    its headline numbers give; ``epsilon`` is then ``None``.

    Raises
    ------
    ServerMisbehaviour
        At construction, if the offer is weaker than ``policy``.
    """

    __slots__ = ("_keys", "_seeds", "client_id", "epsilon", "offer", "session_id")

    def __init__(
        self, offer: DPOffer, policy: DPPolicy | None, *, client_id: int, session_id: bytes
    ) -> None:
        self.epsilon: float | None
        if policy is None:
            check_plan(offer.plan, min_target_variance=1, max_withholders=0)
            self.epsilon = None
        else:
            self.epsilon = check_offer(offer, policy)
        self.offer = offer
        self.client_id = client_id
        self.session_id = session_id
        self._seeds = [secrets.token_bytes(KEY_BYTES) for _ in range(offer.plan.components)]
        self._keys = [component_key(s, session_id, client_id, k) for k, s in enumerate(self._seeds)]

    def __repr__(self) -> str:
        return f"DPClient(client_id={self.client_id}, components={len(self._seeds)})"

    @property
    def shared_seeds(self) -> list[bytes]:
        """Seeds of the removable components ``0 .. L-1``: Shamir-share them with ``b_u``.

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
        return to_ring(r + client_noise(o.plan, self._keys, padded_dim(o.dim)), o.bits)

    def reveal(self, survivors: Sequence[int], roster: Sequence[int]) -> range:
        """Components ``k`` whose seed shares to reveal for every survivor (checked ``U``).

        ``roster`` is the set the client itself accepted (its checked roster, at most
        ``n``); ``survivors`` must be a duplicate-free subset of it with ``>= t`` members,
        and ``k < j`` for ``j = max{j : s_j <= |U|}``, whatever the server asks for.

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
        return range(plan.level(len(survivors)))


class DPServer:
    """The server's DP step for one round: remove excess noise, decode."""

    __slots__ = ("offer", "session_id")

    def __init__(self, offer: DPOffer, *, session_id: bytes) -> None:
        self.offer = offer
        self.session_id = session_id

    def finish(
        self, total: U64, survivors: Sequence[int], seeds: Mapping[int, Sequence[bytes]]
    ) -> npt.NDArray[np.float64]:
        """The released sum of the clipped updates from the unmasked ring sum ``total``.

        ``seeds[u]`` are survivor ``u``'s reconstructed seeds of components ``0 .. j-1``.
        """
        o = self.offer
        return decode_sum(
            self.release(total, survivors, seeds),
            bits=o.bits,
            gamma=o.gamma,
            rotation_key=rotation_key(self.session_id),
            dim=o.dim,
        )

    def release(
        self, total: U64, survivors: Sequence[int], seeds: Mapping[int, Sequence[bytes]]
    ) -> U64:
        """The released ring sum: ``total`` minus the survivors' removable components, mod
        ``2^b`` (what the server publishes; :meth:`finish` decodes it)."""
        o = self.offer
        s = len(survivors)
        if set(seeds) != set(survivors):
            raise ConfigurationError("need the removable seeds of exactly the survivors")
        keys = {
            u: [component_key(seed, self.session_id, u, k) for k, seed in enumerate(seeds[u])]
            for u in survivors
        }
        d = padded_dim(o.dim)
        released = np.asarray(total, dtype=np.uint64) - to_ring(
            removal_noise(o.plan, keys, s, d), o.bits
        )
        return to_ring(released.astype(np.int64), o.bits)
