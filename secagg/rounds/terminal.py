"""Final server states: every message is refused once a round has completed or aborted."""

from __future__ import annotations

from secagg.errors import LateMessage, UnexpectedMessage
from secagg.messages import Message
from secagg.rounds.base import Outgoing, ServerContext, ServerState, Stage

__all__ = ["AbortedState", "CompletedState"]


class _Terminal(ServerState):
    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx, frozenset())

    def handle(self, cid: int, msg: Message, digest: bytes | None = None) -> None:
        rec = self.ctx.records.get(cid)
        exc: UnexpectedMessage
        if rec is not None and not rec.active:
            exc = LateMessage(f"the round is {self.stage}; message discarded", client_id=cid)
        else:
            exc = UnexpectedMessage(f"the round is {self.stage}", client_id=cid)
        exc.drops_sender = False  # the round is over: its record stays as it was
        raise exc

    def ready(self) -> bool:
        return False

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        return self, []


class CompletedState(_Terminal):
    """The aggregate was computed and published."""

    stage = Stage.COMPLETED


class AbortedState(_Terminal):
    """The round ended without a result; ``ctx.error`` says why."""

    stage = Stage.ABORTED
