"""Key files: an Ed25519 identity as a small JSON document (hex seed), mode 0600, never pickle.

``secagg keygen`` writes one with :func:`write_identity`; ``secagg keygen --ckks`` writes the
key holders' CKKS context and the server's with :func:`write_ckks_contexts`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from secagg import ckks
from secagg.errors import ConfigurationError
from secagg.he_params import HEParams
from secagg.keys import IdentityKey

__all__ = ["read_identity", "read_public_key", "write_ckks_contexts", "write_identity"]

FORMAT = "secagg-identity-ed25519"


def _write_private(path: Path, text: str, *, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{path} exists (use --force to overwrite)") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def write_identity(
    path: str | Path, key: IdentityKey | None = None, *, force: bool = False
) -> IdentityKey:
    """Write a fresh (or the given) identity key to ``path`` (0600) and ``path.pub``."""
    key = key or IdentityKey()
    p = Path(path)
    doc = {
        "format": FORMAT,
        "version": 1,
        "seed": key.private_bytes.hex(),
        "public_key": key.public.hex(),
    }
    _write_private(p, json.dumps(doc, indent=1) + "\n", force=force)
    Path(f"{p}.pub").write_text(key.public.hex() + "\n")
    return key


def read_identity(path: str | Path) -> IdentityKey:
    """Load an identity key file; refuses files readable by others and mismatched keys."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise ConfigurationError(f"cannot read the identity key {p}: {exc.strerror}") from None
    if os.name == "posix" and mode & 0o077:
        raise ConfigurationError(f"{p} is readable by other users; chmod 600 it")
    try:
        doc = json.loads(p.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError("not a secagg identity file")
        key = IdentityKey(bytes.fromhex(doc["seed"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"{p}: malformed identity key file ({exc})") from None
    if key.public.hex() != doc.get("public_key"):
        raise ConfigurationError(f"{p}: public key does not match the seed")
    return key


def _looks_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdefABCDEF" for c in text)


def read_public_key(text_or_path: str) -> bytes:
    """A 32-byte public key from hex text, a ``.pub`` file or an identity file."""
    candidate = text_or_path.strip()
    p = Path(candidate)
    if p.exists():
        content = p.read_text().strip()
        if content.startswith("{"):
            try:
                candidate = json.loads(content)["public_key"]
            except (ValueError, KeyError) as exc:
                raise ConfigurationError(f"{p}: no public key ({exc})") from None
        else:
            candidate = content
    elif not _looks_hex(candidate):
        raise ConfigurationError(
            f"no such public key file: {candidate} (or give the key as 64 hex digits)"
        )
    try:
        key = bytes.fromhex(candidate)
    except ValueError:
        raise ConfigurationError(f"{text_or_path}: public keys are 64 hex digits") from None
    if len(key) != 32:
        raise ConfigurationError("public keys are 32 bytes (64 hex digits)")
    return key


def write_ckks_contexts(
    prefix: str | Path,
    params: HEParams,
    *,
    force: bool = False,
    epoch: int = 0,
    decryption_budget: int = ckks.DEFAULT_DECRYPTION_BUDGET,
) -> tuple[Path, Path]:
    """Write ``PREFIX.ckks-secret`` (mode 0600: the key holders' secret key, give it to every
    participant out of band) and ``PREFIX.ckks-server`` (no key of any kind: the operator
    passes it when creating ckks or hybrid rounds).

    Both carry the key epoch (``epoch``, a fresh key id, ``decryption_budget`` decryptions per
    key holder); a fresh ledger ``PREFIX.ckks-secret.ledger`` (0600) starts the count at zero.
    Key holders load the secret with :func:`secagg.ckks.open_secret_context`, which counts in
    the ledger beside their copy.
    """
    secret = ckks.make_secret_context(params, epoch=epoch, decryption_budget=decryption_budget)
    public = ckks.make_public_context(secret)
    base = Path(prefix)
    secret_path = base.with_name(base.name + ".ckks-secret")
    server_path = base.with_name(base.name + ".ckks-server")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    for path, data, mode in ((secret_path, secret, 0o600), (server_path, public, 0o644)):
        try:
            fd = os.open(path, flags, mode)
        except FileExistsError:
            raise ConfigurationError(f"{path} exists (use --force to overwrite)") from None
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
    key_epoch = ckks.load_server_context(public, params).epoch
    ckks.FileLedger(ckks.ledger_path_for(secret_path)).reset(key_epoch)
    return secret_path, server_path
