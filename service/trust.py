"""Client-side trust in the directory a server serves (:class:`~secagg.service.client.Policy`).

A server that invents participants controls the threshold, so by default a client needs an
independent way to check every directory entry: the federation authority's public key
(entries signed offline, :mod:`secagg.directory`) or a pinned directory. Trusting the
server's directory as served is an explicit, loudly named opt-in.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from secagg.directory import Authority, SignedEntry
from secagg.errors import InvalidSignature, MalformedMessage
from secagg.service.authority import load_authority
from secagg.service.errors import PolicyRefused
from secagg.service.serde import JoinedRound

__all__ = ["NO_TRUST_ANCHOR", "check_directory"]

NO_TRUST_ANCHOR = (
    "the client cannot check the directory the server serves: give Policy(authority=...) "
    "(the federation's authority.pub from the enrolment kit) or Policy(pinned_directory=...), "
    "or opt in with Policy(trust_server_directory=True) (INSECURE: the server can then add "
    "participants it controls)"
)


def check_directory(
    joined: JoinedRound,
    *,
    pinned: Mapping[str, bytes] | None,
    authority: Authority | str | Path | None,
    trust_server_directory: bool,
    now: float,
) -> None:
    """Raise :class:`PolicyRefused` unless every directory entry is vouched for.

    Pinned keys and authority signatures both apply when both are given; without either,
    only ``trust_server_directory=True`` lets the round through.
    """
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
                auth.verify(SignedEntry.decode(blob), name=name, identity_key=key, now=now)
            except (InvalidSignature, MalformedMessage) as exc:
                raise PolicyRefused(f"directory entry {name!r} (client {cid}): {exc}") from None
    if pinned is None and authority is None and not trust_server_directory:
        raise PolicyRefused(NO_TRUST_ANCHOR)
