"""Client-side trust in the directory a server serves (:class:`~secagg.service.client.Policy`).

A server that invents participants controls the threshold, so by default a client needs an
independent way to check every directory entry: the federation authority's public key
(entries signed offline, :mod:`secagg.directory`) or a pinned directory. Trusting the
server's directory as served is an explicit, loudly named opt-in.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from secagg.directory import Authority, SignedEntry
from secagg.errors import InvalidSignature, MalformedMessage
from secagg.service.authority import load_authority
from secagg.service.errors import PolicyRefused
from secagg.service.serde import JoinedRound

__all__ = ["NO_TRUST_ANCHOR", "VerifiedEntries", "check_directory"]

NO_TRUST_ANCHOR = (
    "the client cannot check the directory the server serves: give Policy(authority=...) "
    "(the federation's authority.pub from the enrolment kit) or Policy(pinned_directory=...), "
    "or opt in with Policy(trust_server_directory=True) (INSECURE: the server can then add "
    "participants it controls)"
)


class VerifiedEntries:
    """Directory entries whose authority signature verified, across rounds (bounded LRU).

    Keyed by (authority key, encoded entry): the signature covers every byte of the entry,
    so a hit means the very same bytes verified under the very same key before. Only the
    Ed25519 check is skipped; the field checks (name, key, expiry at ``now``, epoch) run on
    every round. A federation of ``n`` sites then costs ``n`` verifications once, not per
    round.
    """

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def verify(
        self, auth: Authority, entry: SignedEntry, blob: bytes, *, name: str, key: bytes, now: float
    ) -> None:
        """:meth:`Authority.verify`, skipping the signature for a cached entry."""
        cache_key = (bytes(auth.public_key), bytes(blob))
        with self._lock:
            hit = cache_key in self._seen
            if hit:
                self._seen.move_to_end(cache_key)
        if hit:
            auth.check_fields(entry, name=name, identity_key=key, now=now)
            return
        auth.verify(entry, name=name, identity_key=key, now=now)
        with self._lock:
            self._seen[cache_key] = None
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)


VERIFIED = VerifiedEntries()
"""The process-wide cache :func:`check_directory` uses by default."""


def check_directory(
    joined: JoinedRound,
    *,
    pinned: Mapping[str, bytes] | None,
    authority: Authority | str | Path | None,
    trust_server_directory: bool,
    now: float,
    cache: VerifiedEntries | None = None,
) -> None:
    """Raise :class:`PolicyRefused` unless every directory entry is vouched for.

    Pinned keys and authority signatures both apply when both are given; without either,
    only ``trust_server_directory=True`` lets the round through. Authority signatures that
    verified before are taken from ``cache`` (:data:`VERIFIED` by default).
    """
    cache = VERIFIED if cache is None else cache
    keys = [bytes(k) for k in joined.directory.values()]
    names = [joined.names.get(cid, "") for cid in joined.directory]
    if len(set(keys)) != len(keys) or len(set(names)) != len(names):
        raise PolicyRefused("the directory lists one name or identity key more than once")
    if pinned is not None:
        for cid, key in joined.directory.items():
            name = joined.names.get(cid, "")
            if pinned.get(name) != key:
                raise PolicyRefused(f"directory entry {name!r} does not match the pinned key")
    if authority is not None:
        auth = load_authority(authority)
        for cid, key in joined.directory.items():
            name = joined.names.get(cid, "")
            blob = joined.signed_entries.get(cid)
            if not blob:
                raise PolicyRefused(
                    f"directory entry {name!r} (client {cid}) carries no authority signature"
                )
            try:
                entry = SignedEntry.decode(blob)
                cache.verify(auth, entry, bytes(blob), name=name, key=key, now=now)
            except (InvalidSignature, MalformedMessage) as exc:
                raise PolicyRefused(f"directory entry {name!r} (client {cid}): {exc}") from None
    if pinned is None and authority is None and not trust_server_directory:
        raise PolicyRefused(NO_TRUST_ANCHOR)
