"""The demo's provisioning step: a federation file, ``secagg provision``, the CKKS keys.

The demo does what an operator does (docs/operations.md, "Provisioning"): it writes a
federation file naming the server, the sites (all of them CKKS key holders) and one
operator, and runs ``secagg provision`` on it as a separate process. The federation file's
``[ckks]`` table holds one key; the demo needs one per (task, HE mode), since a CKKS key
fits one parameter set. Every further key is made with ``secagg keygen --ckks`` (the same
code path) and its secret context copied into each site kit with a fresh decryption ledger,
its keyless server context into the operator kit, exactly as provisioning does for the
first one. The scratch copy of each secret is deleted afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from secagg import ckks
from secagg.errors import SecAggError
from secagg.he_params import select_params
from secagg.service import kit as kf

__all__ = ["CkksKey", "Kits", "free_port", "provision_federation", "secagg_command"]

FEDERATION = "secagg-demo"
OPERATOR = "operator"
DECRYPTION_BUDGET = 64
"""Decryptions each key holder may make under one key (the largest ``keygen`` allows): a
key serves one (task, mode) run of at most 63 rounds plus its warm-up round."""


@dataclass(frozen=True)
class CkksKey:
    """One CKKS key: the (task, mode) it serves and the round shape it fits."""

    name: str
    mode: str
    dim: int
    max_weight: int
    bits: int

    def secret_file(self, first: bool) -> str:
        """The key's file name in a site kit (the provisioned key has the kit's own name)."""
        return kf.CKKS_SECRET if first else f"{self.name}.ckks-secret"

    def server_file(self, first: bool) -> str:
        return kf.CKKS_SERVER if first else f"{self.name}.ckks-server"


@dataclass(frozen=True)
class Kits:
    """Where ``secagg provision`` put everything."""

    root: Path
    federation_file: Path
    server: Path
    operator: Path
    sites: dict[str, Path]
    keys: dict[str, CkksKey]
    """Key name -> key; the first one is the federation file's ``[ckks]`` key."""

    def secret(self, site: str, key: str) -> Path:
        """The site kit's secret context file of ``key``."""
        first = next(iter(self.keys)) == key
        return self.sites[site] / self.keys[key].secret_file(first)

    def server_context(self, key: str) -> bytes:
        """The keyless server context of ``key``, from the operator kit."""
        first = next(iter(self.keys)) == key
        return (self.operator / self.keys[key].server_file(first)).read_bytes()


def free_port() -> int:
    """A loopback port that was free a moment ago (the federation file needs its number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def secagg_command(*args: str) -> list[str]:
    """``secagg ARGS`` with this interpreter (the installed entry point may be elsewhere)."""
    return [sys.executable, "-m", "secagg.service.cli", *args]


def _run(args: Sequence[str], what: str, cwd: Path | None = None) -> str:
    done = subprocess.run(  # noqa: S603 -- our own interpreter and CLI
        list(args), capture_output=True, text=True, cwd=cwd, check=False
    )
    if done.returncode != 0:
        raise SecAggError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a TOML basic string


def federation_text(
    port: int, sites: Sequence[str], modes: Sequence[str], clients: int, first: CkksKey | None
) -> str:
    """The federation file (docs/operations.md, "Provisioning")."""
    lines = [
        "# written by `secagg demo`: a whole federation on loopback",
        f"name = {_toml_str(FEDERATION)}",
        f'server = "localhost:{port}"',
        f'listen = "127.0.0.1:{port}"',
        'server_names = ["localhost"]',
        "modes = [" + ", ".join(_toml_str(m) for m in modes) + "]",
        "cert_days = 2",
    ]
    if first is not None:
        lines += [
            "",
            "[ckks]",
            f"clients = {clients}",
            f"dim = {first.dim}",
            f"mode = {_toml_str(first.mode)}",
            f"bits = {first.bits}",
            f"max_weight = {first.max_weight}",
            f"decryption_budget = {DECRYPTION_BUDGET}",
        ]
    lines += ["", "[[operators]]", f"name = {_toml_str(OPERATOR)}"]
    for name in sites:
        lines += ["", "[[sites]]", f"name = {_toml_str(name)}"]
        if first is not None:
            lines.append("key_holder = true")
    return "\n".join(lines) + "\n"


def provision_federation(
    out: Path, sites: Sequence[str], modes: Sequence[str], keys: Sequence[CkksKey]
) -> Kits:
    """Write ``out/federation.toml``, run ``secagg provision`` on it (into ``out/kits``, which
    must not exist yet), and add the CKKS keys beyond the first."""
    fed_modes = [m for m in modes if m in ("masked", "hybrid", "ckks")] or ["masked"]
    fed_file = out / "federation.toml"
    root = out / "kits"
    fed_file.write_text(
        federation_text(free_port(), sites, fed_modes, len(sites), keys[0] if keys else None)
    )
    _run(secagg_command("provision", str(fed_file), "--out", str(root)), "secagg provision")
    kits = Kits(
        root=root,
        federation_file=fed_file,
        server=root / "server",
        operator=root / "operators" / OPERATOR,
        sites={name: root / "sites" / name for name in sites},
        keys={k.name: k for k in keys},
    )
    for key in keys[1:]:
        _add_key(kits, key)
    return kits


def _add_key(kits: Kits, key: CkksKey) -> None:
    """One more CKKS key: ``secagg keygen --ckks`` in a scratch folder, the secret copied
    into every site kit (mode 0600, fresh ledger), the server context into the operator kit."""
    scratch = kits.root / f"keygen-{key.name}"
    scratch.mkdir()
    try:
        _run(
            secagg_command(
                "keygen",
                "--ckks",
                "--mode",
                key.mode,
                "--clients",
                str(len(kits.sites)),
                "--dim",
                str(key.dim),
                "--bits",
                str(key.bits),
                "--max-weight",
                str(key.max_weight),
                "--decryption-budget",
                str(DECRYPTION_BUDGET),
                "--out",
                str(scratch / key.name),
            ),
            f"secagg keygen --ckks ({key.name})",
        )
        secret = scratch / f"{key.name}.ckks-secret"
        he = select_params(len(kits.sites), key.bits, key.dim, key.mode, key.max_weight)  # type: ignore[arg-type]
        epoch = ckks.open_secret_context(secret, he).epoch
        for site in kits.sites:
            dst = kits.secret(site, key.name)
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret.read_bytes())
            ckks.FileLedger(ckks.ledger_path_for(dst)).reset(epoch)
        shutil.copyfile(
            scratch / f"{key.name}.ckks-server", kits.operator / key.server_file(first=False)
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
