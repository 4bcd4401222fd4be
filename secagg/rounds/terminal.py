"""Final server states: every message is refused once a round has completed or aborted."""

from __future__ import annotations

from secagg.errors import UnexpectedMessage
from secagg.messages import Message
from secagg.rounds.base import Outgoing, ServerContext, ServerState, Stage

__all__ = ["AbortedState", "CompletedState"]


class _Terminal(ServerState):
    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx, frozenset(), float("inf"))

    def handle(self, cid: int, msg: Message) -> None:
        raise UnexpectedMessage(f"the round is {self.stage}", client_id=cid)

    def ready(self) -> bool:
        return False

    def finish(self, now: float, timeout: float) -> tuple[ServerState, list[Outgoing]]:
        return self, []


class CompletedState(_Terminal):
    """The aggregate was computed and published."""

    stage = Stage.COMPLETED


class AbortedState(_Terminal):
    """The round ended without a result; ``ctx.error`` says why."""

    stage = Stage.ABORTED
