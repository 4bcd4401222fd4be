"""A loopback secagg server with enrolled sites, for the integration tests."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
