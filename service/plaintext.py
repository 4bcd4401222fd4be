"""INSECURE plaintext rounds: the benchmark baseline, never for real data.

Each client sends its quantized, packed input *unmasked* (a :class:`MaskedInput` with no
mask), and the server adds them up. Same messages, sizes and deadlines as the masked
protocol's input stage, none of its privacy: the server sees every input. Rounds of this
kind are created only on request (``mode="plaintext"``), marked ``insecure_plaintext`` in
the round info and the audit log, and the client SDK refuses them unless told otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from secagg import kernels
from secagg.client import ClientResult
from secagg.errors import (
    DuplicateMessage,
    LateMessage,
    ProtocolViolation,
    RoundAborted,
    ServerMisbehaviour,
    UnexpectedMessage,
    UnknownClient,
    WrongSession,
)
from secagg.keys import random_seed
from secagg.messages import Abort, AggregateResult, MaskedInput, Message, decode_message
from secagg.params import RoundParams
from secagg.quantize import dequantize, unpack
from secagg.rounds.base import ClientRecord, Outgoing, RoundResult, Stage
from secagg.server import StageTimeouts

__all__ = ["PlaintextClient", "PlaintextServer", "plaintext_session_id"]


def plaintext_session_id(params: RoundParams) -> bytes:
    """Session id of a plaintext round: bound to its parameters only."""
    return hashlib.sha256(b"secagg/v1/insecure-plaintext" + params.digest()).digest()


class PlaintextServer:
    """Sums unmasked inputs (INSECURE); the interface of :class:`secagg.server.SecAggServer`."""

    def __init__(
        self,
        params: RoundParams,
        directory: Mapping[int, bytes],
        *,
        timeouts: StageTimeouts | None = None,
        now: float = 0.0,
    ) -> None:
        self.params = params
        self.session_id = plaintext_session_id(params)
        self.records: dict[int, ClientRecord] = {cid: ClientRecord() for cid in directory}
        self.warnings: list[str] = ["INSECURE plaintext round: the server saw every input"]
        self.result: RoundResult | None = None
        self.error: RoundAborted | None = None
        t = timeouts or StageTimeouts()
        self._deadline = now + t.masked_input
        self._started = now
        self._stage_times: dict[str, float] = {}
        self._stage = Stage.MASKED_INPUT
        self._acc = np.zeros(params.words, dtype=np.uint64)
        self._received: dict[int, bytes] = {}

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def done(self) -> bool:
        return self._stage in (Stage.COMPLETED, Stage.ABORTED)

    @property
    def deadline(self) -> float | None:
        return None if self.done else self._deadline

    @property
    def stage_times(self) -> dict[str, float]:
        return dict(self._stage_times)

    def receive(
        self, client_id: int, message: Message | bytes, now: float, *, digest: bytes | None = None
    ) -> list[Outgoing]:
        stage = self._stage
        try:
            msg = decode_message(message) if isinstance(message, bytes | bytearray) else message
            words = self._check(client_id, msg)
        except ProtocolViolation as exc:
            exc.client_id, exc.stage = client_id, stage.value
            rec = self.records.get(client_id)
            if exc.drops_sender and rec is not None and rec.active:
                rec.active, rec.dropped_stage, rec.reason = False, stage, str(exc)
            raise
        self._acc += words
        self._received[client_id] = hashlib.sha256(msg.encode()).digest()
        return self.tick(now)

    def _check(self, cid: int, msg: Message) -> npt.NDArray[np.uint64]:
        if cid not in self.records:
            raise UnknownClient(f"client {cid} is not enrolled in this round")
        if msg.sender != cid:
            raise ProtocolViolation(f"client {cid} sent a message signed as client {msg.sender}")
        if msg.round_id != self.params.round_id:
            raise WrongSession("message belongs to another round")
        if self.done:
            raise UnexpectedMessage(f"the round is {self._stage}")
        if not self.records[cid].active:
            raise LateMessage(f"client {cid} was dropped; message discarded")
        if not isinstance(msg, MaskedInput):
            raise UnexpectedMessage(f"{msg.stage_name} is not accepted in a plaintext round")
        previous = self._received.get(cid)
        if previous is not None:
            exc: ProtocolViolation
            if previous == hashlib.sha256(msg.encode()).digest():
                exc = DuplicateMessage("repeat of an accepted MaskedInput")
            else:
                exc = ProtocolViolation(f"client {cid} sent two different inputs")
            exc.drops_sender = False  # already summed: it stays in
            raise exc
        if msg.session_id != self.session_id:
            raise ProtocolViolation("message bound to another session")
        if msg.words.size != self.params.words:
            raise ProtocolViolation(
                f"input has {msg.words.size} words, the round expects {self.params.words}"
            )
        return msg.words

    def depart(self, client_id: int, now: float, reason: str) -> list[Outgoing]:
        """As :meth:`secagg.server.SecAggServer.depart`: one stage, so a gone client that
        has not sent its input is dropped at once."""
        rec = self.records.get(client_id)
        if self.done or rec is None or not rec.active or client_id in self._received:
            return []
        rec.active, rec.dropped_stage = False, Stage.MASKED_INPUT
        rec.reason = f"{reason} (stage {Stage.MASKED_INPUT})"
        return self.tick(now)

    def rejoin(self, client_id: int) -> None:
        """Nothing to undo: a gone client is dropped at once or not at all."""

    def tick(self, now: float) -> list[Outgoing]:
        if self.done:
            return []
        active = {c for c, r in self.records.items() if r.active}
        if not active <= set(self._received) and now < self._deadline:
            return []
        for cid in active - set(self._received):
            rec = self.records[cid]
            rec.active, rec.dropped_stage = False, Stage.MASKED_INPUT
            rec.reason = "no masked_input message before the deadline"
        self._stage_times[Stage.MASKED_INPUT.value] = now - self._started
        survivors = tuple(sorted(self._received))
        t = self.params.threshold
        if len(survivors) < t:
            return self._abort(
                RoundAborted(
                    Stage.MASKED_INPUT, f"{len(survivors)} clients sent input; the threshold is {t}"
                )
            )
        p = self.params
        sums = unpack(self._acc, p.quant, p.quant.values(p.dim))
        weighted, total = dequantize(sums, p.quant, len(survivors), p.dim)
        self.result = RoundResult(
            contributors=survivors, sums=sums, total_weight=total, weighted_sum=weighted
        )
        self._stage = Stage.COMPLETED
        msg = AggregateResult(p.round_id, 0, self.session_id, survivors, self._acc.copy())
        return [(c, msg) for c in survivors if self.records[c].active]

    def abort(self, stage: str, reason: str) -> list[Outgoing]:
        if self.done:
            return []
        return self._abort(RoundAborted(stage, reason))

    def _abort(self, exc: RoundAborted) -> list[Outgoing]:
        self.error = exc
        self._stage = Stage.ABORTED
        msg = Abort(self.params.round_id, 0, exc.stage, exc.reason)
        return [(c, msg) for c, r in sorted(self.records.items()) if r.active]


class PlaintextClient:
    """Sends its input unmasked (INSECURE); the interface of :class:`secagg.client.SecAggClient`."""

    def __init__(
        self,
        client_id: int,
        params: RoundParams,
        x: npt.ArrayLike,
        weight: int = 1,
        *,
        rounding_key: bytes | None = None,
    ) -> None:
        self.client_id = client_id
        self.params = params
        host = kernels.to_host(x)  # the insecure baseline runs on the host
        self._x: npt.NDArray[np.float64] | None = np.asarray(host, dtype=np.float64).reshape(-1)
        self._weight = weight
        self._rounding_key = rounding_key or random_seed()
        self._stage = Stage.MASKED_INPUT
        self.result: ClientResult | None = None
        self.error: RoundAborted | ServerMisbehaviour | None = None

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def done(self) -> bool:
        return self._stage in (Stage.COMPLETED, Stage.ABORTED)

    def start(self, now: float = 0.0) -> list[Message]:
        assert self._x is not None
        # The fused kernel with no masks: quantize and pack, as the masked path does.
        words = kernels.mask_vector(
            self._x, self._weight, self.params.quant, self._rounding_key, []
        )
        self._x = None
        sid = plaintext_session_id(self.params)
        return [MaskedInput(self.params.round_id, self.client_id, sid, words)]

    def receive(self, message: Message | bytes, now: float = 0.0) -> list[Message]:
        msg = decode_message(message) if isinstance(message, bytes | bytearray) else message
        p = self.params
        if isinstance(msg, Abort):
            self._fail(RoundAborted(msg.stage, msg.reason))
        if not isinstance(msg, AggregateResult) or self.done:
            raise UnexpectedMessage(f"{msg.stage_name} is not expected", client_id=self.client_id)
        if (
            msg.round_id != p.round_id
            or msg.session_id != plaintext_session_id(p)
            or self.client_id not in msg.contributors
            or msg.words.size != p.words
        ):
            self._fail(
                ServerMisbehaviour("inconsistent plaintext result", client_id=self.client_id)
            )
        sums = unpack(msg.words, p.quant, p.quant.values(p.dim))
        weighted, total = dequantize(sums, p.quant, len(msg.contributors), p.dim)
        self.result = ClientResult(sums, msg.contributors, total, weighted)
        self._stage = Stage.COMPLETED
        return []

    def _fail(self, exc: RoundAborted | ServerMisbehaviour) -> None:
        self.error = exc
        self._stage = Stage.ABORTED
        raise exc
