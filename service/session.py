"""One participant stream: chunks in, acknowledgements and mailbox messages out.

A reader task assembles the client's chunks into messages and hands each to the round;
the stream itself yields acknowledgements and the client's mailbox, starting at the
client's ``resume_from``, and ends with the mailbox's final status. Only this generator
produces frames, so they never interleave.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from secagg.errors import MalformedMessage
from secagg.service._gen import aggregation_pb2
from secagg.service.errors import HelloTimeout
from secagg.service.rounds import RoundRunner
from secagg.service.serde import Assembler, ack_frame

__all__ = ["StreamSession"]


class StreamSession:
    """Pumps one ``Session`` call for client ``client_id`` of ``runner``'s round."""

    def __init__(
        self, runner: RoundRunner, client_id: int, max_chunk: int, hello_timeout: float = 10.0
    ) -> None:
        self._runner = runner
        self._cid = client_id
        self._max_chunk = max_chunk
        self._hello_timeout = hello_timeout
        self._acks: deque[bytes] = deque()
        self._error: Exception | None = None
        self._busy = False  # a message is with the round: its verdict comes first
        self._wake = asyncio.Event()

    async def frames(
        self, requests: AsyncIterator[aggregation_pb2.ClientFrame]
    ) -> AsyncIterator[bytes]:
        """The serialized frames of the stream, until the mailbox is closed and drained.

        Raises
        ------
        SecAggError
            Why the stream ends with an error status (the servicer maps it).
        """
        try:
            first = await asyncio.wait_for(anext(aiter(requests), None), self._hello_timeout)
        except TimeoutError:
            raise HelloTimeout(
                f"no Hello within {self._hello_timeout:g} s of opening the stream"
            ) from None
        if first is None or first.WhichOneof("kind") != "hello":
            raise MalformedMessage("a session starts with Hello")
        mailbox = self._runner.mailboxes[self._cid]
        index = first.hello.resume_from
        if index > len(mailbox.messages):
            raise MalformedMessage("resume_from is beyond the messages sent so far")
        out_chunk = self._max_chunk
        if first.hello.max_chunk_bytes:
            out_chunk = max(1024, min(out_chunk, first.hello.max_chunk_bytes))
        mailbox.watch(self._wake)
        reader = asyncio.create_task(self._read(requests))
        try:
            await self._runner.attach(self._cid)
            while True:
                self._wake.clear()
                while self._acks:
                    yield self._acks.popleft()
                while index < len(mailbox.messages):
                    for frame in self._runner.frames(mailbox.messages[index], index, out_chunk):
                        yield frame
                    index += 1
                    while self._acks:
                        yield self._acks.popleft()
                if self._error is not None:
                    raise self._error
                if mailbox.closed and index == len(mailbox.messages) and not self._busy:
                    if mailbox.failure is not None:
                        raise mailbox.failure
                    return
                await self._wake.wait()
        finally:
            mailbox.unwatch(self._wake)
            reader.cancel()
            self._runner.detach(self._cid)  # grace period, then the round treats it as gone

    async def _read(self, requests: AsyncIterator[aggregation_pb2.ClientFrame]) -> None:
        runner = self._runner
        asm = Assembler(self._max_chunk, runner.max_message_bytes)
        try:
            async for frame in requests:
                if frame.WhichOneof("kind") != "chunk":
                    raise MalformedMessage("only chunks may follow Hello")
                got = asm.add(frame.chunk)
                if got is None:
                    continue
                seq, data = got
                self._busy = True
                try:
                    duplicate = await runner.submit(self._cid, data)
                finally:
                    self._busy = False
                    self._wake.set()
                self._acks.append(ack_frame(seq, duplicate))
        except Exception as exc:  # any failure ends the stream (the servicer maps it)
            self._error = exc
            self._wake.set()
