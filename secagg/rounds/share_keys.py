"""Round 1, ShareKeys: route encrypted Shamir shares the server cannot read, and keep each
dealer's signed share commitments (the evidence unmasking checks revealed shares against)."""

from __future__ import annotations

from secagg.errors import ProtocolViolation
from secagg.messages import Message, ShareDelivery, ShareKeys
from secagg.rounds.base import Outgoing, ServerState, Stage

__all__ = ["ShareKeysState"]


class ShareKeysState(ServerState):
    """Collects one ciphertext per neighbour and one signed commitment per holder from each
    client, then delivers them.

    The commitments' signatures are not verified here (that would be one verification per
    share on the server in every honest round): each holder verifies the ones it receives,
    and unmasking verifies only those it cites as evidence.
    """

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
        committed = [h for h, _ in msg.commitments]
        if len(set(committed)) != len(committed) or set(committed) != self.ctx.holders(cid):
            raise ProtocolViolation(
                f"client {cid} must commit to the shares of each of its "
                f"{len(self.ctx.holders(cid))} holders exactly once",
                client_id=cid,
            )
        offer = self.ctx.params.dp
        want = 0 if offer is None else offer.plan.components - 1
        if msg.dp_components != want:
            raise ProtocolViolation(
                f"client {cid} shared {msg.dp_components} DP noise seeds; the round has {want}",
                client_id=cid,
            )
        if want:
            to = [r for r, _ in msg.dp_shares]
            at = [h for h, _ in msg.dp_commitments]
            if len(set(to)) != len(to) or set(to) != self.ctx.graph[cid]:
                raise ProtocolViolation(
                    f"client {cid} must send one DP share bundle to each neighbour", client_id=cid
                )
            if len(set(at)) != len(at) or set(at) != self.ctx.holders(cid):
                raise ProtocolViolation(
                    f"client {cid} must commit to the DP shares of each holder", client_id=cid
                )

    def store(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, ShareKeys)
        self.ctx.shares[cid] = dict(msg.shares)
        self.ctx.share_commits[cid] = dict(msg.commitments)
        if msg.dp_components:
            self.ctx.dp_bundles[cid] = dict(msg.dp_shares)
            self.ctx.dp_commits[cid] = dict(msg.dp_commitments)
            if msg.dp_salt:
                self.ctx.dp_salts[cid] = msg.dp_salt

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        from secagg.rounds.masked_input import MaskedInputState

        ctx = self.ctx
        u1 = self.survivors()
        self.require(u1, "shared their keys")
        ctx.u1 = u1
        rid = ctx.params.round_id
        out: list[Outgoing] = []
        for cid in set(ctx.share_commits) - u1:
            del ctx.share_commits[cid]
        for cid in set(ctx.dp_commits) - u1:
            del ctx.dp_commits[cid]
        for cid in set(ctx.dp_salts) - u1:
            del ctx.dp_salts[cid]
        offer = ctx.params.dp
        n_dp = 0 if offer is None else offer.plan.components - 1
        for v in sorted(u1):
            dealers = sorted(ctx.graph[v] & u1)
            bundle = tuple((u, ctx.shares[u][v]) for u in dealers)
            commits = tuple((u, ctx.share_commits[u][v]) for u in dealers)
            dp_bundle = tuple((u, ctx.dp_bundles[u][v]) for u in dealers) if n_dp else ()
            dp_commits = tuple((u, ctx.dp_commits[u][v]) for u in dealers) if n_dp else ()
            salts = tuple((u, ctx.dp_salts[u]) for u in dealers if u in ctx.dp_salts)
            out.append(
                (
                    v,
                    ShareDelivery(
                        rid, 0, ctx.session_id, bundle, commits, n_dp, dp_bundle, dp_commits,
                        salts,
                    ),
                )
            )  # fmt: skip
        ctx.shares.clear()
        ctx.dp_bundles.clear()
        return MaskedInputState(ctx, u1), out
