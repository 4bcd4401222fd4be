"""A loopback secagg server with enrolled sites, for the integration tests."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from secagg.directory import Authority, sign_entry
from secagg.keys import IdentityKey
from secagg.server import StageTimeouts
from secagg.service.admin import AdminClient
from secagg.service.client import Client, Policy
from secagg.service.config import ServerConfig
from secagg.service.coordinator import RoundSpec
from secagg.service.logs import configure
from secagg.service.server import BackgroundServer
from secagg.service.store import Store

configure("warning")

T = TypeVar("T")

FAST = StageTimeouts(
    advertise_keys=20.0, share_keys=10.0, masked_input=1.0, consistency=10.0, unmasking=10.0
)
"""Short input deadline: a site that goes silent costs one second."""


@dataclass
class Federation:
    """A running server (in-memory store), its admin client and enrolled site keys."""

    server: BackgroundServer
    store: Store
    admin: AdminClient
    keys: dict[str, IdentityKey] = field(default_factory=dict)
    authority_key: IdentityKey = field(default_factory=IdentityKey)
    federation: str = "test"

    @property
    def authority(self) -> Authority:
        """The federation authority's public half (the sites' enrolment kits carry it)."""
        return Authority(self.federation, self.authority_key.public)

    def enroll(self, n: int, prefix: str = "site") -> list[str]:
        names = []
        for i in range(1, n + 1):
            name = f"{prefix}-{i}"
            if name not in self.keys:
                self.keys[name] = IdentityKey()
                key = self.keys[name].public
                entry = sign_entry(self.authority_key, self.federation, name, key)
                self.admin.enroll(name, key, entry.encode())
            names.append(name)
        return names

    def round(self, names: Sequence[str], dim: int, **spec: Any) -> bytes:
        spec.setdefault("deadlines", FAST)
        spec.setdefault("job", "test")
        status = self.admin.create_round(RoundSpec(participants=list(names), dim=dim, **spec))
        rid: bytes = status.round_id
        return rid

    def client(self, name: str, **policy: Any) -> Client:
        policy.setdefault("authority", self.authority)
        return Client(
            self.server.target, self.keys[name], policy=Policy(**policy), insecure_no_tls=True
        )


def run_all(fns: Sequence[Callable[[], T]]) -> list[T | BaseException]:
    """Run each function in its own thread; results (or exceptions) in order."""
    out: list[Any] = [None] * len(fns)

    def one(i: int) -> None:
        try:
            out[i] = fns[i]()
        except BaseException as exc:  # reported to the caller
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


@pytest.fixture(scope="module")
def federation() -> Iterator[Federation]:
    token = secrets.token_hex(16)
    store = Store(":memory:")
    server = BackgroundServer(
        ServerConfig(listen="127.0.0.1:0", store=":memory:", admin_token=token), store=store
    ).start()
    admin = AdminClient(server.target, token)
    try:
        yield Federation(server, store, admin)
    finally:
        admin.close()
        server.stop()
        store.close()


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flower-secagg"
"""The Flower example app (examples/flower-secagg)."""


@dataclass
class Kits:
    """The example's federation provisioned on a free loopback port, its server running
    from the server kit (mutual TLS, sites enrolled by provisioning)."""

    root: Path
    server: BackgroundServer

    def site(self, i: int) -> Path:
        return self.root / "sites" / f"site-{i}"

    @property
    def operator(self) -> Path:
        return self.root / "operators" / "flower"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kits]:
    from secagg.service.config import load_config
    from secagg.service.provision import load_federation, provision

    tmp = tmp_path_factory.mktemp("kits")
    port = str(_free_port())
    fed = tmp / "federation.toml"
    fed.write_text((EXAMPLE / "federation.toml").read_text().replace("9443", port))
    provision(load_federation(fed), tmp / "kits")
    cwd = os.getcwd()
    os.chdir(tmp / "kits" / "server")  # server.toml names its files relative to the kit
    try:
        server = BackgroundServer(load_config("server.toml")).start()
    finally:
        os.chdir(cwd)
    try:
        yield Kits(tmp / "kits", server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def warm_dp_kernels() -> None:
    """Compile the DP path's Numba kernels (noise, encode, removal, decode) once, in a tiny
    in-process DP round, before a test whose stage deadlines are seconds: in a clean clone
    the first DP round otherwise compiles them inside its masked-input deadline (measured:
    the 3 s deadline missed while the main suite compiled beside it on 2 cores)."""
    from secagg.simulate import SimulationConfig, simulate

    report = simulate(
        SimulationConfig(clients=4, dim=8, dropout=0.0, dp_epsilon=3.0, dp_rounds=3, dp_clip=1.0)
    )
    assert report["status"] == "completed", report.get("abort")
