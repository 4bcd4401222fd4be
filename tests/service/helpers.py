"""A loopback deployment (server, admin, enrolled identities) and client runners."""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from secagg.directory import Authority, sign_entry
from secagg.keys import IdentityKey
from secagg.messages import SEND_ORDER, Message
from secagg.quantize import encode, unpack
from secagg.server import StageTimeouts
from secagg.service.admin import AdminClient
from secagg.service.client import Client, Policy
from secagg.service.config import ServerConfig
from secagg.service.coordinator import RoundSpec
from secagg.service.serde import JoinedRound
from secagg.service.server import BackgroundServer
from secagg.service.store import Store
from secagg.service.tls import ClientTls, ServerTls

TOKEN = "test-admin-token"


@dataclass
class Outcome:
    result: Any = None
    error: BaseException | None = None


@dataclass
class Deployment:
    """One server plus the identities enrolled in it."""

    store_path: Path | str
    tls: ServerTls | None = None
    client_tls: ClientTls | None = None
    max_chunk_bytes: int = 1 << 20
    config: dict[str, Any] = field(default_factory=dict)
    identities: dict[str, IdentityKey] = field(default_factory=dict)
    server: BackgroundServer | None = None
    admin: AdminClient | None = None
    federation: str = "test-federation"
    authority_key: IdentityKey = field(default_factory=IdentityKey)
    """The federation authority: signs each enrolled site's entry (offline, not the server)."""

    @property
    def authority(self) -> Authority:
        """The authority's public half, as the sites' enrolment kits carry it."""
        return Authority(self.federation, self.authority_key.public)

    def start(self) -> Deployment:
        cfg = ServerConfig(
            listen="127.0.0.1:0",
            store=str(self.store_path),
            admin_token=TOKEN,
            tls=self.tls,
            max_chunk_bytes=self.max_chunk_bytes,
            **self.config,
        )
        self.server = BackgroundServer(cfg).start()
        self.admin = AdminClient(self.target, TOKEN, tls=self.client_tls)
        return self

    def stop(self) -> None:
        if self.admin is not None:
            self.admin.close()
        if self.server is not None:
            self.server.stop()

    @property
    def target(self) -> str:
        assert self.server is not None
        return self.server.target

    @property
    def store(self) -> Store:
        assert self.server is not None and self.server.service is not None
        return self.server.service.store

    def enroll(self, n: int, prefix: str = "c") -> list[str]:
        assert self.admin is not None
        names = []
        for i in range(1, n + 1):
            name = f"{prefix}{i}"
            key = IdentityKey()
            entry = sign_entry(self.authority_key, self.federation, name, key.public)
            self.admin.enroll(name, key.public, entry.encode())
            self.identities[name] = key
            names.append(name)
        return names

    def create(
        self, names: Sequence[str], dim: int, deadlines: StageTimeouts | None = None, **kw: Any
    ) -> bytes:
        assert self.admin is not None
        spec = RoundSpec(
            job=kw.pop("job", secrets.token_hex(4)),
            participants=list(names),
            dim=dim,
            deadlines=deadlines or StageTimeouts.uniform(10.0),
            **kw,
        )
        return bytes(self.admin.create_round(spec).round_id)

    def client(self, name: str, **kw: Any) -> Client:
        kw.setdefault("tls", self.client_tls)
        kw.setdefault("insecure_no_tls", kw["tls"] is None)
        policy = kw.pop("policy", None) or Policy(allow_insecure_plaintext=True)
        if policy.authority is None and policy.pinned_directory is None:
            policy = replace(policy, authority=self.authority)  # the kit's authority.pub
        return Client(self.target, self.identities[name], policy=policy, **kw)


def run_threads(jobs: dict[str, Callable[[], Any]]) -> dict[str, Outcome]:
    """Run each job in its own thread; collect results and exceptions."""
    out = {k: Outcome() for k in jobs}

    def run(k: str) -> None:
        try:
            out[k].result = jobs[k]()
        except BaseException as exc:
            out[k].error = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def participate(
    d: Deployment,
    name: str,
    round_id: bytes,
    x: np.ndarray[Any, Any],
    *,
    weight: int = 1,
    rounding_key: bytes | None = None,
    on_send: Callable[[Message], bool] | None = None,
) -> Any:
    with d.client(name) as c:
        joined = c.join(round_id)
        return c.participate(joined, x, weight, rounding_key=rounding_key, on_send=on_send)


def silent_from(msg_type: int) -> Callable[[Message], bool]:
    """An ``on_send`` hook: go silent instead of sending message type ``msg_type`` or later."""
    return lambda m: SEND_ORDER[msg_type] > SEND_ORDER[m.TYPE]


def expected_sums(
    joined: JoinedRound,
    xs: dict[int, np.ndarray[Any, Any]],
    keys: dict[int, bytes],
    ids: Sequence[int],
) -> np.ndarray[Any, Any]:
    spec = joined.params.quant
    n = spec.values(joined.params.dim)
    total = np.zeros(n, dtype=np.uint64)
    for cid in ids:
        total += unpack(encode(xs[cid], 1, spec, keys[cid]), spec, n)
    return total


class RawSession:
    """A hand-driven ``Session`` stream: send any frames, read what comes back."""

    def __init__(self, d: Deployment, name: str, round_id: bytes, *, metadata: Any = None) -> None:
        import queue

        import grpc

        from secagg.service._gen import aggregation_pb2, aggregation_pb2_grpc
        from secagg.service.auth import call_metadata
        from secagg.service.servicer import SESSION

        self.pb = aggregation_pb2
        self.channel = grpc.insecure_channel(
            d.target, options=[("grpc.max_send_message_length", -1)]
        )
        stub = aggregation_pb2_grpc.AggregationStub(self.channel)
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        md = metadata or call_metadata(d.identities[name], SESSION, round_id)
        self.call = stub.Session(iter(self.queue.get, None), metadata=md, timeout=30)
        self.queue.put(aggregation_pb2.ClientFrame(hello=aggregation_pb2.Hello(resume_from=0)))

    def send_message(self, seq: int, data: bytes, chunk: int = 1 << 20) -> None:
        from secagg.service.serde import chunk_message

        for c in chunk_message(seq, data, chunk):
            self.queue.put(self.pb.ClientFrame(chunk=c))

    def send_chunk(self, **fields: Any) -> None:
        from secagg.service._gen import common_pb2

        self.queue.put(self.pb.ClientFrame(chunk=common_pb2.Chunk(**fields)))

    def next_frame(self) -> Any:
        return next(self.call)

    def close(self) -> None:
        self.queue.put(None)
        self.call.cancel()
        self.channel.close()


class FlakyRelay:
    """A loopback TCP relay that cuts its first connection after ``cut_after`` upstream bytes."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        import socket

        self.target_port = target_port
        self.cut_after = cut_after
        self.connections = 0
        self.upstream_bytes = 0
        self.downstream_bytes = 0
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            limit = self.cut_after if self.connections == 1 else None
            threading.Thread(
                target=self._pipe, args=(client, upstream, limit, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(upstream, client, None, False), daemon=True
            ).start()

    def _pipe(self, src: Any, dst: Any, limit: int | None, up: bool) -> None:
        import socket

        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) > limit:
                    break
                dst.sendall(data)
                sent += len(data)
                with self._lock:
                    if up:
                        self.upstream_bytes += len(data)
                    else:
                        self.downstream_bytes += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
