"""Issue 12, items 4 and 7: one writer per store; logs, metrics, reflection, TLS checks.

Each test names what it catches and how it failed before the fix.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from secagg.errors import ConfigurationError
from secagg.server import StageTimeouts
from secagg.service.client import Client, Policy
from secagg.service.config import ServerConfig
from secagg.service.errors import StoreLocked, TlsError
from secagg.service.logs import JsonFormatter, TextFormatter, parse_core_line
from secagg.service.metrics import Metrics
from secagg.service.server import BackgroundServer
from secagg.service.store import WriterLock
from secagg.service.tls import ClientTls, ServerTls, certificate_not_after

from .helpers import TOKEN, Deployment, participate, run_threads
from .pki import make_pki


def test_second_server_on_a_store_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """Two servers on one store: before, both ran and the second marked the first's live
    round aborted while the first completed it. Now the second raises ``StoreLocked``
    naming the holder, and the first's round completes with a true audit record."""
    d = Deployment(tmp_path / "s.db").start()
    try:
        names = d.enroll(3)
        rid = d.create(names, 50, StageTimeouts.uniform(20.0))
        cfg = ServerConfig(listen="127.0.0.1:0", store=str(tmp_path / "s.db"), admin_token=TOKEN)
        with pytest.raises(StoreLocked, match=rf"pid {os.getpid()} on host .*, since "):
            BackgroundServer(cfg).start()
        out = run_threads({n: (lambda n=n: participate(d, n, rid, np.ones(50))) for n in names})
        assert all(o.error is None for o in out.values())
        assert d.admin is not None and d.admin.wait(rid).status == "completed"
    finally:
        d.stop()
    # The lock went with the first server: a new one takes the store.
    d2 = Deployment(tmp_path / "s.db").start()
    d2.stop()


def test_a_crashed_servers_lock_is_not_stale(tmp_path: Path) -> None:
    """The OS lock dies with its holder: a restart after a crash starts (the ``.lock`` file
    left behind is not a reason to refuse)."""
    d = Deployment(tmp_path / "s.db").start()
    assert d.server is not None
    d.server.crash()
    assert (tmp_path / "s.db.lock").exists()
    Deployment(tmp_path / "s.db").start().stop()
    lock = WriterLock(tmp_path / "s.db")
    lock.acquire()
    lock.release()


def test_text_logs_keep_the_fields() -> None:
    """``--log-format text`` dropped every field before; now ``key=value`` follow ``msg``."""
    record = logging.LogRecord("secagg.service.server", logging.INFO, __file__, 1, "rpc", (), None)
    record.fields = {"method": "/secagg.v1.Admin/Enroll", "code": "OK", "caller": "admin", "n": 3}
    line = TextFormatter().format(record)
    assert "secagg.service.server: rpc" in line
    assert "method=/secagg.v1.Admin/Enroll code=OK caller=admin n=3" in line
    record.fields = {"reason": "no masked_input before the deadline"}
    assert 'reason="no masked_input before the deadline"' in TextFormatter().format(record)


def test_grpc_core_lines_become_json_records() -> None:
    """gRPC's C core lines broke the JSON stream; :func:`parse_core_line` reads them into
    (level, message, source) and the JSON formatter writes them as one object."""
    line = (
        "I1201 21:19:44.975146    3991 ssl_transport_security.cc:2563] Handshake failed with "
        "error SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:"
        "PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification context"
    )
    level, msg, fields = parse_core_line(line)
    assert level == logging.INFO and msg.startswith("Handshake failed")
    assert fields == {"source": "ssl_transport_security.cc:2563"}
    assert parse_core_line("E1201 21:19:44.98 3992 x.cc:1] bad")[0] == logging.ERROR
    assert parse_core_line("something else")[2] == {"source": "stderr"}
    record = logging.LogRecord("grpc.core", level, __file__, 1, msg, (), None)
    record.fields = fields
    assert json.loads(JsonFormatter().format(record))["source"] == fields["source"]
    m = Metrics()
    m.count_tls_line(msg)
    m.count_tls_line("some other line")
    text = _exposition(m)
    assert (
        'secagg_tls_handshake_failures_total{reason="PEER_DID_NOT_RETURN_A_CERTIFICATE"} 1.0'
        in text
    )
    assert "_created" not in text  # counters are counts only


def _exposition(m: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


def test_reflection_v1_and_v1alpha(deployment: Deployment) -> None:
    """Reflection answered only ``v1alpha``; current grpcurl asks ``v1`` first."""
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(deployment.target) as ch:
        for pkg in ("v1", "v1alpha"):
            call = ch.stream_stream(
                f"/grpc.reflection.{pkg}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            (resp,) = list(call(iter([req]), timeout=5))
            names = {s.name for s in resp.list_services_response.service}
            assert {"secagg.v1.Aggregation", "grpc.reflection.v1.ServerReflection"} <= names


def test_server_tls_checks_files_key_and_expiry(tmp_path: Path) -> None:
    """A key of another certificate, a missing file and an expired certificate: before, the
    first two were tracebacks at startup and the third started without a word."""
    pki = make_pki(tmp_path / "a", [])
    other = make_pki(tmp_path / "b", [])
    good = ServerTls(pki / "server.pem", pki / "server.key")
    assert good.check() == []
    not_after = certificate_not_after((pki / "server.pem").read_bytes())
    assert not_after is not None and time.time() < not_after < time.time() + 3 * 86400
    (warning,) = good.check(now=not_after + 1)
    assert "expired at" in warning
    with pytest.raises(ConfigurationError, match="does not belong to the certificate"):
        ServerTls(pki / "server.pem", other / "server.key").check()
    with pytest.raises(ConfigurationError, match="cannot read server certificate"):
        ServerTls(tmp_path / "nope.pem", pki / "server.key").check()
    with pytest.raises(ConfigurationError, match="does not belong to the certificate"):
        ClientTls(
            ca=pki / "ca.pem", cert=pki / "server.pem", key=other / "server.key"
        ).credentials()


def test_refused_client_certificate_is_a_tls_error_at_once(tmp_path: Path) -> None:
    """mTLS without a client certificate: before, ``UNAVAILABLE ... Socket closed`` after the
    whole retry budget (32 s by default); now ``TlsError`` naming the reason, first try."""
    pki = make_pki(tmp_path / "pki", ["admin"])
    server_tls = ServerTls(pki / "server.pem", pki / "server.key", client_ca=pki / "ca.pem")
    admin_tls = ClientTls(ca=pki / "ca.pem", cert=pki / "admin.pem", key=pki / "admin.key")
    d = Deployment(tmp_path / "s.db", tls=server_tls, client_tls=admin_tls).start()
    try:
        names = d.enroll(1)
        assert d.server is not None
        target = f"127.0.0.1:{d.server.port}"  # not localhost: ::1 would be the last error
        tls = ClientTls(ca=pki / "ca.pem")
        policy = Policy(authority=d.authority)
        with (
            Client(target, d.identities[names[0]], tls=tls, policy=policy) as c,
            pytest.raises(TlsError, match="requires a client certificate"),
        ):
            c.join(bytes(16))
        wrong_ca = ClientTls(ca=make_pki(tmp_path / "other", []) / "ca.pem")
        with (
            Client(target, d.identities[names[0]], tls=wrong_ca, policy=policy) as c,
            pytest.raises(TlsError, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            c.join(bytes(16))
    finally:
        d.stop()


def test_bad_neighbors_is_invalid_argument_not_internal(deployment: Deployment) -> None:
    """``CreateRound`` with ``neighbors="abc"``: the server answered ``INTERNAL`` (a
    ``ValueError`` from ``int()``); now ``INVALID_ARGUMENT`` naming the field."""
    from secagg.service.coordinator import RoundSpec
    from secagg.service.errors import RemoteError

    names = deployment.enroll(3)
    assert deployment.admin is not None
    spec = RoundSpec(job="j", participants=names, dim=4, neighbors="abc")
    with pytest.raises(RemoteError, match=r"INVALID_ARGUMENT.*neighbors must be") as err:
        deployment.admin.create_round(spec)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_rpc_lines_name_the_operator(deployment: Deployment) -> None:
    """A signed operator call's rpc line says ``operator:<name>`` (the per-operator
    credentials that landed with provisioning); a bearer-token call says ``admin``."""
    from secagg.keys import IdentityKey
    from secagg.service.admin import AdminClient

    assert deployment.server is not None and deployment.server.service is not None
    key = IdentityKey()
    deployment.server.service.store.add_operator("alice", key.public)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    log = logging.getLogger("secagg.service.server")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with AdminClient(deployment.target, operator=("alice", key)) as alice:
            alice.participants()
        assert deployment.admin is not None
        deployment.admin.participants()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    callers = [getattr(r, "fields", {}).get("caller") for r in seen if r.getMessage() == "rpc"]
    assert "operator:alice" in callers and "admin" in callers


def _expired_pair(root: Path) -> tuple[Path, Path]:
    """A self-signed localhost certificate that expired yesterday, and its key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / "old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "old.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return root / "old.pem", root / "old.key"


def test_expired_server_certificate_starts_with_a_warning(tmp_path: Path) -> None:
    """An expired server certificate: before, the server started without a word and every
    client failed its handshake; now the start logs a warning naming the expiry."""
    cert, key = _expired_pair(tmp_path / "pki")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    log = logging.getLogger("secagg.service.server")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    cfg = ServerConfig(listen="127.0.0.1:0", store=":memory:", tls=ServerTls(cert, key))
    try:
        BackgroundServer(cfg).start().stop()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    warnings = [r.getMessage() for r in seen if r.levelno == logging.WARNING]
    assert any(f"{cert} expired at" in w for w in warnings), warnings
