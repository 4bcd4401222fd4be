"""``secagg provision``: a whole federation's startup kits from one federation file.

From a TOML file naming the federation, the server address, the sites (which of them hold
the CKKS key), the operators, the client policy and the modes, :func:`provision` writes::

    OUT/authority/   offline secrets: the CA key, the federation authority key
    OUT/server/      server.toml for ``secagg serve --config``, TLS key and certificate,
                     the client CA, and a store with the operators and sites enrolled
    OUT/operators/NAME/  an operator's Ed25519 key and mTLS certificate
    OUT/sites/NAME/  a site's identity key, mTLS certificate, CA, server address,
                     authority.pub, its signed directory entry, policy, and for key
                     holders the CKKS secret context (with a fresh decryption ledger)

Running it again with more sites or operators in the file (or :func:`add_site`) writes only
the new kits, signed by the same CA and authority. No file is ever overwritten: every
write is ``O_EXCL`` and an existing file is a one-line :class:`AlreadyExists` naming it.
Every secret file is mode 0600 (docs/operations.md, "Provisioning").
"""

from __future__ import annotations

import os
import shutil
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from secagg import ckks
from secagg.errors import ConfigurationError
from secagg.he_params import select_params
from secagg.keys import IdentityKey
from secagg.quantize import FEDAVG_MAX_WEIGHT
from secagg.service import kit as kf
from secagg.service.authority import init_authority, load_authority, sign_site
from secagg.service.errors import AlreadyExists
from secagg.service.keyfile import read_identity, write_ckks_contexts, write_identity
from secagg.service.pki import DEFAULT_DAYS, Issued, issue, make_ca
from secagg.service.store import Store

__all__ = [
    "CkksSpec",
    "Federation",
    "SiteSpec",
    "add_operator_kit",
    "add_site",
    "check_kit_name",
    "kit_public_key",
    "load_federation",
    "provision",
]

PROVISION_OPERATOR = "provision"
"""Operator named in the audit entries of the store ``provision`` creates."""
POLICY_KEYS = frozenset(
    {
        "expected_job",
        "expected_dim",
        "min_clients",
        "min_threshold",
        "min_threshold_fraction",
        "min_contributors",
        "max_weight",
    }
)
"""Fields of :class:`secagg.service.client.Policy` a federation file may set."""
MODES = frozenset({"masked", "hybrid", "ckks"})


@dataclass(frozen=True)
class SiteSpec:
    name: str
    key_holder: bool = False


@dataclass(frozen=True)
class CkksSpec:
    """The CKKS key (``secagg keygen --ckks``) shared by the key holders."""

    clients: int
    dim: int
    mode: Literal["ckks", "hybrid"] = "hybrid"
    bits: int = 16
    max_weight: int = FEDAVG_MAX_WEIGHT  # what `round create` assumes; fedavg weights fit
    epoch: int = 0
    decryption_budget: int = ckks.DEFAULT_DECRYPTION_BUDGET


@dataclass(frozen=True)
class Federation:
    """A parsed federation file (see :func:`load_federation`)."""

    name: str
    server: str
    listen: str
    server_names: tuple[str, ...]
    sites: tuple[SiteSpec, ...]
    operators: tuple[str, ...]
    modes: tuple[str, ...] = ("masked", "hybrid")
    policy: Mapping[str, Any] = field(default_factory=dict)
    ckks: CkksSpec | None = None
    cert_days: int = DEFAULT_DAYS

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name == name:
                return s
        return SiteSpec(name)


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_kit_name(name: str, what: str = "site") -> str:
    """A site or operator name that is safe as a directory name and a certificate CN:
    1..64 of ``[A-Za-z0-9._-]``, not starting with a dot (no ``..``, no ``/``)."""
    if not 1 <= len(name) <= 64 or not set(name) <= _NAME_CHARS or name.startswith("."):
        raise ConfigurationError(
            f"{what} name {name!r}: use 1..64 letters, digits, '.', '_' or '-', "
            "not starting with '.'"
        )
    return name


def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def load_federation(path: str | Path) -> Federation:
    """Parse a federation file; every mistake is one :class:`ConfigurationError` line."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read federation file {p}: {exc}") from None
    known = {"name", "server", "listen", "server_names", "sites", "operators", "modes"}
    unknown = set(doc) - known - {"policy", "ckks", "cert_days"}
    if unknown:
        raise ConfigurationError(f"{p}: unknown keys {sorted(unknown)}")
    try:
        name, server = str(doc["name"]), str(doc["server"])
    except KeyError as exc:
        raise ConfigurationError(f"{p}: {exc.args[0]!r} is required") from None
    try:
        sites = tuple(
            SiteSpec(check_kit_name(str(s["name"])), bool(s.get("key_holder", False)))
            for s in doc.get("sites", [])
        )
        operators = tuple(
            check_kit_name(str(o["name"]), "operator") for o in doc.get("operators", [])
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigurationError(
            f"{p}: every [[sites]] and [[operators]] needs a name ({exc})"
        ) from None
    names = [s.name for s in sites]
    if len(set(names)) != len(names) or len(set(operators)) != len(operators):
        raise ConfigurationError(f"{p}: a site or operator is named twice")
    modes = tuple(str(m) for m in doc.get("modes", ["masked", "hybrid"]))
    if not set(modes) <= MODES:
        raise ConfigurationError(f"{p}: modes must be among {sorted(MODES)}, got {list(modes)}")
    policy = dict(doc.get("policy", {}))
    if set(policy) - POLICY_KEYS:
        raise ConfigurationError(f"{p}: unknown policy keys {sorted(set(policy) - POLICY_KEYS)}")
    spec = None
    if "ckks" in doc:
        try:
            spec = CkksSpec(**doc["ckks"])
        except TypeError as exc:
            raise ConfigurationError(f"{p}: bad [ckks] table: {exc}") from None
        if spec.mode not in ("ckks", "hybrid"):
            raise ConfigurationError(f"{p}: [ckks] mode must be ckks or hybrid, not {spec.mode!r}")
    if any(s.key_holder for s in sites) and spec is None:
        raise ConfigurationError(f"{p}: key holders need a [ckks] table (clients, dim)")
    port = server.rsplit(":", 1)[1] if ":" in server else "50051"
    return Federation(
        name=name,
        server=server,
        listen=str(doc.get("listen", f"0.0.0.0:{port}")),
        server_names=tuple(doc.get("server_names", [_host(server)])),
        sites=sites,
        operators=operators,
        modes=modes,
        policy=policy,
        ckks=spec,
        cert_days=int(doc.get("cert_days", DEFAULT_DAYS)),
    )


# -- writing, never overwriting ------------------------------------------------------------


def _new_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise AlreadyExists(f"{path} exists: provisioning never overwrites a kit") from None
    return path


def _write(path: Path, data: bytes | str, *, secret: bool = False) -> Path:
    mode = 0o600 if secret else 0o644
    raw = data.encode() if isinstance(data, str) else data
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise AlreadyExists(f"{path} exists: provisioning never overwrites a file") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(raw)
    return path


def _copy(src: Path, dst: Path, *, secret: bool = False) -> Path:
    return _write(dst, src.read_bytes(), secret=secret)


def _manifest(fed: Federation, kind: str, name: str, **extra: Any) -> str:
    doc: dict[str, Any] = {
        "format": kf.KIT_FORMAT,
        "version": kf.KIT_VERSION,
        "kind": kind,
        "federation": fed.name,
        "name": name,
        "server": fed.server,
        **extra,
    }
    return kf.toml_text(doc, "written by `secagg provision`; see docs/operations.md")


class _Authority:
    """The offline directory: CA and federation authority (made once, then reused)."""

    def __init__(self, fed: Federation, out: Path) -> None:
        self.fed = fed
        self.dir = out / "authority"
        self.ca_key, self.ca_cert = self.dir / "ca.key", self.dir / kf.CA
        self.key, self.pub = self.dir / "authority.key", self.dir / kf.AUTHORITY

    def exists(self) -> bool:
        return self.pub.exists()

    def create(self) -> list[Path]:
        _new_dir(self.dir)
        ca = make_ca(self.fed.name, days=self.fed.cert_days)
        files = [_write(self.ca_key, ca.key_pem, secret=True), _write(self.ca_cert, ca.cert_pem)]
        init_authority(self.dir, self.fed.name)
        return [*files, self.key, self.pub]

    def ca(self) -> Issued:
        if not self.exists():
            raise ConfigurationError(f"{self.dir} has no authority: run `secagg provision` first")
        federation = load_authority(self.pub).federation
        if federation != self.fed.name:
            raise ConfigurationError(
                f"{self.pub} is the authority of federation {federation!r}, not {self.fed.name!r}"
            )
        return Issued(self.ca_key.read_bytes(), self.ca_cert.read_bytes())

    def tls(self, kit: Path, cn: str, server_names: Sequence[str] = ()) -> list[Path]:
        pair = issue(self.ca(), cn, server_names=server_names, days=self.fed.cert_days)
        return [
            _copy(self.ca_cert, kit / kf.CA),
            _write(kit / kf.CERT, pair.cert_pem),
            _write(kit / kf.KEY, pair.key_pem, secret=True),
        ]


def _fresh_kit(
    build: Callable[[Path], tuple[list[Path], IdentityKey]], kit: Path
) -> tuple[list[Path], IdentityKey]:
    """Make directory ``kit`` (refusing an existing one) and fill it; a failure part-way
    removes the directory this call made, so a rerun does not skip a broken kit."""
    _new_dir(kit)
    try:
        return build(kit)
    except BaseException:
        shutil.rmtree(kit, ignore_errors=True)
        raise


def _site_kit(auth: _Authority, out: Path, site: SiteSpec) -> tuple[list[Path], IdentityKey]:
    check_kit_name(site.name)
    return _fresh_kit(lambda kit: _fill_site(auth, out, kit, site), out / "sites" / site.name)


def _fill_site(
    auth: _Authority, out: Path, kit: Path, site: SiteSpec
) -> tuple[list[Path], IdentityKey]:
    fed = auth.fed
    identity = write_identity(kit / kf.IDENTITY)
    entry = sign_site(auth.key, site.name, identity.public)
    files = [kit / kf.IDENTITY, kit / f"{kf.IDENTITY}.pub", *auth.tls(kit, site.name)]
    files.append(_copy(auth.pub, kit / kf.AUTHORITY))
    files.append(_write(kit / kf.ENTRY, entry.encode().hex() + "\n"))
    if site.key_holder:
        files += _ckks_secret(fed, out, kit)
    policy = {"allowed_modes": list(fed.modes), **fed.policy}
    files.append(
        _write(
            kit / kf.MANIFEST,
            _manifest(fed, "site", site.name, key_holder=site.key_holder, policy=policy),
        )
    )
    return files, identity


def _ckks_secret(fed: Federation, out: Path, kit: Path) -> list[Path]:
    """The key holders' CKKS context: made by the keygen code path for the first key holder,
    copied (with a fresh ledger of its own) for every later one."""
    assert fed.ckks is not None
    spec = fed.ckks
    he = select_params(spec.clients, spec.bits, spec.dim, spec.mode, spec.max_weight)
    holders = [p for p in sorted((out / "sites").glob(f"*/{kf.CKKS_SECRET}")) if p.parent != kit]
    secret = kit / kf.CKKS_SECRET
    shared = out / "server" / kf.CKKS_SERVER
    if not holders and shared.exists():
        raise ConfigurationError(
            f"{shared} exists but no key holder kit under {out / 'sites'} holds its secret: "
            "a new key holder needs a copy of the federation's CKKS secret context"
        )
    if not holders:
        secret, public = write_ckks_contexts(
            kit / "ckks", he, epoch=spec.epoch, decryption_budget=spec.decryption_budget
        )
        files = [secret, ckks.ledger_path_for(secret)]
        if not shared.exists():
            (out / "server").mkdir(parents=True, exist_ok=True)
            files.append(_copy(public, shared))
        public.unlink()  # the server's copy lives in the server kit, not in a site's
        return files
    _copy(holders[0], secret, secret=True)
    epoch = ckks.open_secret_context(secret, he).epoch
    ledger = ckks.ledger_path_for(secret)
    if ledger.exists():
        raise AlreadyExists(f"{ledger} exists: provisioning never overwrites a file")
    ckks.FileLedger(ledger).reset(epoch)
    return [secret, ledger]


def _operator_kit(auth: _Authority, out: Path, name: str) -> tuple[list[Path], IdentityKey]:
    check_kit_name(name, "operator")
    return _fresh_kit(lambda kit: _fill_operator(auth, out, kit, name), out / "operators" / name)


def _fill_operator(
    auth: _Authority, out: Path, kit: Path, name: str
) -> tuple[list[Path], IdentityKey]:
    fed = auth.fed
    key = write_identity(kit / kf.OPERATOR_KEY)
    files = [kit / kf.OPERATOR_KEY, kit / f"{kf.OPERATOR_KEY}.pub", *auth.tls(kit, name)]
    shared = out / "server" / kf.CKKS_SERVER
    if shared.exists():
        files.append(_copy(shared, kit / kf.CKKS_SERVER))
    files.append(_write(kit / kf.MANIFEST, _manifest(fed, "operator", name)))
    return files, key


def _server_kit(auth: _Authority, out: Path) -> list[Path]:
    fed = auth.fed
    kit = out / "server"
    kit.mkdir(exist_ok=True)  # a CKKS context may already sit there
    if (kit / kf.MANIFEST).exists():
        raise AlreadyExists(f"{kit / kf.MANIFEST} exists: provisioning never overwrites a kit")
    files = auth.tls(kit, fed.server_names[0], fed.server_names)
    config = {
        "listen": fed.listen,
        "store": kf.STORE,
        "tls": {"cert": kf.CERT, "key": kf.KEY, "client_ca": kf.CA},
    }
    head = "written by `secagg provision`: run `secagg serve --config server.toml` here"
    files.append(_write(kit / kf.SERVER_CONFIG, kf.toml_text(config, head)))
    files.append(_copy(auth.pub, kit / kf.AUTHORITY))
    files.append(_write(kit / kf.MANIFEST, _manifest(fed, "server", "server")))
    return files


def provision(fed: Federation, out: str | Path) -> list[Path]:
    """Write every kit of ``fed`` that ``out`` does not hold yet; return the files written.

    The first run makes the authority directory, the server kit (its store enrols every
    operator and site, audited as operator ``provision``) and every kit. Later runs reuse
    the CA and authority and write only the kits of new sites and operators; enrol those
    on the running server with an operator kit (``secagg enroll --operator-kit``)."""
    root = Path(out)
    auth = _Authority(fed, root)
    first = not auth.exists()
    files: list[Path] = auth.create() if first else []
    auth.ca()  # the federation name must match on reruns
    sites, operators = [], []
    for site in fed.sites:
        if not (root / "sites" / site.name).exists():
            written, identity = _site_kit(auth, root, site)
            files += written
            sites.append((site.name, identity))
    for name in fed.operators:
        if not (root / "operators" / name).exists():
            written, key = _operator_kit(auth, root, name)
            files += written
            operators.append((name, key))
    if first:
        files += _server_kit(auth, root)
        store = Store(root / "server" / kf.STORE)
        try:
            for name, key in operators:
                store.add_operator(name, key.public, operator=PROVISION_OPERATOR)
            for name, identity in sites:
                entry = (root / "sites" / name / kf.ENTRY).read_text().strip()
                store.enroll(
                    name, identity.public, bytes.fromhex(entry), operator=PROVISION_OPERATOR
                )
        finally:
            store.close()
        os.chmod(root / "server" / kf.STORE, 0o600)
        files.append(root / "server" / kf.STORE)
    return files


def add_site(fed: Federation, out: str | Path, name: str) -> list[Path]:
    """Write the kit of one more site (``key_holder`` as in the file, if listed there)."""
    root = Path(out)
    auth = _Authority(fed, root)
    auth.ca()
    files, _ = _site_kit(auth, root, fed.site(name))
    return files


def add_operator_kit(fed: Federation, out: str | Path, name: str) -> list[Path]:
    """Write the kit of one more operator (add its key with ``secagg operator add``)."""
    auth = _Authority(fed, Path(out))
    auth.ca()
    files, _ = _operator_kit(auth, Path(out), name)
    return files


def kit_public_key(kit_dir: str | Path) -> bytes:
    """The public identity (site) or operator key of a kit."""
    k = kf.load_kit(kit_dir)
    fname = kf.IDENTITY if k.kind == "site" else kf.OPERATOR_KEY
    return read_identity(k.path(fname)).public
