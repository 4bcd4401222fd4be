"""Startup kits: the directory layout ``secagg provision`` writes, and reading one back.

A kit is a directory with a manifest ``kit.toml`` (``format = "secagg-kit"``, ``kind`` =
``site``, ``operator`` or ``server``) and files under fixed names (docs/operations.md,
"Provisioning"). Every path is relative to the kit, so a kit can be copied anywhere.
:meth:`secagg.service.client.Client.from_kit` and
:meth:`secagg.service.admin.AdminClient.from_kit` start from one.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secagg.errors import ConfigurationError

__all__ = [
    "KIT_FORMAT",
    "KIT_VERSION",
    "Kit",
    "load_kit",
    "toml_text",
]

KIT_FORMAT = "secagg-kit"
KIT_VERSION = 1
MANIFEST = "kit.toml"
IDENTITY = "identity.key"
OPERATOR_KEY = "operator.key"
CA = "ca.crt"
CERT, KEY = "tls.crt", "tls.key"
AUTHORITY = "authority.pub"
ENTRY = "entry.hex"
CKKS_SECRET = "ckks.ckks-secret"  # noqa: S105 (a file name)
CKKS_SERVER = "ckks.ckks-server"
SERVER_CONFIG = "server.toml"
STORE = "secagg.db"
KINDS = ("site", "operator", "server")


@dataclass(frozen=True)
class Kit:
    """A kit as read from its manifest (paths resolved against the kit directory)."""

    root: Path
    kind: str
    federation: str
    name: str
    server: str
    server_name: str | None = None
    key_holder: bool = False
    policy: Mapping[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """``root / name``; raises :class:`ConfigurationError` if the kit lacks it."""
        p = self.root / name
        if not p.exists():
            raise ConfigurationError(f"kit {self.root}: {name} is missing")
        return p


def load_kit(root: str | Path, kind: str | None = None) -> Kit:
    """Read ``root/kit.toml``; refuse a kit of another ``kind`` than the one asked for."""
    base = Path(root)
    manifest = base / MANIFEST
    try:
        doc = tomllib.loads(manifest.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"{manifest}: cannot read the kit manifest ({exc})") from None
    if doc.get("format") != KIT_FORMAT or doc.get("version") != KIT_VERSION:
        raise ConfigurationError(f"{manifest}: not a version {KIT_VERSION} secagg kit")
    if doc.get("kind") not in KINDS or (kind is not None and doc["kind"] != kind):
        raise ConfigurationError(f"{manifest}: a {doc.get('kind')!r} kit, expected {kind!r}")
    try:
        return Kit(
            root=base,
            kind=str(doc["kind"]),
            federation=str(doc["federation"]),
            name=str(doc["name"]),
            server=str(doc["server"]),
            server_name=str(doc["server_name"]) if doc.get("server_name") else None,
            key_holder=bool(doc.get("key_holder", False)),
            policy=dict(doc.get("policy", {})),
        )
    except KeyError as exc:
        raise ConfigurationError(f"{manifest}: missing {exc}") from None


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string (JSON escapes are TOML escapes)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def toml_text(doc: Mapping[str, Any], header: str = "") -> str:
    """A small TOML writer: scalars and lists at top level, then one level of tables."""
    lines = [f"# {line}" for line in header.splitlines()]
    tables = {k: v for k, v in doc.items() if isinstance(v, Mapping)}
    for k, v in doc.items():
        if k not in tables:
            lines.append(f"{k} = {_value(v)}")
    for k, table in tables.items():
        lines += ["", f"[{k}]"] + [f"{kk} = {_value(vv)}" for kk, vv in table.items()]
    return "\n".join(lines) + "\n"
