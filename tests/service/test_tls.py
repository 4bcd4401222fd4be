"""TLS and mutual TLS, with the client certificate bound to the participant name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secagg.server import StageTimeouts
from secagg.service.client import Client, Policy, RetryPolicy
from secagg.service.errors import PermissionDenied, RemoteError
from secagg.service.tls import ClientTls, ServerTls

from .helpers import Deployment, participate, run_threads
from .pki import make_pki

QUICK = RetryPolicy(connect_budget=0.5)


def _run_round(d: Deployment, names: list[str]) -> None:
    rid = d.create(names, 100, StageTimeouts.uniform(10.0))
    out = run_threads({n: (lambda n=n: participate(d, n, rid, np.ones(100))) for n in names})
    for o in out.values():
        assert o.error is None, o.error
        assert np.allclose(o.result.mean, 1.0, atol=1e-3)


def test_tls_round(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", [])
    d = Deployment(
        tmp_path / "s.db",
        tls=ServerTls(pki / "server.pem", pki / "server.key"),
        client_tls=ClientTls(ca=pki / "ca.pem"),
    ).start()
    try:
        names = d.enroll(3)
        _run_round(d, names)
        # A client that does not trust the CA cannot connect.
        with (
            Client(d.target, d.identities[names[0]], retry=QUICK, insecure_no_tls=True) as plain,
            pytest.raises(RemoteError),
        ):
            plain.join(bytes(16))
    finally:
        d.stop()


def test_mutual_tls_binds_certificate_to_participant(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["c1", "c2", "c3", "admin"])
    server_tls = ServerTls(pki / "server.pem", pki / "server.key", client_ca=pki / "ca.pem")
    admin_tls = ClientTls(ca=pki / "ca.pem", cert=pki / "admin.pem", key=pki / "admin.key")
    d = Deployment(tmp_path / "s.db", tls=server_tls, client_tls=admin_tls).start()
    try:
        names = d.enroll(3)

        def tls_for(name: str) -> ClientTls:
            return ClientTls(ca=pki / "ca.pem", cert=pki / f"{name}.pem", key=pki / f"{name}.key")

        rid = d.create(names, 100, StageTimeouts.uniform(10.0))
        kit = Policy(authority=d.authority)

        def job(n: str) -> object:
            with Client(d.target, d.identities[n], tls=tls_for(n), policy=kit) as c:
                return c.aggregate(rid, np.ones(100))

        out = run_threads({n: (lambda n=n: job(n)) for n in names})
        assert all(o.error is None for o in out.values()), [o.error for o in out.values()]
        # c1's identity key presented with c2's certificate: refused.
        with (
            Client(d.target, d.identities["c1"], tls=tls_for("c2"), policy=kit) as c,
            pytest.raises(PermissionDenied, match="certificate"),
        ):
            c.join(rid)
        # No client certificate at all: the TLS handshake fails.
        with (
            Client(
                d.target,
                d.identities["c1"],
                tls=ClientTls(ca=pki / "ca.pem"),
                retry=QUICK,
                policy=kit,
            ) as c,
            pytest.raises(RemoteError),
        ):
            c.join(rid)
    finally:
        d.stop()
