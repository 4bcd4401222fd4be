"""Many SDK clients on one ``grpc.aio`` event loop: a host of simulated (or real) sites.

The synchronous SDK (:class:`secagg.service.client.Client`) spends a thread per client and a
gRPC channel each; at hundreds of clients per process the threads, not the protocol, fill
the cores. :class:`AsyncClient` runs the same participation as a coroutine, so one process
hosts hundreds of them on one event loop, sharing a few channels:

>>> async with aio_channel(target) as channel:
...     client = AsyncClient(channel, target, identity, policy=policy, insecure_no_tls=True)
...     joined = await client.join(round_id)
...     result = await client.participate(joined, vector, weight)

Nothing of the protocol is forked: the policy check of the round, the protocol core
(:class:`secagg.client.SecAggClient` and the other cores), the frame accounting, ordering
checks, chunking and resume logic are the SDK's own (``Client._checked_round``,
``Client._core`` and the steps of its ``_Session``); this module only moves the frames on an
asyncio call. The core's CPU work (key agreement, signatures, masks) runs on ``executor``
(a small thread pool shared by the loop's clients) so the loop keeps serving the other
clients' streams meanwhile. Sharded rounds (``groups > 1``) need the synchronous SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy.typing as npt

from secagg.client import ClientResult
from secagg.errors import ConfigurationError
from secagg.keys import IdentityKey
from secagg.messages import Message
from secagg.service._gen import aggregation_pb2, aggregation_pb2_grpc
from secagg.service.auth import call_metadata
from secagg.service.client import (
    TRANSIENT,
    Client,
    HEContext,
    Policy,
    RetryPolicy,
    TransferStats,
    _round_id,
    _Session,
    _Silent,
    _Unavailable,
)
from secagg.service.errors import from_rpc_error
from secagg.service.serde import DEFAULT_CHUNK_BYTES, JoinedRound
from secagg.service.servicer import GET_ROUND, SESSION
from secagg.service.tls import ClientTls, tls_failure

__all__ = ["AsyncClient", "aio_channel"]

_T = TypeVar("_T")


def aio_channel(
    target: str,
    *,
    tls: ClientTls | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel with the SDK's message limits (an async context manager).

    It gets its own connection (a local subchannel pool): several channels to one server
    spread a process's clients over as many HTTP/2 connections.
    """
    opts = [
        ("grpc.max_receive_message_length", chunk_bytes + 64 * 1024),
        ("grpc.max_send_message_length", -1),
        ("grpc.use_local_subchannel_pool", 1),
        *(tls.options() if tls else []),
        *options,
    ]
    if tls is not None:
        return grpc.aio.secure_channel(target, tls.credentials(), options=opts)
    return grpc.aio.insecure_channel(target, options=opts)


class AsyncClient:
    """One participant whose calls run on an asyncio event loop (see the module doc).

    Parameters
    ----------
    channel:
        A ``grpc.aio`` channel to the server (:func:`aio_channel`), possibly shared by many
        clients; the caller closes it.
    target, identity, tls, policy, retry, chunk_bytes, insecure_no_tls:
        As for :class:`secagg.service.client.Client`, whose checks this client applies
        (``target`` and ``tls`` only name the server: the calls use ``channel``).
    executor:
        Where the protocol core's CPU work runs (``None``: the loop's default executor).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        target: str,
        identity: IdentityKey,
        *,
        tls: ClientTls | None = None,
        policy: Policy | None = None,
        retry: RetryPolicy | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        insecure_no_tls: bool = False,
        executor: Executor | None = None,
    ) -> None:
        # The SDK object holds the identity, policy, retry settings, counters and DP ledger;
        # its own (synchronous) channel is never used and costs no connection.
        self.sdk = Client(
            target,
            identity,
            tls=tls,
            policy=policy,
            retry=retry,
            chunk_bytes=chunk_bytes,
            insecure_no_tls=insecure_no_tls,
        )
        self._stub = aggregation_pb2_grpc.AggregationStub(channel)
        self._executor = executor

    @property
    def stats(self) -> TransferStats:
        """Bytes this client moved."""
        return self.sdk.stats

    def close(self) -> None:
        self.sdk.close()

    async def _cpu(self, fn: Callable[..., _T], *args: Any, **kw: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kw))

    async def join(self, round_id: bytes | str) -> JoinedRound:
        """Fetch the round and check it against the policy (as ``Client.join``)."""
        rid = _round_id(round_id)
        sdk = self.sdk
        retry = sdk.retry
        deadline = time.monotonic() + retry.connect_budget
        backoff = retry.initial_backoff
        while True:
            try:
                info = await self._stub.GetRound(
                    aggregation_pb2.GetRoundRequest(round_id=rid),
                    metadata=call_metadata(sdk.identity, GET_ROUND, rid),
                    timeout=retry.connect_budget,
                )
                break
            except grpc.RpcError as err:
                if (tls_err := tls_failure(err, sdk.tls)) is not None:
                    raise tls_err from None
                if err.code() not in TRANSIENT or time.monotonic() + backoff > deadline:
                    raise from_rpc_error(err) from None
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, retry.max_backoff)
        return await self._cpu(sdk._checked_round, info, rid)

    async def participate(
        self,
        joined: JoinedRound,
        vector: npt.ArrayLike,
        weight: int = 1,
        *,
        rounding_key: bytes | None = None,
        on_send: Callable[[Message], bool] | None = None,
        he_context: HEContext | None = None,
        key_epoch: bytes | None = None,
    ) -> ClientResult | None:
        """Run the protocol for a joined round (as ``Client.participate``); ``None`` when
        ``on_send`` made the client go silent."""
        if joined.groups > 1:
            raise ConfigurationError(
                f"round {joined.round_id.hex()} is sharded into {joined.groups} groups: "
                "join it with the synchronous Client"
            )
        sdk = self.sdk
        core, dp_key = await self._cpu(
            sdk._core, joined, vector, weight, rounding_key=rounding_key,
            he_context=he_context, key_epoch=key_epoch,
        )  # fmt: skip
        result = await _AsyncSession(self, joined, core, on_send).run()
        sdk._settle(joined, dp_key, result)
        return result


class _AsyncSession(_Session):
    """The SDK's session steps on a ``grpc.aio`` call; the core's work on the executor."""

    def __init__(
        self,
        client: AsyncClient,
        joined: JoinedRound,
        core: Any,
        on_send: Callable[[Message], bool] | None,
    ) -> None:
        super().__init__(client.sdk, joined, core, on_send)
        self._aclient = client
        self._out: asyncio.Queue[aggregation_pb2.ClientFrame | None] = asyncio.Queue()

    def emit(self, frame: aggregation_pb2.ClientFrame) -> None:
        self._out.put_nowait(frame)

    async def _requests(
        self, out: asyncio.Queue[aggregation_pb2.ClientFrame | None]
    ) -> AsyncIterator[aggregation_pb2.ClientFrame]:
        while (frame := await out.get()) is not None:
            yield frame

    async def run(self) -> ClientResult | None:  # type: ignore[override]
        aclient = self._aclient
        started = await aclient._cpu(self.core.start, time.monotonic())
        if not self._accept(started):
            return None
        sdk = self.client
        retry = sdk.retry
        backoff = retry.initial_backoff
        while True:
            out: asyncio.Queue[aggregation_pb2.ClientFrame | None] = asyncio.Queue()
            self._out = out
            self.opening_frames()
            rid = self.joined.round_id
            call = aclient._stub.Session(
                self._requests(out),
                metadata=call_metadata(sdk.identity, SESSION, rid),
                timeout=self.call_timeout,
            )
            try:
                result = await self._pump_async(call)
                out.put_nowait(None)
                with contextlib.suppress(grpc.RpcError):
                    async for _ in call:  # the server closes the stream once it has sent all
                        pass
                return result
            except _Silent:
                return None
            except grpc.RpcError as err:
                if (tls_err := tls_failure(err, sdk.tls)) is not None:
                    raise tls_err from None
                stalled = time.monotonic() - self.last_progress
                if err.code() not in TRANSIENT or stalled + backoff > self.budget:
                    raise from_rpc_error(err) from None
            finally:
                out.put_nowait(None)
                call.cancel()
            sdk.stats.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, retry.max_backoff)

    async def _pump_async(self, call: Any) -> ClientResult:
        asm = self.assembler()
        async for frame in call:
            data = self._message(frame, asm)
            if data is None:
                continue
            replies = await self._aclient._cpu(self.core.receive, data, time.monotonic())
            result = self._replied(replies)
            if result is not None:
                return result
        raise _Unavailable("the server ended the session before the round did")
