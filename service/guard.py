"""Refuse, don't fault: frames that are not valid protobuf become ``INVALID_ARGUMENT``.

gRPC runs a method's request deserializer before the handler: when it raises (any
participant, or anyone who can reach the port, can send bytes that do not parse), grpc
reports ``INTERNAL``/``UNKNOWN`` and logs a traceback per call. :class:`FrameGuard` wraps
the deserializers of our services so that a bad frame becomes a :data:`BAD_FRAME` marker;
the unary handler is then never called (the call ends with ``INVALID_ARGUMENT``) and a
stream's request iterator raises :class:`~secagg.errors.MalformedMessage` at that frame,
which the servicer maps like any other malformed input. One warning line per bad frame.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from secagg.errors import MalformedMessage
from secagg.service.logs import event

__all__ = ["BAD_FRAME", "FrameGuard", "guard_requests"]

log = logging.getLogger("secagg.service.guard")


class _BadFrame:
    """Stands for a request that did not parse (never a real message)."""

    def __repr__(self) -> str:
        return "BAD_FRAME"


BAD_FRAME: Any = _BadFrame()
"""What a guarded deserializer returns for bytes that are not a valid message."""


def _safe(method: str, parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if parse is None:
            return data
        try:
            return parse(data)
        except (DecodeError, ValueError, TypeError) as exc:
            event(
                log, logging.WARNING, "invalid frame", method=method, size=len(data), error=str(exc)
            )
            return BAD_FRAME

    return deserialize


async def guard_requests(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``requests``, raising :class:`MalformedMessage` at the first frame that did not parse."""
    async for request in requests:
        if request is BAD_FRAME:
            raise MalformedMessage("a frame is not a valid protobuf message")
        yield request


class FrameGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Server interceptor: guarded deserializers for every unary method and every stream
    method whose handler is an async generator (ours, reflection). Health's ``Watch``
    (unary-stream, written with ``context.write``) is left as grpc serves it."""

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None:
            return handler
        deserialize = _safe(method, handler.request_deserializer)
        if handler.unary_unary:
            unary = handler.unary_unary

            async def guarded_unary(request: Any, context: Any) -> Any:
                if request is BAD_FRAME:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "MalformedMessage: the request is not a valid protobuf message",
                    )
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                guarded_unary, deserialize, handler.response_serializer
            )
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            stream = handler.stream_stream

            async def guarded_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                async for item in stream(guard_requests(requests), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(
                guarded_stream, deserialize, handler.response_serializer
            )
        return handler
