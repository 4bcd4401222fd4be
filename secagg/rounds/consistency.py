"""Round 3, ConsistencyCheck (Bonawitz et al. 2017, active-adversary variant).

Survivors sign the survivor set they were shown; every client later checks at least ``t``
signatures over the same set, so a server cannot show different clients different sets.
"""

from __future__ import annotations

from secagg.keys import verify_signature
from secagg.messages import ConsistencySignature, Message, UnmaskRequest, consistency_payload
from secagg.rounds.base import Outgoing, ServerState, Stage

__all__ = ["ConsistencyState"]


class ConsistencyState(ServerState):
    """Collects the survivors' signatures over the survivor set."""

    stage = Stage.CONSISTENCY
    accepts = ConsistencySignature

    def validate(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, ConsistencySignature)
        ctx = self.ctx
        self.check_session(cid, msg.session_id)
        payload = consistency_payload(ctx.session_id, ctx.u2)
        verify_signature(ctx.directory[cid], payload, msg.signature, client_id=cid)

    def store(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, ConsistencySignature)
        self.ctx.signatures[cid] = msg.signature

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        from secagg.rounds.unmasking import UnmaskingState

        ctx = self.ctx
        u3 = self.survivors()
        self.require(u3, "signed the survivor set")
        ctx.u3 = u3
        dropped = tuple(sorted(ctx.u1 - set(ctx.u2)))
        sigs = tuple((cid, ctx.signatures[cid]) for cid in sorted(u3))
        request = UnmaskRequest(ctx.params.round_id, 0, ctx.session_id, ctx.u2, dropped, sigs)
        out: list[Outgoing] = [(cid, request) for cid in sorted(u3)]
        return UnmaskingState(ctx, u3), out
