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
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from secagg.keys import IdentityKey
from secagg.service.errors import (
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_DENIED,
    EXIT_ERROR,
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
    names: list[str] = field(default_factory=list)

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
        "job status of an unknown job",
        lambda w: (["job", "status", "nope", "--server", w.plain_target], _token_env()),
        EXIT_NOT_FOUND,
        "no job 'nope'",
    ),
    (
        "job abort of an unknown job",
        lambda w: (["job", "abort", "nope", "--server", w.plain_target], _token_env()),
        EXIT_NOT_FOUND,
        "no job 'nope'",
    ),
    (
        "job create --rounds 0",
        lambda w: (
            ["job", "create", "j", "--participants", "a", "--dim", "4", "--rounds", "0"],
            _token_env(),
        ),
        EXIT_CONFIG,
        "--rounds: must be a whole number >= 1, got '0'",
    ),
    (
        "job create --every abc",
        lambda w: (
            ["job", "create", "j", "--participants", "a", "--dim", "4", "--every", "abc"],
            _token_env(),
        ),
        EXIT_CONFIG,
        "--every: must be a number of seconds > 0, got 'abc'",
    ),
    (
        "job create without a name",
        lambda w: (
            ["job", "create", "--participants", "a", "--dim", "4", "--server", w.plain_target],
            _token_env(),
        ),
        EXIT_CONFIG,
        "a job name is required",
    ),
    (
        "job create without --participants",
        lambda w: (["job", "create", "j", "--dim", "4", "--server", w.plain_target], _token_env()),
        EXIT_CONFIG,
        "--participants is required",
    ),
    (
        "job create --dp that is not JSON",
        lambda w: (
            ["job", "create", "j", "--participants", "a", "--dim", "4", "--dp", "eps=1"],
            _token_env(),
        ),
        EXIT_CONFIG,
        "--dp must be a JSON object",
    ),
    (
        "job create of unknown participants",
        lambda w: (
            [
                "job",
                "create",
                "j",
                "--participants",
                "ghost-1,ghost-2,ghost-3",
                "--dim",
                "4",
                "--server",
                w.plain_target,
            ],
            _token_env(),
        ),
        EXIT_NOT_FOUND,
        "participant 'ghost-1' is not enrolled",
    ),
    (
        "job create with a name in use",
        lambda w: (
            [
                "job",
                "create",
                "dup-job",
                "--participants",
                ",".join(w.names),
                "--dim",
                "4",
                "--server",
                w.plain_target,
            ],
            _token_env(),
        ),
        EXIT_ERROR,
        "AlreadyExists: a job named 'dup-job' exists (job names are never reused)",
    ),
    (
        "round create in a job's name",
        lambda w: (
            [
                "round",
                "create",
                "--job",
                "dup-job",
                "--participants",
                ",".join(w.names),
                "--dim",
                "4",
                "--server",
                w.plain_target,
            ],
            _token_env(),
        ),
        EXIT_ERROR,
        "'dup-job' is a job (secagg job create): the server opens its rounds",
    ),
    (
        "serve --kit of a directory that is no kit",
        lambda w: (["serve", "--kit", "no-such-kit"], None),
        EXIT_CONFIG,
        "no-such-kit/kit.toml: cannot read the kit manifest",
    ),
    (
        "serve --kit with --config",
        lambda w: (["serve", "--kit", "no-such-kit", "--config", "server.toml"], None),
        EXIT_CONFIG,
        "give --kit or --config, not both",
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
    if what in ("job create with a name in use", "round create in a job's name"):
        world.names = _job(world, "dup-job")
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


def _enroll(w: World, prefix: str, n: int = 3) -> list[str]:
    env, remote = _token_env(), ["--server", w.plain_target]
    names = []
    for i in range(n):
        name = f"{prefix}-{i}-{time.monotonic_ns()}"
        key = IdentityKey().public.hex()
        done = run_cli(["enroll", name, "--public-key", key, *remote], cwd=w.root, env=env)
        assert done.returncode == 0, done.stderr
        names.append(name)
    return names


def _job(w: World, name: str) -> list[str]:
    """Job ``name`` on the plain server (made once; its participants never come)."""
    import json

    env, remote = _token_env(), ["--server", w.plain_target]
    known = run_cli(["job", "status", name, *remote], cwd=w.root, env=env)
    if known.returncode == 0:
        return list(json.loads(known.stdout)["participants"])
    names = _enroll(w, name)
    made = run_cli(
        ["job", "create", name, "--participants", ",".join(names), "--dim", "4", *remote],
        cwd=w.root,
        env=env,
    )
    assert made.returncode == 0, made.stderr
    return names


def test_job_commands(world: World) -> None:
    """``job create|status|list|abort`` and ``round list`` print JSON; the status of an
    aborted job exits 3, like ``round status`` of an aborted round."""
    import json

    env, remote = _token_env(), ["--server", world.plain_target]
    names = _enroll(world, "cli-job")
    create = [
        "job", "create", "cli-job", "--participants", ",".join(names), "--dim", "4",
        "--rounds", "5", "--every", "3600", "--stage-timeout", "60", "--dp", '{"epsilon": 1}',
        "--threshold", "2",
    ]  # fmt: skip
    made = run_cli([*create, *remote], cwd=world.root, env=env)
    assert made.returncode == 0, made.stderr
    job = json.loads(made.stdout)
    assert (job["name"], job["status"], job["rounds_total"], job["every"]) == (
        "cli-job", "running", 5, 3600.0,
    )  # fmt: skip
    assert job["participants"] == names and job["created_by"] == "admin-token"
    listed = run_cli(["job", "list", *remote], cwd=world.root, env=env)
    assert "cli-job" in [j["name"] for j in json.loads(listed.stdout)]
    deadline = time.monotonic() + 20
    rounds: list[dict[str, object]] = []
    while not rounds and time.monotonic() < deadline:
        out = run_cli(["round", "list", "--job", "cli-job", *remote], cwd=world.root, env=env)
        assert out.returncode == 0, out.stderr
        rounds = json.loads(out.stdout)
    assert len(rounds) == 1
    assert {k: rounds[0][k] for k in ("job", "index", "mode", "status", "survivors")} == {
        "job": "cli-job", "index": 0, "mode": "masked", "status": "running", "survivors": 0,
    }  # fmt: skip
    assert set(rounds[0]) == {
        "round_id", "job", "index", "mode", "status", "stage", "opened_at", "finished_at",
        "survivors",
    }  # fmt: skip
    for action, status in (("pause", "paused"), ("resume", "running")):
        done = run_cli(["job", action, "cli-job", *remote], cwd=world.root, env=env)
        assert done.returncode == 0 and json.loads(done.stdout)["status"] == status, done.stderr
    aborted = run_cli(
        ["job", "abort", "cli-job", "--reason", "done testing", *remote], cwd=world.root, env=env
    )
    assert aborted.returncode == 0, aborted.stderr
    assert json.loads(aborted.stdout)["status"] == "aborted"
    status = run_cli(["job", "status", "cli-job", "--wait", *remote], cwd=world.root, env=env)
    assert status.returncode == 3 and json.loads(status.stdout)["reason"] == "done testing"
    out = run_cli(["round", "list", "--job", "cli-job", *remote], cwd=world.root, env=env)
    assert [r["status"] for r in json.loads(out.stdout)] == ["aborted"]


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
