"""Round 0b, reveal_nonces: open the graph-nonce commitments once the roster is fixed.

Each client commits to a fresh 256-bit nonce in its signed AdvertiseKeys and opens it only
after it has checked the roster, so every commitment (and the session id over them) is
fixed before any honest nonce is known. The neighbour graph's seed hashes the session id and
every roster member's nonce (:func:`graph_seed`): one honest nonce makes it uniform and
independent of every key, commitment and roster choice the adversary made, so re-drawing
keys offline no longer steers the graph (docs/threat-model.md, "Neighbour graph").

The reveal set must be exactly the roster. Letting the server drop reveals would hand it a
choice of subsets, i.e. a graph re-draw per subset, so a roster member that does not reveal
(or reveals a nonce that does not open its commitment) aborts the round, naming it: the one
stage where a dropout aborts rather than being tolerated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from secagg.errors import ProtocolViolation, RoundAborted
from secagg.keys import constant_time_equal
from secagg.messages import Message, NonceReveal, NonceReveals, nonce_commitment
from secagg.prg import Purpose, derive_key
from secagg.rounds.base import Outgoing, ServerState, Stage

__all__ = ["RevealNoncesState", "graph_seed"]


def graph_seed(session_id: bytes, nonces: Mapping[int, bytes]) -> bytes:
    """Public seed of the neighbour graph: HKDF over the session id and every roster
    member's revealed nonce, in id order (no party chooses it alone)."""
    h = hashlib.sha256(b"secagg/v1/graph-nonces" + session_id)
    for cid in sorted(nonces):
        h.update(cid.to_bytes(4, "big") + nonces[cid])
    return derive_key(h.digest(), session_id, Purpose.GRAPH)


class RevealNoncesState(ServerState):
    """Collects every roster member's nonce; forwards all of them, or aborts naming the
    members that did not open their commitment."""

    stage = Stage.REVEAL_NONCES
    accepts = NonceReveal

    def validate(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, NonceReveal)
        ctx = self.ctx
        self.check_session(cid, msg.session_id)
        commit = nonce_commitment(ctx.params_digest, cid, msg.nonce)
        if not constant_time_equal(commit, ctx.advertised[cid].nonce_commit):
            raise ProtocolViolation(
                f"client {cid} revealed a graph nonce that does not open its commitment",
                client_id=cid,
            )

    def store(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, NonceReveal)
        self.ctx.nonces[cid] = msg.nonce

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        from secagg import graph
        from secagg.rounds.share_keys import ShareKeysState

        ctx = self.ctx
        revealed = self.survivors()
        missing = sorted(self.expected - revealed)
        if missing:
            raise RoundAborted(
                self.stage,
                f"clients {missing} did not reveal their graph nonces; the reveal set must be "
                f"the whole roster of {len(self.expected)} (exclude them next round)",
            )
        u0 = sorted(self.expected)
        degree = min(ctx.params.degree, len(u0) - 1)
        seed = graph_seed(ctx.session_id, ctx.nonces)
        ctx.graph = dict(graph.neighbours(u0, degree, seed))
        nonces = tuple((cid, ctx.nonces[cid]) for cid in u0)
        msg = NonceReveals(ctx.params.round_id, 0, ctx.session_id, nonces)
        return ShareKeysState(ctx, self.expected), [(cid, msg) for cid in u0]
