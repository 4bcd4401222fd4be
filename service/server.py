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
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from secagg.service._gen import admin_pb2, admin_pb2_grpc, aggregation_pb2
from secagg.service.auth import CallVerifier
from secagg.service.config import ServerConfig
from secagg.service.coordinator import Coordinator
from secagg.service.guard import FrameGuard
from secagg.service.logs import configure, event
from secagg.service.metrics import Metrics
from secagg.service.servicer import AdminServicer, AggregationServicer
from secagg.service.store import Store

__all__ = ["BackgroundServer", "SecAggService", "serve"]

log = logging.getLogger("secagg.service.server")

FRAME_SLACK = 64 * 1024
"""Protobuf framing allowed on top of a chunk's data in one gRPC message."""
SERVICE_NAMES = (
    aggregation_pb2.DESCRIPTOR.services_by_name["Aggregation"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)
SHUTDOWN_REASON = "the server is shutting down"


class AccessLog(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and logs every finished call of our services (method, status, duration)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith("/secagg.v1."):
            return handler
        metrics = self._metrics

        def done(peer: str, t0: float, code: grpc.StatusCode | str) -> None:
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            metrics.rpcs.labels(method, name).inc()
            seconds = round(time.monotonic() - t0, 4)
            event(log, logging.INFO, "rpc", method=method, code=name, peer=peer, seconds=seconds)

        def failed(context: Any, exc: BaseException) -> grpc.StatusCode | str:
            # A cancelled call may already be gone: do not touch its context then.
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                return "CANCELLED"
            return context.code() or grpc.StatusCode.UNKNOWN

        if handler.unary_unary:
            unary = handler.unary_unary

            async def observed_unary(request: Any, context: Any) -> Any:
                t0, peer = time.monotonic(), context.peer()
                code: grpc.StatusCode | str = grpc.StatusCode.OK
                try:
                    return await unary(request, context)
                except BaseException as exc:
                    code = failed(context, exc)
                    raise
                finally:
                    done(peer, t0, code)

            return grpc.unary_unary_rpc_method_handler(
                observed_unary, handler.request_deserializer, handler.response_serializer
            )
        stream = handler.stream_stream

        async def observed_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            t0, peer = time.monotonic(), context.peer()
            code: grpc.StatusCode | str = grpc.StatusCode.OK
            try:
                async for item in stream(requests, context):
                    yield item
            except BaseException as exc:
                code = failed(context, exc)
                raise
            finally:
                done(peer, t0, code)

        return grpc.stream_stream_rpc_method_handler(
            observed_stream, handler.request_deserializer, handler.response_serializer
        )


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
        self.port = 0
        self._server: Any = None
        self._health: Any = None
        self._http: Any = None

    @property
    def metrics_port(self) -> int | None:
        """Port of the ``/metrics`` endpoint, once started with one."""
        return None if self._http is None else int(self._http.server_port)

    async def start(self) -> int:
        """Recover the store, bind and start serving; returns the bound port."""
        cfg = self.config
        self.coordinator.recover()
        limit = cfg.max_chunk_bytes + FRAME_SLACK
        server = grpc.aio.server(
            interceptors=[AccessLog(self.metrics), FrameGuard()],
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
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if cfg.tls is not None:
            self.port = server.add_secure_port(cfg.listen, cfg.tls.credentials())
        else:
            self.port = server.add_insecure_port(cfg.listen)
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.metrics_port is not None:
            self._http = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_addr)
        event(
            log,
            logging.INFO,
            "serving",
            listen=cfg.listen,
            port=self.port,
            tls=cfg.tls is not None,
            mutual_tls=bool(cfg.tls and cfg.tls.mutual),
            store=cfg.store if self._own_store else self.store.path,
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: refuse new calls, let rounds finish for ``grace`` s, abort the rest."""
        grace = self.config.shutdown_grace if grace is None else grace
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
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
            for r in self.coordinator.runners():
                await r.close()
            await self._server.stop(0)
            await self._finish(close_store=False)

    async def _finish(self, close_store: bool = True) -> None:
        self._server = None
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            self._http.shutdown()
        if self._own_store and close_store:
            self.store.close()
        event(log, logging.INFO, "stopped", port=self.port)


def serve(config: ServerConfig) -> int:
    """Run a server until SIGTERM or SIGINT (``secagg serve``)."""
    configure(config.log_level, config.log_format)

    async def main() -> None:
        service = SecAggService(config)
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
