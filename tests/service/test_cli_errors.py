"""Every ordinary mistake is one line on stderr, a documented exit code, and no traceback.

Each row runs the real ``secagg`` command as a subprocess. Before issue 12 most of these
printed a Python traceback (missing files, a non-hex round id, a port in use, a TOML typo), or
went wrong quietly (``audit --round typo`` printed nothing and exited 0, ``round abort``
exited 3 on success, a second server on one store started and corrupted the audit record).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from secagg.keys import IdentityKey
from secagg.service.errors import (
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_DENIED,
    EXIT_LOCKED,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
)

from .cli_proc import ServeProc, cli_env, run_cli
from .pki import make_pki

TOKEN = "cli-errors-token"
MISSING_ROUND = "00" * 16


@dataclass
class World:
    root: Path
    pki: Path
    plain: ServeProc  # plaintext loopback server with an admin token
    mtls: ServeProc  # mutual-TLS server
    round_id: str = ""
    busy_port: int = 0

    @property
    def plain_target(self) -> str:
        return f"127.0.0.1:{self.plain.port}"

    @property
    def mtls_target(self) -> str:
        return f"127.0.0.1:{self.mtls.port}"  # in the certificate; not ::1 first


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("cli-errors")
    pki = make_pki(root / "pki", ["admin"])
    make_pki(root / "other", [])  # a second CA and a key of another certificate
    (root / "token").write_text(TOKEN + "\n")
    plain = ServeProc.start(
        ["--listen", "127.0.0.1:0", "--store", "plain.db", "--admin-token-file", "token"],
        cwd=root,
    )
    mtls = ServeProc.start(
        [
            "--listen",
            "127.0.0.1:0",
            "--store",
            "mtls.db",
            "--admin-token-file",
            "token",
            "--tls-cert",
            str(pki / "server.pem"),
            "--tls-key",
            str(pki / "server.key"),
            "--client-ca",
            str(pki / "ca.pem"),
            "--metrics-port",
            "0",
        ],
        cwd=root,
    )
    made = run_cli(
        ["keygen", "--ckks", "--mode", "hybrid", "--clients", "3", "--dim", "8", "--out", "fed"],
        cwd=root,
    )
    assert made.returncode == 0, made.stderr
    (root / "bare.ckks-server").write_bytes((root / "fed.ckks-server").read_bytes())  # no shape
    w = World(root, pki, plain, mtls)
    try:
        yield w
    finally:
        plain.stop()
        mtls.stop()


def _token_env() -> dict[str, str]:
    return cli_env(SECAGG_ADMIN_TOKEN=TOKEN)


def _busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def _toml(w: World, name: str, body: str) -> str:
    path = w.root / name
    path.write_text(body)
    return str(path)


Case = Callable[[World], tuple[list[str], dict[str, str] | None]]

CASES: list[tuple[str, Case, int, str]] = [
    (
        "round create without --server",
        lambda w: (["round", "create", "--job", "j", "--participants", "a", "--dim", "4"], None),
        EXIT_CONFIG,
        "no server",
    ),
    (
        "round create without an admin token",
        lambda w: (
            [
                "round",
                "create",
                "--job",
                "j",
                "--participants",
                "a",
                "--dim",
                "4",
                "--server",
                w.plain_target,
            ],
            None,
        ),
        EXIT_CONFIG,
        "no admin token",
    ),
    (
        "round create with a wrong admin token",
        lambda w: (
            ["round", "status", MISSING_ROUND, "--server", w.plain_target],
            cli_env(SECAGG_ADMIN_TOKEN="wrong"),
        ),
        EXIT_DENIED,
        "Unauthenticated",
    ),
    (
        "enroll without --store or --server",
        lambda w: (["enroll", "site-1", "--public-key", IdentityKey().public.hex()], None),
        EXIT_CONFIG,
        "--store",
    ),
    (
        "enroll --public-key missing.pub",
        lambda w: (["enroll", "site-1", "--public-key", "missing.pub", "--store", "x.db"], None),
        EXIT_CONFIG,
        "no such public key file: missing.pub",
    ),
    (
        "serve with a missing certificate",
        lambda w: (
            [
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--store",
                "m.db",
                "--tls-cert",
                "missing.pem",
                "--tls-key",
                "missing.key",
            ],
            None,
        ),
        EXIT_CONFIG,
        "cannot read server certificate missing.pem",
    ),
    (
        "serve with a missing client CA",
        lambda w: (
            [
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--store",
                "m.db",
                "--tls-cert",
                str(w.pki / "server.pem"),
                "--tls-key",
                str(w.pki / "server.key"),
                "--client-ca",
                "missing-ca.pem",
            ],
            None,
        ),
        EXIT_CONFIG,
        "cannot read client CA missing-ca.pem",
    ),
    (
        "serve with a key of another certificate",
        lambda w: (
            [
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--store",
                "m.db",
                "--tls-cert",
                str(w.pki / "server.pem"),
                "--tls-key",
                str(w.root / "other" / "server.key"),
            ],
            None,
        ),
        EXIT_CONFIG,
        "does not belong to the certificate",
    ),
    (
        "serve on a port in use",
        lambda w: (
            ["serve", "--listen", f"127.0.0.1:{w.busy_port}", "--store", "m.db"],
            None,
        ),
        EXIT_CONFIG,
        "cannot listen on 127.0.0.1:",
    ),
    (
        "a second server on the same store",
        lambda w: (["serve", "--listen", "127.0.0.1:0", "--store", "plain.db"], None),
        EXIT_LOCKED,
        "in use by another server (pid",
    ),
    (
        "TOML: [tls] bind_name (typo)",
        lambda w: (
            [
                "serve",
                "--config",
                _toml(w, "a.toml", '[tls]\ncert = "c"\nkey = "k"\nbind_name = true\n'),
            ],
            None,
        ),
        EXIT_CONFIG,
        "unknown keys in [tls]: ['bind_name']",
    ),
    (
        "TOML: listen = 18460",
        lambda w: (["serve", "--config", _toml(w, "b.toml", "listen = 18460\n")], None),
        EXIT_CONFIG,
        "listen must be a str, got 18460",
    ),
    (
        'TOML: shutdown_grace = "5s"',
        lambda w: (["serve", "--config", _toml(w, "c.toml", 'shutdown_grace = "5s"\n')], None),
        EXIT_CONFIG,
        "shutdown_grace must be a float, got '5s'",
    ),
    (
        "TOML: unknown key",
        lambda w: (["serve", "--config", _toml(w, "d.toml", "listen_addr = 'x'\n")], None),
        EXIT_CONFIG,
        "unknown config keys",
    ),
    (
        "round create with a ckks context made for another shape",
        lambda w: (
            [
                "round",
                "create",
                "--job",
                "j",
                "--participants",
                "a,b",
                "--dim",
                "8",
                "--mode",
                "hybrid",
                "--he-context",
                "fed.ckks-server",
                "--server",
                w.plain_target,
            ],
            _token_env(),
        ),
        EXIT_CONFIG,
        "was made for another round shape: clients 2 (keygen: 3)",
    ),
    (
        "round create with a ckks context (no shape file) that does not fit",
        lambda w: (
            [
                *("round", "create", "--job", "j", "--participants", "a,b,c", "--dim", "8"),
                *("--mode", "hybrid", "--he-context", "bare.ckks-server", "--max-weight", "1"),
                *("--server", w.plain_target),
            ],
            _token_env(),
        ),
        EXIT_CONFIG,
        "bare.ckks-server does not fit a hybrid round of 3 clients",
    ),
    (
        "round status with a non-hex round id",
        lambda w: (["round", "status", "9c2e-oops", "--server", w.plain_target], _token_env()),
        EXIT_CONFIG,
        "a round id is 32 hex digits",
    ),
    (
        "round status of an unknown round",
        lambda w: (["round", "status", MISSING_ROUND, "--server", w.plain_target], _token_env()),
        EXIT_NOT_FOUND,
        "NotFound",
    ),
    (
        "round create --neighbors abc",
        lambda w: (
            [
                "round",
                "create",
                "--job",
                "j",
                "--participants",
                "a",
                "--dim",
                "4",
                "--neighbors",
                "abc",
                "--server",
                w.plain_target,
            ],
            _token_env(),
        ),
        EXIT_CONFIG,
        "--neighbors: must be auto, all or a degree",
    ),
    (
        "audit --round typo",
        lambda w: (["audit", "--store", "plain.db", "--round", "typo"], None),
        EXIT_CONFIG,
        "a round id is 32 hex digits",
    ),
    (
        "audit --round of a round the store never saw",
        lambda w: (["audit", "--store", "plain.db", "--round", MISSING_ROUND], None),
        EXIT_NOT_FOUND,
        f"no audit entries for round {MISSING_ROUND}",
    ),
    (
        "a server that does not listen",
        lambda w: (["round", "status", MISSING_ROUND, "--server", "127.0.0.1:9"], _token_env()),
        EXIT_UNAVAILABLE,
        "Unavailable",
    ),
    (
        "mTLS: no client certificate",
        lambda w: (
            ["enroll", "--list", "--server", w.mtls_target, "--ca", str(w.pki / "ca.pem")],
            _token_env(),
        ),
        EXIT_UNAVAILABLE,
        "requires a client certificate",
    ),
    (
        "mTLS: a certificate from another CA",
        lambda w: (
            [
                "enroll",
                "--list",
                "--server",
                w.mtls_target,
                "--ca",
                str(w.pki / "ca.pem"),
                "--cert",
                str(w.root / "other" / "server.pem"),
                "--key",
                str(w.root / "other" / "server.key"),
            ],
            _token_env(),
        ),
        EXIT_UNAVAILABLE,
        "refuses this client certificate",
    ),
    (
        "TLS: the server certificate is not from the CA given",
        lambda w: (
            [
                "enroll",
                "--list",
                "--server",
                w.mtls_target,
                "--ca",
                str(w.root / "other" / "ca.pem"),
                "--cert",
                str(w.pki / "admin.pem"),
                "--key",
                str(w.pki / "admin.key"),
            ],
            _token_env(),
        ),
        EXIT_UNAVAILABLE,
        "CERTIFICATE_VERIFY_FAILED",
    ),
    (
        "TLS: a missing CA file",
        lambda w: (
            ["enroll", "--list", "--server", w.mtls_target, "--ca", "missing-ca.pem"],
            _token_env(),
        ),
        EXIT_CONFIG,
        "cannot read CA certificate missing-ca.pem",
    ),
    (
        "round abort succeeds",
        lambda w: (
            ["round", "abort", w.round_id, "--reason", "test", "--server", w.plain_target],
            _token_env(),
        ),
        0,
        "",
    ),
]


@pytest.mark.parametrize(("what", "case", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_line(world: World, what: str, case: Case, code: int, message: str) -> None:
    """``what``: exit ``code``, one stderr line containing ``message``, no traceback."""
    busy, port = _busy_port()
    world.busy_port = port
    if what == "round abort succeeds":
        world.round_id = _create_round(world)
    try:
        args, env = case(world)
        t0 = time.monotonic()
        proc = run_cli(args, cwd=world.root, env=env)
        seconds = time.monotonic() - t0
    finally:
        busy.close()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    if code == 0:
        return
    # serve's JSON log records may come first; the mistake itself is one plain line.
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith('{"ts"')]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("secagg"), lines[0]
    assert message in lines[0], lines[0]
    if code == EXIT_UNAVAILABLE:
        # Surfaces at once: not 32 s of retries (a generous bound for a loaded machine).
        assert seconds < 20, seconds


def _create_round(w: World) -> str:
    import json

    env = _token_env()
    remote = ["--server", w.plain_target]
    names = []
    for i in range(3):
        name = f"abort-{i}-{time.monotonic_ns()}"
        names.append(name)
        key = IdentityKey().public.hex()
        done = run_cli(["enroll", name, "--public-key", key, *remote], cwd=w.root, env=env)
        assert done.returncode == 0, done.stderr
    made = run_cli(
        [
            "round",
            "create",
            "--job",
            "abort-job",
            "--participants",
            ",".join(names),
            "--dim",
            "4",
            "--stage-timeout",
            "60",
            *remote,
        ],
        cwd=w.root,
        env=env,
    )
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["round_id"])


def test_every_exit_code_is_documented() -> None:
    """docs/operations.md's exit-code table lists every code of service/errors.py's table."""
    doc = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    section = doc.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for _cls, code, _meaning in EXIT_CODES:
        assert f"| {code} |" in section, code
    for code in (0, 3, 4):
        assert f"| {code} |" in section, code


def test_cli_constants_match_the_table() -> None:
    """The CLI's own copies (it loads before grpc, see cli.main) equal service/errors.py's."""
    from secagg.service import cli, errors

    assert (cli.EXIT_CONFIG, cli.EXIT_ABORTED, cli.EXIT_AUDIT) == (
        errors.EXIT_CONFIG,
        errors.EXIT_ABORTED,
        errors.EXIT_AUDIT,
    )


def test_tls_failures_are_counted_and_logged(world: World) -> None:
    """A refused handshake is counted in ``secagg_tls_handshake_failures_total{reason}`` and
    logged as a JSON line (gRPC reports it only in its own log). Before issue 12 it was
    neither; counters also exported ``*_created`` series that read like counts."""
    import urllib.request

    proc = run_cli(
        ["enroll", "--list", "--server", world.mtls_target, "--ca", str(world.pki / "ca.pem")],
        cwd=world.root,
        env=_token_env(),
    )
    assert proc.returncode == EXIT_UNAVAILABLE
    serving = next(e for e in world.mtls.events() if e["msg"] == "serving")
    url = f"http://127.0.0.1:{serving['metrics_port']}/metrics"
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        if 'reason="PEER_DID_NOT_RETURN_A_CERTIFICATE"' in text or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert 'secagg_tls_handshake_failures_total{reason="PEER_DID_NOT_RETURN_A_CERTIFICATE"}' in text
    assert "_created" not in text
    core = [e for e in world.mtls.events() if e["logger"] == "grpc.core"]
    assert any("Handshake failed" in str(e["msg"]) for e in core), core


def test_default_max_weight_is_one_constant() -> None:
    """The CLI (which loads without numpy) and provisioning use the same default bound."""
    from secagg.quantize import FEDAVG_MAX_WEIGHT
    from secagg.service import cli
    from secagg.service.provision import CkksSpec

    assert cli.DEFAULT_MAX_WEIGHT == FEDAVG_MAX_WEIGHT == CkksSpec(clients=2, dim=2).max_weight
