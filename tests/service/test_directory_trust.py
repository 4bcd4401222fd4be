"""The directory is authentic by default (issue 11, item 3), over real gRPC on loopback.

The server is the adversary: here it adds participants to its own store (which it fully
controls) and serves them. An honest client with the federation authority's public key
(its enrolment kit) refuses the round before it sends anything. Each test failed before
the fix: the client trusted any directory the server served.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from secagg.directory import sign_entry
from secagg.errors import ConfigurationError
from secagg.keys import IdentityKey
from secagg.server import StageTimeouts
from secagg.service.authority import load_authority
from secagg.service.cli import main
from secagg.service.client import Client, Policy
from secagg.service.errors import PolicyRefused
from secagg.service.store import Store
from secagg.service.trust import NO_TRUST_ANCHOR

from .helpers import Deployment

FAST = StageTimeouts.uniform(5.0)


def _server_adds(d: Deployment, name: str, key: bytes, entry: bytes = b"") -> None:
    """The malicious server writes a participant (and any entry bytes) into its own store."""
    assert d.admin is not None
    d.admin.enroll(name, key)
    if entry:
        with d.store._tx() as db:
            db.execute("INSERT OR REPLACE INTO directory_entries VALUES (?, ?)", (name, entry))


def test_server_invented_participant_is_refused(deployment: Deployment) -> None:
    """Attack: the server adds a participant it controls (no authority signature) to reach
    the threshold with its own keys. Before the fix every client joined."""
    names = deployment.enroll(3)
    _server_adds(deployment, "sybil", IdentityKey().public)
    rid = deployment.create([*names, "sybil"], 10, FAST)
    with pytest.raises(PolicyRefused, match=r"'sybil' .* carries no authority signature"):
        deployment.client(names[0]).join(rid)


def test_server_cannot_reuse_a_real_sites_entry_for_its_key(deployment: Deployment) -> None:
    """Attack: the server serves a genuine signed entry (site c1's) for a key of its own,
    under c1's name or another. Before the fix: joined."""
    names = deployment.enroll(3)
    real = deployment.store.signed_entry(names[2])
    _server_adds(deployment, "sybil", IdentityKey().public, real)
    rid = deployment.create([*names[:2], "sybil"], 10, FAST)
    with pytest.raises(PolicyRefused, match="another site or key"):
        deployment.client(names[0]).join(rid)


def test_entry_signed_by_another_authority_is_refused(deployment: Deployment) -> None:
    """Attack: the server signs entries with an authority key of its own making."""
    names = deployment.enroll(2)
    fake, key = IdentityKey(), IdentityKey().public
    entry = sign_entry(fake, deployment.federation, "sybil", key).encode()
    _server_adds(deployment, "sybil", key, entry)
    rid = deployment.create([*names, "sybil"], 10, FAST)
    with pytest.raises(PolicyRefused, match="not signed by the federation authority"):
        deployment.client(names[0]).join(rid)


def test_directory_listing_a_real_site_twice_is_refused(deployment: Deployment) -> None:
    """Attack: the server serves one genuine, signed site under two client ids (inflating
    n with a seat nobody will fill). Before the fix: joined."""
    names = deployment.enroll(3)
    rid = deployment.create(names, 10, FAST)
    c = deployment.client(names[0])
    joined = c.join(rid)
    doubled = replace(
        joined,
        directory={**joined.directory, 4: joined.directory[3]},
        names={**joined.names, 4: joined.names[3]},
        signed_entries={**joined.signed_entries, 4: joined.signed_entries[3]},
    )
    with pytest.raises(PolicyRefused, match="more than once"):
        c.policy.check(doubled, c.identity.public)
    c.close()


def test_client_without_a_trust_anchor_refuses(deployment: Deployment) -> None:
    """A client given neither the authority key nor a pinned directory refuses every round
    (before the fix it trusted the served directory); the opt-in is explicit."""
    names = deployment.enroll(3)
    rid = deployment.create(names, 10, FAST)
    ident = deployment.identities[names[0]]
    with Client(deployment.target, ident, insecure_no_tls=True) as c:
        with pytest.raises(PolicyRefused) as err:
            c.join(rid)
        assert str(err.value) == NO_TRUST_ANCHOR
    opt_in = Policy(trust_server_directory=True)
    with Client(deployment.target, ident, insecure_no_tls=True, policy=opt_in) as c:
        assert c.join(rid).client_id == 1


def test_client_refuses_plaintext_without_the_opt_in() -> None:
    """TLS by default: before the fix ``Client(target, key)`` silently connected in the clear."""
    with pytest.raises(ConfigurationError, match="insecure_no_tls"):
        Client("127.0.0.1:1", IdentityKey())


def test_admin_client_refuses_plaintext_to_a_remote_server() -> None:
    """TLS by default: before the fix the admin token went to any host in the clear."""
    from secagg.service.admin import AdminClient

    with pytest.raises(ConfigurationError, match="admin token"):
        AdminClient("agg.example.org:8443", "token")
    AdminClient("agg.example.org:8443", "token", insecure_no_tls=True).close()
    AdminClient("127.0.0.1:1", "token").close()  # loopback: tests, simulations


def test_authority_cli_init_sign_enroll(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``secagg authority init`` / ``sign`` and ``secagg enroll --entry``: the private key
    is 0600 and stays out of the store; the entry verifies under the kit's authority.pub."""
    out = tmp_path / "authority"
    assert main(["authority", "init", "--out", str(out), "--federation", "fed-X"]) == 0
    assert stat.S_IMODE(os.stat(out / "authority.key").st_mode) == 0o600
    assert json.loads((out / "authority.pub").read_text())["federation"] == "fed-X"
    site = IdentityKey()
    entry_file = tmp_path / "site-1.entry"
    args = ["authority", "sign", "site-1", "--key", str(out / "authority.key")]
    args += ["--public-key", site.public.hex(), "--out", str(entry_file), "--not-after", "0"]
    assert main(args) == 0
    store = tmp_path / "s.db"
    enroll = ["enroll", "site-1", "--public-key", site.public.hex(), "--store", str(store)]
    assert main([*enroll, "--entry", str(entry_file)]) == 0
    s = Store(store)
    try:
        blob = s.signed_entry("site-1")
    finally:
        s.close()
    assert blob.hex() == entry_file.read_text().strip()
    from secagg.directory import SignedEntry

    authority = load_authority(out / "authority.pub")
    authority.verify(SignedEntry.decode(blob), name="site-1", identity_key=site.public, now=0)
    seed = json.loads((out / "authority.key").read_text())["seed"]
    assert seed not in store.read_bytes().hex()  # the server's store never holds it
    # An entry for another site is refused at enrolment (the operator's slip, not an attack).
    other = ["enroll", "site-2", "--public-key", IdentityKey().public.hex(), "--store", str(store)]
    capsys.readouterr()
    assert main([*other, "--entry", str(entry_file)]) == 2
    assert "vouches for 'site-1'" in capsys.readouterr().err
    # Re-signing (new epoch) replaces the entry of an enrolled site, recorded in the log.
    args[args.index("--not-after") : args.index("--not-after") + 2] = ["--epoch", "2"]
    assert main(args) == 0
    set_entry = ["enroll", "site-1", "--entry", str(entry_file), "--store", str(store)]
    assert main(set_entry) == 0
    s = Store(store)
    try:
        assert SignedEntry.decode(s.signed_entry("site-1")).epoch == 2
        assert [e.kind for e in s.audit_entries()][-1] == "participant_entry_set"
    finally:
        s.close()
