"""Provisioning and operator identities (issue 12, items 1 and 3), over real mTLS on loopback.

A federation file becomes a CA, a server kit, an authority, operator and site kits; a real
server starts from its kit's ``server.toml``; SDK clients built with ``Client.from_kit``
run a masked round (mutual TLS, authority-verified directory); every admin action's audit
entry names the operator that made it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from secagg.errors import ConfigurationError, SecAggError
from secagg.keys import IdentityKey
from secagg.quantize import FEDAVG_MAX_WEIGHT
from secagg.server import StageTimeouts
from secagg.service import kit as kf
from secagg.service.admin import AdminClient
from secagg.service.authority import sign_site
from secagg.service.cli import main
from secagg.service.client import Client
from secagg.service.config import load_config
from secagg.service.coordinator import RoundSpec
from secagg.service.errors import AlreadyExists, PermissionDenied, Unauthenticated
from secagg.service.keyfile import read_identity
from secagg.service.provision import add_site, load_federation, provision
from secagg.service.server import BackgroundServer
from secagg.service.tls import ClientTls

from .helpers import run_threads

SITES = ["site-1", "site-2", "site-3", "site-4"]
FAST = StageTimeouts.uniform(20.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _federation_file(tmp: Path, port: int, sites: list[str] = SITES) -> Path:
    lines = [
        'name = "hospitals"',
        f'server = "localhost:{port}"',
        f'listen = "127.0.0.1:{port}"',
        'server_names = ["localhost", "127.0.0.1"]',
        'modes = ["masked"]',
        "",
        "[policy]",
        "min_clients = 3",
        "",
        "[[operators]]",
        'name = "alice"',
        "",
        "[[operators]]",
        'name = "bob"',
    ]
    for s in sites:
        lines += ["", "[[sites]]", f'name = "{s}"']
    path = tmp / "federation.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("fed")
    fed_file = _federation_file(tmp, _free_port())
    out = tmp / "kits"
    provision(load_federation(fed_file), out)
    yield fed_file, out


@pytest.fixture(scope="module")
def server(federation: tuple[Path, Path]) -> Iterator[BackgroundServer]:
    _, out = federation
    cwd = os.getcwd()
    os.chdir(out / "server")  # server.toml names its files relative to the kit
    try:
        cfg = load_config("server.toml")
        srv = BackgroundServer(cfg).start()
    finally:
        os.chdir(cwd)
    yield srv
    srv.stop()


def test_kit_tree_and_secret_modes(federation: tuple[Path, Path]) -> None:
    """Every secret file is 0600, and no kit holds another's secret."""
    _, out = federation
    secrets_ = [
        out / "authority" / "ca.key",
        out / "authority" / "authority.key",
        out / "server" / kf.KEY,
        out / "server" / kf.STORE,
        *(out / "operators" / n / kf.OPERATOR_KEY for n in ("alice", "bob")),
        *(out / "operators" / n / kf.KEY for n in ("alice", "bob")),
        *(out / "sites" / s / kf.IDENTITY for s in SITES),
        *(out / "sites" / s / kf.KEY for s in SITES),
    ]
    for p in secrets_:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for kit in [out / "server", *(out / "sites").iterdir(), *(out / "operators").iterdir()]:
        names = {p.name for p in kit.iterdir()}
        assert "ca.key" not in names and "authority.key" not in names, kit
    site = kf.load_kit(out / "sites" / "site-1", "site")
    assert site.federation == "hospitals" and site.policy["allowed_modes"] == ["masked"]
    assert not (out / "server" / kf.IDENTITY).exists()


def test_masked_round_from_kits_names_the_operator(
    federation: tuple[Path, Path], server: BackgroundServer
) -> None:
    """A masked round end to end: server from its kit, clients from theirs (mTLS with
    certificate-name binding, authority-verified directory); the audit log names operator
    alice for the round she created."""
    _, out = federation
    with AdminClient.from_kit(out / "operators" / "alice") as admin:
        spec = RoundSpec(job="fl", participants=SITES, dim=16, deadlines=FAST)
        rid = bytes(admin.create_round(spec).round_id)
    xs = {s: np.full(16, i + 1, dtype=np.float64) / 8 for i, s in enumerate(SITES)}

    def run(site: str) -> object:
        with Client.from_kit(out / "sites" / site) as c:
            return c.aggregate(rid, xs[site])

    results = run_threads({s: (lambda s=s: run(s)) for s in SITES})
    for s, r in results.items():
        assert r.error is None, (s, r.error)
        np.testing.assert_allclose(r.result.sum, sum(xs.values()), atol=1e-3)  # type: ignore[attr-defined]
    store = server.service.store  # type: ignore[union-attr]
    created = [e for e in store.audit_entries(rid.hex()) if e.kind == "round_created"]
    assert created[0].data["operator"] == "alice"
    enrolled = [e for e in store.audit_entries() if e.kind == "participant_enrolled"]
    assert {e.data["operator"] for e in enrolled} >= {"provision"}


def test_operator_named_in_enrol_revoke_rotate(
    federation: tuple[Path, Path], server: BackgroundServer
) -> None:
    """Add a site later (only its kit is written), enrol it as bob, revoke it, rotate its
    key keeping its name; each audit entry names bob."""
    fed_file, out = federation
    written = add_site(load_federation(fed_file), out, "site-5")
    assert all(p.parent == out / "sites" / "site-5" for p in written)
    kit = out / "sites" / "site-5"
    identity = read_identity(kit / kf.IDENTITY)
    entry = bytes.fromhex((kit / kf.ENTRY).read_text())
    new = IdentityKey()
    new_entry = sign_site(out / "authority" / "authority.key", "site-5", new.public)
    with AdminClient.from_kit(out / "operators" / "bob") as bob:
        bob.enroll("site-5", identity.public, entry)
        bob.revoke("site-5")
        with pytest.raises(SecAggError, match="needs a new one"):
            bob.rotate("site-5", new.public)
        rec = bob.rotate("site-5", new.public, new_entry.encode())
    assert rec.name == "site-5" and rec.revoked_at == 0 and rec.identity_key == new.public
    store = server.service.store  # type: ignore[union-attr]
    assert store.participant("site-5").public_key == new.public  # type: ignore[union-attr]
    assert store.participant_by_key(identity.public) is None
    kinds = {
        e.kind: e.data
        for e in store.audit_entries()
        if e.data.get("name") == "site-5" and e.kind.startswith("participant_")
    }
    assert {k: v["operator"] for k, v in kinds.items()} == {
        "participant_enrolled": "bob",
        "participant_revoked": "bob",
        "participant_rotated": "bob",
    }
    assert kinds["participant_rotated"]["old_identity_key"] == identity.public.hex()
    store.verify_audit()


def test_cli_enroll_with_operator_kit(
    federation: tuple[Path, Path], server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`secagg enroll --operator-kit` talks to the kit's server (no --server needed),
    signed as that operator; `secagg audit` prints the operator."""
    fed_file, out = federation
    add_site(load_federation(fed_file), out, "site-7")
    kit = out / "sites" / "site-7"
    rc = main(
        [
            "enroll",
            "site-7",
            "--public-key",
            str(kit / f"{kf.IDENTITY}.pub"),
            "--entry",
            str(kit / kf.ENTRY),
            "--operator-kit",
            str(out / "operators" / "bob"),
        ]
    )
    assert rc == 0 and '"site-7"' in capsys.readouterr().out
    store = server.service.store  # type: ignore[union-attr]
    last = store.audit_entries()[-1]
    assert last.kind == "participant_enrolled" and last.data["operator"] == "bob"
    assert main(["audit", "--store", str(out / "server" / kf.STORE)]) == 0
    assert "participant_enrolled name=site-7 operator=bob" in capsys.readouterr().out


def test_provision_never_overwrites(federation: tuple[Path, Path]) -> None:
    """A second add of the same site, or a kit dir in the way, is a one-line typed error
    naming the path; rerunning the file writes only kits that are new."""
    fed_file, out = federation
    with pytest.raises(AlreadyExists, match=r"sites/site-1 exists"):
        add_site(load_federation(fed_file), out, "site-1")
    before = sorted(p.stat().st_mtime_ns for p in (out / "sites" / "site-1").iterdir())
    fed = load_federation(_federation_file(fed_file.parent, 1, [*SITES, "site-6"]))
    fed = dataclasses.replace(fed, server=load_federation(fed_file).server)
    written = provision(fed, out)
    assert written and all(out / "sites" / "site-6" in p.parents for p in written)
    assert sorted(p.stat().st_mtime_ns for p in (out / "sites" / "site-1").iterdir()) == before


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 65, "sp ace"])
def test_site_names_cannot_escape_the_kits_directory(
    federation: tuple[Path, Path], name: str
) -> None:
    """Attack (or slip): a site named ``../escape`` would write its kit, and its secret
    key, outside the kits directory. Names are refused before anything is written."""
    fed_file, out = federation
    with pytest.raises(ConfigurationError, match="site name"):
        add_site(load_federation(fed_file), out, name)
    assert not (out / "escape").exists() and not (out / "sites" / "a").exists()


def test_admin_refuses_unknown_revoked_or_misnamed_operators(
    federation: tuple[Path, Path], server: BackgroundServer, tmp_path: Path
) -> None:
    """Attack: an admin call by a key the store does not list, by a revoked operator, or by
    alice's key claiming to be bob (so the audit log would blame bob). Before per-operator
    credentials the server had no way to tell operators apart."""
    _, out = federation
    alice = AdminClient.from_kit(out / "operators" / "alice")
    k = kf.load_kit(out / "operators" / "alice")
    ctls = ClientTls(ca=k.path(kf.CA), cert=k.path(kf.CERT), key=k.path(kf.KEY))
    key = read_identity(k.path(kf.OPERATOR_KEY))
    mallory = AdminClient(k.server, tls=ctls, operator=("mallory", IdentityKey()))
    with mallory as m, pytest.raises(Unauthenticated, match="not registered"):
        m.participants()
    with (
        AdminClient(k.server, tls=ctls, operator=("bob", key)) as m,
        pytest.raises(PermissionDenied, match="belongs to 'alice'"),
    ):
        m.participants()
    # No shared token is configured: a bearer token is refused outright.
    with (
        AdminClient(k.server, "guess", tls=ctls) as m,
        pytest.raises(PermissionDenied, match="disabled"),
    ):
        m.participants()
    assert alice.participants()
    store = server.service.store  # type: ignore[union-attr]
    store.add_operator("carol", (carol := IdentityKey()).public)
    # carol's calls come with alice's certificate: the CN binding refuses them.
    with (
        AdminClient(k.server, tls=ctls, operator=("carol", carol)) as m,
        pytest.raises(PermissionDenied, match="not issued to operator 'carol'"),
    ):
        m.participants()
    store.revoke_operator("alice")
    with pytest.raises(PermissionDenied, match="alice' is revoked"):
        alice.participants()
    alice.close()
    revoked = [e for e in store.audit_entries() if e.kind == "operator_revoked"]
    assert revoked[-1].data == {"name": "alice", "operator": "local"}


def test_cli_provision_operator_and_site_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`secagg provision`, `--add-site` (a taken name: one typed line naming it),
    `secagg operator list|revoke` and `secagg site rotate` on the server kit's store."""
    fed = _federation_file(tmp_path, 50051, SITES[:3])
    out = tmp_path / "kits"
    assert main(["provision", str(fed), "--out", str(out)]) == 0
    assert main(["provision", str(fed), "--out", str(out), "--add-site", "site-1"]) == 1
    err = capsys.readouterr().err
    assert "AlreadyExists" in err and "site-1" in err and len(err.strip().splitlines()) == 1
    assert main(["provision", str(fed), "--out", str(out), "--add-site", "site-9"]) == 0
    store = str(out / "server" / kf.STORE)
    assert main(["operator", "list", "--store", store]) == 0
    assert "alice" in capsys.readouterr().out
    assert main(["operator", "revoke", "bob", "--store", store]) == 0
    new = tmp_path / "new.key"
    assert main(["keygen", "--out", str(new)]) == 0
    entry = tmp_path / "entry.hex"
    auth_key = str(out / "authority" / "authority.key")
    assert (
        main(
            [
                "authority",
                "sign",
                "site-1",
                "--key",
                auth_key,
                "--public-key",
                str(new),
                "--out",
                str(entry),
            ]
        )
        == 0
    )
    capsys.readouterr()
    rc = main(
        [
            "site",
            "rotate",
            "site-1",
            "--public-key",
            str(new),
            "--entry",
            str(entry),
            "--store",
            store,
        ]
    )
    assert rc == 0 and '"site-1"' in capsys.readouterr().out


def test_key_holder_kits_run_a_hybrid_round(tmp_path: Path) -> None:
    """Only key holders' kits hold the CKKS secret (0600, each with its own fresh ledger);
    the server and operator kits hold the keyless server context; a hybrid round runs
    from the kits, the key holders' decryptions counted in their kit's ledger."""
    port = _free_port()
    fed_file = _federation_file(tmp_path, port, [])
    text = fed_file.read_text().replace('modes = ["masked"]', 'modes = ["masked", "hybrid"]')
    holders = ["kh-1", "kh-2", "kh-3"]
    text += "".join(f'\n[[sites]]\nname = "{h}"\nkey_holder = true\n' for h in holders)
    text += '\n[[sites]]\nname = "plain"\n\n[ckks]\nclients = 3\ndim = 16\nmode = "hybrid"\n'
    fed_file.write_text(text)
    out = tmp_path / "kits"
    provision(load_federation(fed_file), out)
    secrets_ = [out / "sites" / h / kf.CKKS_SECRET for h in holders]
    for p in secrets_:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(f"{p}.ledger").stat().st_mode) == 0o600
    assert len({p.read_bytes() for p in secrets_}) == 1
    assert not (out / "sites" / "plain" / kf.CKKS_SECRET).exists()
    assert not list((out / "server").glob("*ckks-secret*"))
    server_ctx = (out / "operators" / "alice" / kf.CKKS_SERVER).read_bytes()
    assert server_ctx == (out / "server" / kf.CKKS_SERVER).read_bytes()
    cwd = os.getcwd()
    os.chdir(out / "server")
    try:
        srv = BackgroundServer(load_config("server.toml")).start()
    finally:
        os.chdir(cwd)
    try:
        with AdminClient.from_kit(out / "operators" / "alice") as admin:
            spec = RoundSpec(
                job="he",
                participants=holders,
                dim=16,
                mode="hybrid",
                max_weight=FEDAVG_MAX_WEIGHT,  # [ckks] max_weight's default (issue 12)
                deadlines=FAST,
                he_context=server_ctx,
            )
            rid = bytes(admin.create_round(spec).round_id)

        def run(site: str) -> object:
            with Client.from_kit(out / "sites" / site) as c:
                return c.aggregate(rid, np.ones(16))

        results = run_threads({h: (lambda h=h: run(h)) for h in holders})
        for h, r in results.items():
            assert r.error is None, (h, r.error)
            np.testing.assert_allclose(r.result.sum, np.full(16, 3.0), atol=1e-2)  # type: ignore[attr-defined]
    finally:
        srv.stop()
    spent = [json.loads(Path(f"{p}.ledger").read_text())["spent"] for p in secrets_]
    assert all(s >= 1 for s in spent)
    # A key holder added later gets the same secret and a ledger of its own at zero.
    fed_file.write_text(fed_file.read_text() + '\n[[sites]]\nname = "kh-4"\nkey_holder = true\n')
    provision(load_federation(fed_file), out)
    late = out / "sites" / "kh-4" / kf.CKKS_SECRET
    assert late.read_bytes() == secrets_[0].read_bytes()
    assert stat.S_IMODE(late.stat().st_mode) == 0o600
    assert json.loads(Path(f"{late}.ledger").read_text())["spent"] == 0
