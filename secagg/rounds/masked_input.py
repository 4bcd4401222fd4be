"""Round 2, MaskedInputCollection: sum masked vectors as they arrive (as fcp/secagg does)."""

from __future__ import annotations

import numpy as np

from secagg.errors import ProtocolViolation
from secagg.messages import ConsistencyRequest, MaskedInput, Message
from secagg.rounds.base import Outgoing, ServerContext, ServerState, Stage

__all__ = ["MaskedInputState"]


class MaskedInputState(ServerState):
    """Adds each masked input into the running sum mod 2^64; never keeps one on its own."""

    stage = Stage.MASKED_INPUT
    accepts = MaskedInput

    def __init__(self, ctx: ServerContext, expected: frozenset[int], deadline: float) -> None:
        super().__init__(ctx, expected, deadline)
        ctx.acc = np.zeros(ctx.params.words, dtype=np.uint64)

    def handle(self, cid: int, msg: Message) -> None:
        try:
            super().handle(cid, msg)
        except ProtocolViolation as exc:
            # An input already summed cannot be taken out again: its sender stays in.
            if cid in self.received:
                exc.drops_sender = False
            raise

    def validate(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, MaskedInput)
        self.check_session(cid, msg.session_id)
        if msg.words.size != self.ctx.params.words:
            raise ProtocolViolation(
                f"masked input has {msg.words.size} words, the round expects "
                f"{self.ctx.params.words}",
                client_id=cid,
            )

    def store(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, MaskedInput)
        self.ctx.acc += msg.words

    def finish(self, now: float, timeout: float) -> tuple[ServerState, list[Outgoing]]:
        from secagg.rounds.consistency import ConsistencyState

        ctx = self.ctx
        # Clients dropped for a violation after sending are still in the sum.
        for cid in self.expected - self.received:
            ctx.drop(cid, self.stage, f"no {self.stage} message before the deadline")
        u2 = tuple(sorted(self.received))
        self.require(u2, "sent a masked input")
        ctx.u2 = u2
        request = ConsistencyRequest(ctx.params.round_id, 0, ctx.session_id, u2)
        out: list[Outgoing] = [(cid, request) for cid in sorted(ctx.active(u2))]
        return ConsistencyState(ctx, ctx.active(u2), now + timeout), out
