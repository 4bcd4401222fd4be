"""The gRPC server: wiring (TLS, health, reflection, metrics, access log) and its lifecycle.

:class:`SecAggService` runs on an asyncio loop (``grpc.aio``): one coroutine per stream, so
hundreds of clients cost no thread each; round work runs on a small worker pool.
:func:`serve` is ``secagg serve`` (SIGTERM: stop taking calls, let rounds finish within the
grace period, abort and record the rest). :class:`BackgroundServer` runs one in a thread
(tests, ``secagg simulate --transport grpc``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from secagg.errors import ConfigurationError, StoreError
from secagg.service._gen import admin_pb2, admin_pb2_grpc, aggregation_pb2
from secagg.service.auth import CallVerifier
from secagg.service.config import ServerConfig
from secagg.service.coordinator import Coordinator
from secagg.service.guard import FrameGuard
from secagg.service.logs import StderrCapture, configure, event
from secagg.service.metrics import Metrics
from secagg.service.servicer import AdminServicer, AggregationServicer
from secagg.service.store import Store, WriterLock

__all__ = ["BackgroundServer", "SecAggService", "serve"]

log = logging.getLogger("secagg.service.server")

FRAME_SLACK = 64 * 1024
"""Protobuf framing allowed on top of a chunk's data in one gRPC message."""
SERVICE_NAMES = (
    aggregation_pb2.DESCRIPTOR.services_by_name["Aggregation"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)
SHUTDOWN_REASON = "the server is shutting down"
PARTICIPANT_KEY_HEADER = "secagg-key"
"""The metadata key a participant's signed call names its public key in (service.auth)."""
OPERATOR_HEADER = "secagg-operator"
"""The metadata key an operator's signed admin call names the operator in (hex UTF-8)."""
NAME_CACHE = 4096
"""Participant names the access log keeps in memory (cleared when full)."""
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
"""Reflection v1 (what current grpcurl asks first); same messages as v1alpha on the wire."""


def _reflection_v1(servicer: ReflectionServicer) -> grpc.GenericRpcHandler:
    """Serve ``grpc.reflection.v1`` with the v1alpha servicer: the two protos differ only in
    their package name, so the messages are byte-for-byte the same."""
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": method})


def _caller(details: Any, names: Callable[[str], str | None]) -> str:
    """Who a call claims to be, from its metadata: ``operator:<name>`` (a signed admin call),
    ``admin`` (the shared bearer token), the enrolled participant's name, or ``key:<16 hex>``
    for a key the store does not know. The servicer authenticates the claim; a failed check
    shows in the line's ``code``."""
    md = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
    if OPERATOR_HEADER in md:
        try:
            return f"operator:{bytes.fromhex(md[OPERATOR_HEADER]).decode()}"
        except (ValueError, UnicodeDecodeError):
            return "operator:?"
    if "authorization" in md:
        return "admin"
    key = md.get(PARTICIPANT_KEY_HEADER, "")
    if not key:
        return "anonymous"
    return names(key) or f"key:{key[:16]}"


class AccessLog(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and logs every finished call of our services (method, status, duration)."""

    def __init__(self, metrics: Metrics, names: Callable[[str], str | None]) -> None:
        self._metrics = metrics
        self._names = names

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith("/secagg.v1."):
            return handler
        metrics = self._metrics
        caller = _caller(details, self._names)

        def done(peer: str, t0: float, code: grpc.StatusCode | str, cn: str) -> None:
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            metrics.rpcs.labels(method, name).inc()
            seconds = round(time.monotonic() - t0, 4)
            extra = {"cert_cn": cn} if cn else {}
            event(
                log,
                logging.INFO,
                "rpc",
                method=method,
                code=name,
                caller=caller,
                **extra,
                peer=peer,
                seconds=seconds,
            )

        def failed(context: Any, exc: BaseException) -> grpc.StatusCode | str:
            # A cancelled call may already be gone: do not touch its context then.
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                return "CANCELLED"
            return context.code() or grpc.StatusCode.UNKNOWN

        if handler.unary_unary:
            unary = handler.unary_unary

            async def observed_unary(request: Any, context: Any) -> Any:
                t0, peer, cn = time.monotonic(), context.peer(), _cert_cn(context)
                code: grpc.StatusCode | str = grpc.StatusCode.OK
                try:
                    return await unary(request, context)
                except BaseException as exc:
                    code = failed(context, exc)
                    raise
                finally:
                    done(peer, t0, code, cn)

            return grpc.unary_unary_rpc_method_handler(
                observed_unary, handler.request_deserializer, handler.response_serializer
            )

        def observed_iter(
            call: Callable[[Any, Any], AsyncIterator[Any]],
        ) -> Callable[[Any, Any], AsyncIterator[Any]]:
            """``call`` (server-streaming or bidirectional) with one access-log line."""

            async def observed(arg: Any, context: Any) -> AsyncIterator[Any]:
                t0, peer, cn = time.monotonic(), context.peer(), _cert_cn(context)
                code: grpc.StatusCode | str = grpc.StatusCode.OK
                try:
                    async for item in call(arg, context):
                        yield item
                except BaseException as exc:
                    code = failed(context, exc)
                    raise
                finally:
                    done(peer, t0, code, cn)

            return observed

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                observed_iter(handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            observed_iter(handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )


def _bind_error(listen: str) -> str:
    """Why ``listen`` cannot be bound (gRPC only says that it failed)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - only to name the bind error
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        family, kind, proto, _name, addr = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.bind(addr)
    except (OSError, ValueError, IndexError) as exc:
        return str(getattr(exc, "strerror", None) or exc)
    return "gRPC could not bind it"


def _cert_cn(context: Any) -> str:
    """The client certificate's common name (mutual TLS), or ``""``."""
    try:
        names = context.auth_context().get("x509_common_name") or [b""]
    except Exception:  # a context without TLS state
        return ""
    raw = names[0]
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


class SecAggService:
    """One server: store, rounds, gRPC services. ``await start()``, then ``await stop()``."""

    def __init__(self, config: ServerConfig, *, store: Store | None = None) -> None:
        self.config = config
        self.store = store if store is not None else Store(config.store)
        self._own_store = store is None
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="secagg-round")
        self.coordinator = Coordinator(
            self.store,
            self.metrics,
            self.pool,
            retain_seconds=config.retain_seconds,
            disconnect_grace=config.disconnect_grace,
        )
        self.coordinator.group_engine = config.engine  # sharded rounds (service/sharded.py)
        self.coordinator.ray_workers = config.ray_workers
        self.coordinator.ray_address = config.ray_address
        self.port = 0
        self._server: Any = None
        self._health: Any = None
        self._http: Any = None
        self._lock = WriterLock(self.store.path) if self.store.path != ":memory:" else None
        self._names: dict[str, str] = {}

    @property
    def metrics_port(self) -> int | None:
        """Port of the ``/metrics`` endpoint, once started with one."""
        return None if self._http is None else int(self._http.server_port)

    async def start(self) -> int:
        """Recover the store, bind and start serving; returns the bound port."""
        cfg = self.config
        warnings = cfg.tls.check() if cfg.tls is not None else []
        if self._lock is not None:
            self._lock.acquire()
        try:
            return await self._start(cfg, warnings)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _participant_name(self, key_hex: str) -> str | None:
        """The enrolled name of a key, for the access log (cached: a key keeps its name)."""
        if key_hex in self._names:
            return self._names[key_hex]
        try:
            rec = self.store.participant_by_key(bytes.fromhex(key_hex))
        except (ValueError, StoreError):
            return None
        if rec is None:
            return None
        if len(self._names) >= NAME_CACHE:
            self._names.clear()
        self._names[key_hex] = rec.name
        return rec.name

    async def _start(self, cfg: ServerConfig, warnings: list[str]) -> int:
        self.coordinator.recover()
        self.coordinator.jobs.start_all()  # each running job opens its next round
        limit = cfg.max_chunk_bytes + FRAME_SLACK
        server = grpc.aio.server(
            interceptors=[AccessLog(self.metrics, self._participant_name), FrameGuard()],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        verifier = CallVerifier(self.store, skew=cfg.clock_skew)
        AggregationServicer(self.coordinator, verifier, cfg).register(server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.coordinator, cfg), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflected = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
        reflection.enable_server_reflection(reflected, server)
        server.add_generic_rpc_handlers((_reflection_v1(ReflectionServicer(reflected)),))
        try:
            if cfg.tls is not None:
                self.port = server.add_secure_port(cfg.listen, cfg.tls.credentials())
            else:
                self.port = server.add_insecure_port(cfg.listen)
        except RuntimeError:
            raise ConfigurationError(
                f"cannot listen on {cfg.listen}: {_bind_error(cfg.listen)}"
            ) from None
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.metrics_port is not None:
            try:
                self._http = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_addr)
            except OSError as exc:
                await server.stop(0)
                raise ConfigurationError(
                    f"cannot serve metrics on {cfg.metrics_addr}:{cfg.metrics_port}: {exc.strerror}"
                ) from None
        for text in warnings:
            event(log, logging.WARNING, text)
        operators = sum(1 for o in self.store.operators() if o.revoked_at is None)
        admin_api = cfg.admin_token is not None or operators > 0
        if not admin_api:
            event(
                log,
                logging.WARNING,
                "admin API off: no operator enrolled (secagg provision, secagg operator add) "
                "and no admin token (admin_token_file, --admin-token-file, $SECAGG_ADMIN_TOKEN)",
            )
        event(
            log,
            logging.INFO,
            "serving",
            listen=cfg.listen,
            port=self.port,
            tls=cfg.tls is not None,
            mutual_tls=bool(cfg.tls and cfg.tls.mutual),
            admin_api=admin_api,
            operators=operators,
            metrics_port=self.metrics_port,
            store=cfg.store if self._own_store else self.store.path,
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: refuse new calls, let rounds finish for ``grace`` s, abort the rest."""
        grace = self.config.shutdown_grace if grace is None else grace
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self.coordinator.jobs.stop()  # no job opens another round
        running = [r for r in self.coordinator.runners() if not r.core.done]
        if running and grace > 0:
            waits = [asyncio.ensure_future(r.finished.wait()) for r in running]
            await asyncio.wait(waits, timeout=grace)
            for w in waits:
                w.cancel()
        await self.coordinator.abort_all(SHUTDOWN_REASON)
        await self._server.stop(min(grace, 2.0))
        await self._finish()

    async def crash(self) -> None:
        """Stop at once without recording anything (tests: a killed process)."""
        if self._server is not None:
            await self.coordinator.jobs.stop()
            for r in self.coordinator.runners():
                await r.close()
            await self._server.stop(0)
            await self._finish(close_store=False)
        elif self._lock is not None:
            self._lock.release()

    async def _finish(self, close_store: bool = True) -> None:
        self._server = None
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            self._http.shutdown()
        if self._own_store and close_store:
            self.store.close()
        if self._lock is not None:
            self._lock.release()  # a crash too: the OS drops the lock of a killed process
        event(log, logging.INFO, "stopped", port=self.port)


def serve(config: ServerConfig) -> int:
    """Run a server until SIGTERM or SIGINT (``secagg serve``).

    gRPC's own log lines join the same stream (:class:`StderrCapture`); they are also where
    failed TLS handshakes show, which ``secagg_tls_handshake_failures_total`` counts.
    """
    capture = StderrCapture()
    configure(config.log_level, config.log_format, stream=capture.start())
    try:
        return _serve(config, capture)
    finally:
        capture.stop()


def _serve(config: ServerConfig, capture: StderrCapture) -> int:
    async def main() -> None:
        service = SecAggService(config)
        capture.on_line(service.metrics.count_tls_line)
        await service.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        event(log, logging.INFO, "shutting down", grace=config.shutdown_grace)
        await service.stop()

    asyncio.run(main())
    return 0


class BackgroundServer:
    """A :class:`SecAggService` on its own event loop thread; a context manager."""

    def __init__(self, config: ServerConfig, *, store: Store | None = None) -> None:
        self.config = config
        self._store = store
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._crash = False
        self._grace = 0.0
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.service: SecAggService | None = None
        self._thread = threading.Thread(target=self._run, name="secagg-server", daemon=True)

    @property
    def port(self) -> int:
        assert self.service is not None
        return self.service.port

    @property
    def target(self) -> str:
        host = "localhost" if self.config.tls is not None else "127.0.0.1"
        return f"{host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro: Awaitable[Any]) -> Any:
        """Run ``coro`` on the server's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def stop(self, grace: float = 0.0) -> None:
        """Graceful stop (running rounds are aborted and recorded)."""
        self._grace = grace
        self._signal()

    def crash(self) -> None:
        """Stop without recording anything, as if the process were killed."""
        self._crash = True
        self._signal()

    def _signal(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.service = SecAggService(self.config, store=self._store)
        await self.service.start()
        self._ready.set()
        await self._stop.wait()
        if self._crash:
            await self.service.crash()
        else:
            await self.service.stop(self._grace)
