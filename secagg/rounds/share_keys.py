"""Round 1, ShareKeys: route encrypted Shamir shares the server cannot read."""

from __future__ import annotations

from secagg.errors import ProtocolViolation
from secagg.messages import Message, ShareDelivery, ShareKeys
from secagg.rounds.base import Outgoing, ServerState, Stage

__all__ = ["ShareKeysState"]


class ShareKeysState(ServerState):
    """Collects one ciphertext per neighbour from each client, then delivers them."""

    stage = Stage.SHARE_KEYS
    accepts = ShareKeys

    def validate(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, ShareKeys)
        self.check_session(cid, msg.session_id)
        recipients = [r for r, _ in msg.shares]
        if len(set(recipients)) != len(recipients) or set(recipients) != self.ctx.graph[cid]:
            raise ProtocolViolation(
                f"client {cid} must send exactly one share bundle to each of its "
                f"{len(self.ctx.graph[cid])} neighbours",
                client_id=cid,
            )

    def store(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, ShareKeys)
        self.ctx.shares[cid] = dict(msg.shares)

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        from secagg.rounds.masked_input import MaskedInputState

        ctx = self.ctx
        u1 = self.survivors()
        self.require(u1, "shared their keys")
        ctx.u1 = u1
        rid = ctx.params.round_id
        out: list[Outgoing] = []
        for v in sorted(u1):
            bundle = tuple((u, ctx.shares[u][v]) for u in sorted(ctx.graph[v] & u1))
            out.append((v, ShareDelivery(rid, 0, ctx.session_id, bundle)))
        ctx.shares.clear()
        return MaskedInputState(ctx, u1), out
