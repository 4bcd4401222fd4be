"""Federation authority files: ``secagg authority init`` and ``secagg authority sign``.

The authority's private key (``authority.key``, mode 0600) stays with the operator, offline,
never on the aggregation server. ``authority.pub`` (federation name and public key, JSON)
goes into every site's enrolment kit; ``secagg authority sign`` writes one signed directory
entry per site (:mod:`secagg.directory`), which the operator enrols with the site's key.
"""

from __future__ import annotations

import json
from pathlib import Path

from secagg.directory import Authority, SignedEntry, sign_entry
from secagg.errors import ConfigurationError, MalformedMessage
from secagg.keys import IdentityKey
from secagg.service.keyfile import read_identity, write_identity

__all__ = [
    "PUBLIC_FORMAT",
    "init_authority",
    "load_authority",
    "read_entry",
    "sign_site",
]

PUBLIC_FORMAT = "secagg-federation-authority"
KEY_NAME, PUB_NAME = "authority.key", "authority.pub"


def init_authority(out_dir: str | Path, federation: str, *, force: bool = False) -> Path:
    """Write ``OUT/authority.key`` (0600) and ``OUT/authority.pub``; return the ``.pub`` path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = IdentityKey()
    try:
        SignedEntry(federation, "x", key.public, 0, 0, b"").body()
    except MalformedMessage as exc:
        raise ConfigurationError(f"bad federation name: {exc}") from None
    write_identity(out / KEY_NAME, key, force=force)
    (out / f"{KEY_NAME}.pub").unlink(missing_ok=True)  # authority.pub is the one to hand out
    pub = out / PUB_NAME
    doc = {"format": PUBLIC_FORMAT, "version": 1, "federation": federation}
    pub.write_text(json.dumps({**doc, "public_key": key.public.hex()}, indent=1) + "\n")
    return pub


def load_authority(source: str | Path | Authority, *, min_epoch: int = 0) -> Authority:
    """The :class:`Authority` in an ``authority.pub`` file (or ``source`` itself)."""
    if isinstance(source, Authority):
        return source
    p = Path(source)
    try:
        doc = json.loads(p.read_text())
        if doc.get("format") != PUBLIC_FORMAT:
            raise ValueError("not a secagg authority.pub file")
        key = bytes.fromhex(doc["public_key"])
        federation = str(doc["federation"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"{p}: cannot read the federation authority ({exc})") from None
    if len(key) != 32:
        raise ConfigurationError(f"{p}: the authority key is not 32 bytes")
    return Authority(federation, key, min_epoch)


def sign_site(
    key_path: str | Path,
    name: str,
    identity_key: bytes,
    *,
    epoch: int = 0,
    not_after: int = 0,
) -> SignedEntry:
    """Sign site ``name``'s entry with the authority key at ``key_path`` (offline step).

    The federation name comes from the ``authority.pub`` beside the key."""
    authority = read_identity(key_path)
    public = load_authority(Path(key_path).with_name(PUB_NAME))
    if public.public_key != authority.public:
        raise ConfigurationError(f"{key_path} does not match the {PUB_NAME} beside it")
    federation = public.federation
    try:
        return sign_entry(
            authority, federation, name, identity_key, epoch=epoch, not_after=not_after
        )
    except MalformedMessage as exc:
        raise ConfigurationError(f"cannot sign the entry: {exc}") from None


def read_entry(path: str | Path) -> bytes:
    """An encoded signed entry from a file written by ``secagg authority sign`` (hex)."""
    p = Path(path)
    try:
        data = bytes.fromhex(p.read_text().strip())
        SignedEntry.decode(data)
    except (OSError, ValueError, MalformedMessage) as exc:
        raise ConfigurationError(f"{p}: not a signed directory entry ({exc})") from None
    return data
