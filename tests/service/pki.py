"""A throwaway CA with server and client certificates, made with the openssl CLI.

(The ``cryptography`` package is not installed here and pycryptodome cannot write X.509.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(root: Path, clients: list[str]) -> Path:
    """Write ca.pem, server.{pem,key} (localhost, 127.0.0.1) and <name>.{pem,key} per client."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not available")
    root.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        *_EC,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=secagg test CA",
        cwd=root,
    )
    (root / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    (root / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, ext in [("server", "server.ext"), *((c, "client.ext") for c in clients)]:
        cn = "localhost" if name == "server" else name
        _openssl(
            "req",
            *_EC,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={cn}",
            cwd=root,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            ext,
            cwd=root,
        )
    return root
